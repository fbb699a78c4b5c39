"""Progress bars (bytes and tensors) and the end-of-run summary of a conversion."""

from __future__ import annotations

import dataclasses
import json
import resource
import time

from tqdm.auto import tqdm


def peak_rss_bytes() -> int:
  """Peak resident set size of this process (VmHWM; ru_maxrss where /proc is absent)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclasses.dataclass
class Summary:
  action: str            # "import" / "export"
  tensors: int           # checkpoint tensors (HF names) converted
  bytes: int             # bytes of those tensors in the source
  seconds: float         # wall time, everything included
  sync_seconds: float    # of which: waiting for the data to reach the disk (fsync) at the end
  peak_rss_bytes: int
  dtype: str | None = None       # import: the parameter dtype written
  dtype_from: str | None = None  # ... and why ("asked for", "config.json torch_dtype", ...)
  fp8: str | None = None         # import with keep_fp8: the format and which weights kept it

  @property
  def gb_per_s(self) -> float:
    return self.bytes / self.seconds / 1e9 if self.seconds else float("inf")

  def __str__(self) -> str:
    return (f"{self.action}: {self.tensors} tensors, {self.bytes / 2**30:.2f} GiB in "
            f"{self.seconds:.1f} s ({self.gb_per_s:.2f} GB/s; fsync {self.sync_seconds:.1f} s), "
            f"peak host memory {self.peak_rss_bytes / 2**30:.2f} GiB"
            + (f"; parameters in {self.dtype} ({self.dtype_from})" if self.dtype else "")
            + (f"; kept in {self.fp8}" if self.fp8 else ""))

  def to_json(self) -> str:
    return json.dumps({**dataclasses.asdict(self), "gb_per_s": self.gb_per_s})


class Progress:
  """A bytes bar whose postfix counts tensors; also times the run for the summary."""

  def __init__(self, desc: str, total_bytes: int, total_tensors: int, enabled: bool = True):
    self.start = time.perf_counter()
    self.total_tensors, self.tensors, self.bytes = total_tensors, 0, 0
    self.bar = tqdm(total=total_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    disable=not enabled, dynamic_ncols=True)
    self._postfix()

  def _postfix(self) -> None:
    self.bar.set_postfix_str(f"{self.tensors}/{self.total_tensors} tensors", refresh=False)

  def update(self, nbytes: int, tensors: int = 0) -> None:
    self.bytes += nbytes
    self.tensors += tensors
    self.bar.update(nbytes)
    if tensors:
      self._postfix()

  def close(self) -> None:
    self.bar.close()

  def summary(self, action: str, sync_seconds: float = 0.0) -> Summary:
    return Summary(action, self.tensors, self.bytes, time.perf_counter() - self.start,
                   sync_seconds, peak_rss_bytes())
