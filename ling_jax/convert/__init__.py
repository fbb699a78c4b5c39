"""Streaming conversion between the released HF checkpoint and an Orbax checkpoint.

    python -m ling_jax.convert import HF_DIR CKPT_DIR [--dtype bfloat16] [--overwrite]
    python -m ling_jax.convert export CKPT_DIR HF_DIR [--overwrite]

    import_hf(hf_dir, ckpt_dir, dtype)    HF safetensors (bf16 / fp32 / FP8, docs/architecture.md
    §4) -> checkpoint,
                                          in the source's dtype unless `dtype` is given
    export_hf(ckpt_dir, hf_dir)           checkpoint -> HF layout, bit-exact with the imported one
    load(ckpt_dir, mesh, dtype)           -> (config, model), restored by Orbax into the shardings
                                          of `mesh` (any mesh), each device reading its own shard;
                                          in the stored dtype unless `dtype` is given
    save(model, ckpt_dir)                 a live model -> checkpoint (Orbax save)

`export_hf` and `load` also take a training run's checkpoint (its out_dir, `checkpoints/` or
`checkpoints/<step>`): its fp32 parameters and expert biases, the config from its meta item
(`ling_jax.train.checkpoint.find_run_checkpoint`).

Host memory stays bounded by the blocks in flight (no more than a few hundred MiB), whatever the
model size; the checkpoint format is in `store.py`. Every writer publishes through
`ling_jax.io.destination`: built aside, renamed into place under a lock, and replacing only a
folder that ling_jax wrote (or an empty one).
"""

from ling_jax.convert.exporter import export_hf
from ling_jax.convert.importer import import_hf
from ling_jax.convert.pipeline import ConversionError
from ling_jax.convert.progress import Summary
from ling_jax.convert.restore import load, save
from ling_jax.convert.store import CheckpointFormatError
from ling_jax.io.destination import DestinationError

__all__ = ["import_hf", "export_hf", "load", "save", "ConversionError", "CheckpointFormatError",
           "DestinationError", "Summary"]
