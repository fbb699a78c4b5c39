"""`python -m ling_jax.convert import HF_DIR CKPT_DIR` / `export CKPT_DIR HF_DIR` (thin CLI)."""

from __future__ import annotations

import argparse
import gc
import sys

import ml_dtypes
import numpy as np

DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32, "float16": np.float16}


def _size(text: str) -> int:
  units = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
  t = text.upper().rstrip("IB")
  num = t.rstrip("KMGT")
  return int(float(num) * units[t[len(num):]])


def main(argv=None) -> int:
  p = argparse.ArgumentParser(prog="python -m ling_jax.convert", description=__doc__)
  sub = p.add_subparsers(dest="command", required=True)
  imp = sub.add_parser("import", help="HF safetensors folder -> Orbax checkpoint")
  imp.add_argument("hf_dir")
  imp.add_argument("ckpt_dir")
  imp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter dtype (default: the source's: an FP8 source is dequantised to "
                        "bfloat16, any other keeps the dtype of most of its tensors, even where "
                        "config.json's torch_dtype says otherwise; the summary says which). "
                        "The router weight and "
                        "expert bias stay float32")
  imp.add_argument("--keep-fp8", nargs="?", const="all", choices=("all", "experts"),
                   default=None,
                   help="keep an FP8 source's weights in FP8 (values and scales) for serving: "
                        "the routed experts, and the dense Linears (attention, dense and shared "
                        "MLPs, eh_proj) where the source stores them all in FP8; '--keep-fp8 "
                        "experts' keeps the experts only. The rest (and the dense Linears with "
                        "'experts') are dequantised to --dtype")
  imp.add_argument("--verify-data", action="store_true",
                   help="read every block back and compare before committing")
  exp = sub.add_parser("export", help="Orbax checkpoint (converted, or a training run's: its "
                       "out_dir, checkpoints/ or checkpoints/<step>) -> HF safetensors folder")
  exp.add_argument("ckpt_dir")
  exp.add_argument("hf_dir")
  exp.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="tensor dtype (default: each tensor's dtype in the imported folder; "
                        "float32 for a training run's checkpoint)")
  exp.add_argument("--max-shard-size", type=_size, default=5 * 2**30, metavar="SIZE",
                   help="largest main-model shard, e.g. 5GiB (default)")
  for s in (imp, exp):
    s.add_argument("--overwrite", action="store_true",
                   help="replace an existing destination, only if it is empty or ling_jax wrote "
                        "it (its ling_jax.json lists every entry in it); never one that is, "
                        "contains or lies inside the source")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--no-fsync", action="store_true",
                   help="skip fsync before the final rename (faster, not crash-safe)")
    s.add_argument("--stats-json", metavar="PATH", help="also write the summary as JSON here")
  args = p.parse_args(argv)

  from ling_jax.convert import export_hf, import_hf  # after argparse: --help stays instant
  # jax and flax leave ~10^6 objects that live to the end; without this the cyclic collector,
  # triggered by the conversion's own allocations, walks them all again and again (~0.5 s).
  gc.freeze()
  common = dict(overwrite=args.overwrite, progress=not args.no_progress,
                durable=not args.no_fsync)
  try:
    if args.command == "import":
      summary = import_hf(args.hf_dir, args.ckpt_dir,
                          None if args.dtype is None else DTYPES[args.dtype],
                          verify_data=args.verify_data, keep_fp8=args.keep_fp8 is not None,
                          fp8_linears=args.keep_fp8 != "experts", **common)
    else:
      summary = export_hf(args.ckpt_dir, args.hf_dir,
                          dtype=None if args.dtype is None else DTYPES[args.dtype],
                          max_shard_bytes=args.max_shard_size, **common)
  except (ValueError, OSError, RuntimeError) as e:  # bad input: the message names file and tensor
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(summary, file=sys.stderr)
  if args.stats_json:
    with open(args.stats_json, "w") as f:
      f.write(summary.to_json() + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
