"""Device time per source line: a `jax.profiler` Perfetto trace's device ops, mapped through the
compiled HLO's metadata to the Python lines that produced them (benchmarks/profile_step.py for a
train step, benchmarks/moe_parts.py for one layer)."""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re

_META = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{([^}]*)\}')
_OURS = ("ling_jax", "pallas_kernels", "benchmarks", "experiments")


def _tables(hlo_text: str):
  """The module's FileNames / FileLocations / StackFrames tables (newer XLA keeps source
  positions there, referenced by each instruction's stack_frame_id)."""
  tables, cur = collections.defaultdict(dict), None
  for line in hlo_text.splitlines():
    if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
      cur = line
    elif not line.strip() or line.startswith(("%", "HloModule", "ENTRY")):
      cur = None
    elif cur:
      key, _, rest = line.partition(" ")
      tables[cur][int(key)] = rest
  return tables


def hlo_sources(hlo_text: str) -> dict[str, tuple[str, str]]:
  """instruction name -> ("file:line", op_name): the innermost frame in this project's code."""
  tab = _tables(hlo_text)
  files = {k: v.strip('"') for k, v in tab["FileNames"].items()}
  num = lambda text, key: int(re.search(rf"\b{key}=(\d+)", text).group(1))

  def where(frame: int) -> str:
    first = None
    while frame and frame in tab["StackFrames"]:
      loc = tab["FileLocations"][num(tab["StackFrames"][frame], "file_location_id")]
      path = os.path.relpath(files[num(loc, "file_name_id")])
      here = f"{path}:{num(loc, 'line')}"
      if path.startswith(_OURS):
        return here
      first = first or here
      parent = num(tab["StackFrames"][frame], "parent_frame_id")
      frame = parent if parent != frame else 0
    return first or "?:?"

  out = {}
  for line in hlo_text.splitlines():
    m = _META.match(line)
    if not m:
      continue
    meta = m.group(2)
    op = re.search(r'op_name="([^"]*)"', meta)
    f = re.search(r'source_file="([^"]*)"', meta)
    if f:  # older XLA: the position inline
      loc = f"{os.path.relpath(f.group(1))}:{re.search(r'source_line=(\d+)', meta).group(1)}"
    else:
      sf = re.search(r"stack_frame_id=(\d+)", meta)
      loc = where(int(sf.group(1))) if sf else "?:?"
    out[m.group(1)] = (loc, op.group(1) if op else "")
  return out


def device_ops(trace_dir: str) -> list[tuple[str, str, float]]:
  """(hlo_op, kernel name, microseconds) of every device op in the newest Perfetto trace."""
  path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True))[-1]
  with gzip.open(path) as f:
    events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  procs = {e["pid"]: e["args"]["name"] for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  gpu = {p for p, n in procs.items() if "GPU" in n or "gpu" in n}
  keep = (lambda e: e.get("pid") in gpu) if gpu else (lambda e: True)  # CPU: host threads
  return [(e["args"]["hlo_op"], e["name"], float(e.get("dur", 0.0))) for e in events
          if e.get("ph") == "X" and keep(e) and "hlo_op" in e.get("args", {})]


def summarise(ops, sources, steps: int):
  """Per-step microseconds by (file, pass) and by op; pass is "bwd" for ops of a transpose."""
  by_file, by_op, names = collections.Counter(), collections.Counter(), {}
  for hlo_op, kernel, us in ops:
    where, op_name = sources.get(hlo_op, ("?:?", ""))
    by_file[where.rsplit(":", 1)[0], "bwd" if "transpose(" in op_name else "fwd"] += us / steps
    by_op[hlo_op] += us / steps
    names[hlo_op] = (kernel, where, op_name.rsplit("/", 2)[-2:] if op_name else "")
  return by_file, by_op, names
