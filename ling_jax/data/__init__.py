"""Input pipeline: document sources, tokenizers, grain packing into rows with segment ids."""

from ling_jax.data.pipeline import Data, DataConfig, packed_dataset
from ling_jax.data.sources import DataError, load_documents, split_documents, stdlib_files
from ling_jax.data.synthetic import SyntheticIterator
from ling_jax.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["DataError", "Data", "DataConfig", "packed_dataset", "load_documents", "split_documents",
           "stdlib_files", "SyntheticIterator", "ByteTokenizer", "HFTokenizer", "load_tokenizer"]
