"""File I/O that does not depend on the model: the safetensors reader / writer (docs/architecture.md
§4.1), and `destination`, the publish protocol (and lock) of every folder ling_jax writes."""

from ling_jax.io.safetensors import (DTYPES, SafetensorsError, SafetensorsFile, TensorNotFoundError,
                                     write_safetensors)

__all__ = ["DTYPES", "SafetensorsError", "SafetensorsFile", "TensorNotFoundError",
           "write_safetensors"]
