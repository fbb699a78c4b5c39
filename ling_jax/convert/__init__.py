"""Streaming conversion between the released HF checkpoint and an Orbax checkpoint (issue 6).

    python -m ling_jax.convert import HF_DIR CKPT_DIR [--dtype bfloat16]
    python -m ling_jax.convert export CKPT_DIR HF_DIR

    import_hf(hf_dir, ckpt_dir, dtype)    HF safetensors (bf16 / fp32 / FP8, spec 4) -> checkpoint
    export_hf(ckpt_dir, hf_dir)           checkpoint -> HF layout, bit-exact with the imported one
    load(ckpt_dir, mesh, dtype)           -> (config, model), restored by Orbax into the shardings
                                          of `mesh` (any mesh), each device reading its own shard
    save(model, ckpt_dir)                 a live model -> checkpoint (Orbax save)

Host memory stays bounded by the blocks in flight (no more than a few hundred MiB), whatever the
model size; the checkpoint format is in `store.py`.
"""

from ling_jax.convert.exporter import export_hf
from ling_jax.convert.importer import import_hf
from ling_jax.convert.pipeline import ConversionError
from ling_jax.convert.progress import Summary
from ling_jax.convert.restore import load, save
from ling_jax.convert.store import CheckpointFormatError

__all__ = ["import_hf", "export_hf", "load", "save", "ConversionError", "CheckpointFormatError",
           "Summary"]
