"""HF -> Orbax conversion at Ling-2.6-flash widths: throughput and peak host memory vs layer count.

  python -m benchmarks.convert [--layers 2 3] [--workdir DIR] [--dest DIR] [--export]
                               [--no-fsync] [--drop-caches] [--keep]

For each layer count a subprocess writes a synthetic checkpoint with the flash widths (hidden 4096,
256 experts of 1024, vocab 157184, dense layer 0 of 9216; layer_group_size 2 so that the few
layers hold a Lightning and MLA layers; no MTP) in the release layout, streaming (one tensor in
memory at a time); then `python -m ling_jax.convert import` runs alone in a fresh subprocess. The
table gives its wall time, GB/s (source bytes / wall time, final fsync included) and peak resident
memory (the converter's own VmHWM, read in the child). Peak memory should not depend on the layer
count: the converter holds only the blocks in flight.

Where the time goes on a small machine: the checkpoint is as big as the source, so end to end the
conversion cannot beat the disk's write bandwidth (`dd ... oflag=direct` measures it; a buffered
`dd` on this VM mostly measures the first touch of fresh page-cache pages). `--dest /dev/shm/x
--no-fsync` puts the checkpoint in RAM; on this VM that is no faster than the disk, because tmpfs
pages cannot be recycled the way the converter recycles the page cache of a real disk
(`ling_jax.convert.pagecache`). `--export` also times the way back and checks a sample of tensors
bit for bit. `--drop-caches` (root) makes the converter read the source from disk rather than from
the page cache the generator filled.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import ml_dtypes
import numpy as np

from ling_jax.config import ling_2_6_flash
from ling_jax.hf_config import to_hf_config
from ling_jax.io.safetensors import SafetensorsFile, write_safetensors

POOL_BYTES = 64 * 2**20
SHARD_BYTES = 4 * 2**30


def flash_config(layers: int):
  return ling_2_6_flash(num_hidden_layers=layers, layer_group_size=2, num_nextn_predict_layers=0)


class _Synthetic:
  """A bf16 tensor produced on demand from a shared random pool (finite values, |x| < 2)."""

  def __init__(self, shape, pool: np.ndarray, seed: int):
    self.shape, self.dtype, self._pool, self._seed = tuple(shape), np.dtype(ml_dtypes.bfloat16), \
        pool, seed

  def __array__(self, dtype=None, copy=None):
    n = int(np.prod(self.shape))
    out = np.empty(n, np.uint16)
    start = (self._seed * 7919) % self._pool.size
    pos = 0
    while pos < n:
      take = min(n - pos, self._pool.size - start)
      out[pos:pos + take] = self._pool[start:start + take]
      pos, start = pos + take, 0
    return out.view(ml_dtypes.bfloat16).reshape(self.shape)


def write_synthetic(folder: str, layers: int) -> int:
  """The release layout (shards of <= 4 GiB in checkpoint order, index, config.json); bytes."""
  from ling_jax.convert.importer import state_layout

  cfg = flash_config(layers)
  maps, variables = state_layout(cfg, ml_dtypes.bfloat16)
  rng = np.random.default_rng(0)
  pool = rng.integers(0, 2**16, POOL_BYTES // 2, dtype=np.uint16) & np.uint16(0xBFFF)
  os.makedirs(folder, exist_ok=True)
  shards, cur, size = [], {}, 0
  for k, m in enumerate(maps):
    shape = m.hf_shape(variables[m.path][0][len(m.index):])
    nbytes = int(np.prod(shape)) * 2
    if cur and size + nbytes > SHARD_BYTES:
      shards.append(cur)
      cur, size = {}, 0
    value = _Synthetic(shape, pool, k)
    if m.name.endswith("expert_bias"):  # fp32 in the release (docs/architecture.md §4.2)
      value = np.zeros(shape, np.float32)
    cur[m.name] = value
    size += nbytes
  shards.append(cur)
  weight_map, total = {}, 0
  for i, tensors in enumerate(shards):
    fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    total += write_safetensors(os.path.join(folder, fname), tensors, metadata={"format": "pt"})
    weight_map.update({n: fname for n in tensors})
  with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({**to_hf_config(cfg), "torch_dtype": "bfloat16"}, f, indent=2)
  return total


def _drop_page_cache() -> bool:
  """So the converter reads from disk, not from what the generator just wrote (needs root)."""
  try:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3\n")
    return True
  except OSError:
    return False


def run_child(args: list[str]) -> dict:
  """Run `python -m ling_jax.convert ...` alone in a fresh process; its summary (peak RSS is the
  child's own VmHWM: wait4's ru_maxrss would also count the parent's pages it forked from)."""
  stats = os.path.join(os.path.dirname(args[-1]) or ".", f".stats-{os.getpid()}.json")
  cmd = [sys.executable, "-m", "ling_jax.convert", *args, "--no-progress", "--stats-json", stats]
  t0 = time.perf_counter()
  proc = subprocess.Popen(cmd)
  _, status = os.waitpid(proc.pid, 0)
  wall = time.perf_counter() - t0
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
  with open(stats) as f:
    out = json.load(f)
  os.remove(stats)
  out.update(child_wall_s=wall)
  return out


def _gib(n: int) -> str:
  return f"{n / 2**30:.2f}"


def check_sample(src: str, out: str, names: list[str]) -> None:
  files = {}
  for folder in (src, out):
    with open(os.path.join(folder, "model.safetensors.index.json")) as f:
      files[folder] = json.load(f)["weight_map"]
  for name in names:
    with SafetensorsFile(os.path.join(src, files[src][name])) as a, \
        SafetensorsFile(os.path.join(out, files[out][name])) as b:
      x, y = a.get(name), b.get(name)
      if x.dtype != y.dtype or x.shape != y.shape or not np.array_equal(
          x.view(np.uint8), y.view(np.uint8)):
        raise SystemExit(f"export differs from the source for {name}")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
  p.add_argument("--layers", type=int, nargs="+", default=[2, 3])
  p.add_argument("--workdir", default="/tmp/ling-convert-bench")
  p.add_argument("--dest", default=None, help="where the checkpoint goes (default: workdir)")
  p.add_argument("--export", action="store_true", help="also time export and check a sample")
  p.add_argument("--no-fsync", action="store_true", help="pass --no-fsync to the converter")
  p.add_argument("--keep", action="store_true", help="keep the folders")
  p.add_argument("--drop-caches", action="store_true",
                 help="sync and drop the page cache before each conversion (root; system-wide)")
  p.add_argument("--generate", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.generate:
    write_synthetic(args.generate[0], int(args.generate[1]))
    return

  rows = []
  for layers in args.layers:
    src = os.path.join(args.workdir, f"hf-{layers}l")
    ckpt = os.path.join(args.dest or args.workdir, f"ckpt-{layers}l")
    out = os.path.join(args.workdir, f"hf-{layers}l-out")
    for d in (src, ckpt, out):
      shutil.rmtree(d, ignore_errors=True)
    t0 = time.perf_counter()
    # In a subprocess, so that this process stays small while the conversions run.
    subprocess.run([sys.executable, "-m", "benchmarks.convert", "--generate", src, str(layers)],
                   check=True)
    nbytes = sum(os.path.getsize(os.path.join(src, f)) for f in os.listdir(src)
                 if f.endswith(".safetensors"))
    gen_s = time.perf_counter() - t0
    print(f"[{layers} layers] wrote {nbytes / 2**30:.2f} GiB synthetic checkpoint in {gen_s:.0f} s",
          flush=True)
    cold = args.drop_caches and _drop_page_cache()
    extra = ["--no-fsync"] if args.no_fsync else []
    imp = run_child(["import", src, ckpt, "--dtype", "bfloat16", *extra])
    row = {"layers": layers, "bytes": nbytes, "cold_cache": cold, "import": imp}
    print(f"[{layers} layers] import: {imp['gb_per_s']:.3f} GB/s ({imp['seconds']:.1f} s, fsync "
          f"{imp['sync_seconds']:.1f} s), peak RSS {_gib(imp['peak_rss_bytes'])} GiB", flush=True)
    if args.export:
      if args.drop_caches:
        _drop_page_cache()
      exp = run_child(["export", ckpt, out, *extra])
      check_sample(src, out, ["model.word_embeddings.weight", "lm_head.weight",
                              f"model.layers.{layers - 1}.mlp.experts.255.down_proj.weight",
                              "model.layers.0.attention.query_key_value.weight"])
      row["export"] = exp
      print(f"[{layers} layers] export: {exp['gb_per_s']:.3f} GB/s ({exp['seconds']:.1f} s), "
            f"peak RSS {_gib(exp['peak_rss_bytes'])} GiB; sample bit-exact", flush=True)
    rows.append(row)
    if not args.keep:
      for d in (src, ckpt, out):
        shutil.rmtree(d, ignore_errors=True)

  print("\n| layers | source GiB | import GB/s | import s (fsync s) | import peak RSS GiB |"
        + (" export GB/s | export peak RSS GiB |" if args.export else ""))
  print("|---|---|---|---|---|" + ("---|---|" if args.export else ""))
  for r in rows:
    i = r["import"]
    line = (f"| {r['layers']} | {r['bytes'] / 2**30:.2f} | {i['gb_per_s']:.3f} | "
            f"{i['seconds']:.1f} ({i['sync_seconds']:.1f}) | {_gib(i['peak_rss_bytes'])} |")
    if "export" in r:
      e = r["export"]
      line += f" {e['gb_per_s']:.3f} | {_gib(e['peak_rss_bytes'])} |"
    print(line)
  if os.environ.get("OUT"):
    with open(os.path.join(os.environ["OUT"], "convert_bench.json"), "w") as f:
      json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
