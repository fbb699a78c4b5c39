"""What a run reports: MFU, the unigram baseline, the metrics log and the loss-curve PNG."""

from __future__ import annotations

import json
import os

import jax
import numpy as np

# Dense bf16 peak FLOP/s per device (vendor datasheets, without sparsity). Most specific first.
PEAK_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H20", 148e12),
    ("A100", 312e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops(device: jax.Device | None = None) -> float | None:
  """The device kind's dense bf16 peak, or None when unknown (e.g. CPU: MFU is then not shown)."""
  kind = (device or jax.devices()[0]).device_kind
  for name, flops in PEAK_FLOPS:
    if name.lower() in kind.lower():
      return flops
  return None


def unigram_baseline(train_batches, eval_batches, vocab_size: int) -> float:
  """Cross-entropy (nats) of the eval targets under the training tokens' unigram distribution
  (add-one smoothed): the loss of a model that ignores context, which training must beat."""
  counts = np.ones(vocab_size, np.float64)
  for b in train_batches:
    counts += np.bincount(b["tokens"][b["segment_ids"] > 0].ravel(), minlength=vocab_size)[:vocab_size]
  logp = np.log(counts / counts.sum())
  total, n = 0.0, 0
  for b in eval_batches:
    seg = b["segment_ids"]
    valid = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0)
    total -= logp[b["tokens"][:, 1:][valid]].sum()
    n += int(valid.sum())
  return total / max(n, 1)


class MetricsLog:
  """metrics.jsonl: one JSON record per step. On resume the records after the restored step (from
  the killed process) are dropped, so the file always describes one uninterrupted run."""

  def __init__(self, path: str, resume_step: int):
    self.path = path
    kept = [r for r in read_metrics(path) if r["step"] <= resume_step]
    with open(path, "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in kept)

  def write(self, records: list[dict]) -> None:
    with open(self.path, "a") as f:
      f.writelines(json.dumps(r) + "\n" for r in records)


def read_metrics(path: str) -> list[dict]:
  """The complete records of a metrics.jsonl (a line cut by a kill is skipped)."""
  if not os.path.exists(path):
    return []
  out = []
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        pass
  return out


def write_loss_curve(path: str, records: list[dict], *, eval_loss: float | None,
                     unigram: float | None) -> bool:
  """The training (and MTP) loss per step with the final eval loss and the unigram baseline."""
  try:
    # A Figure of its own, drawn by the Agg canvas savefig picks for a PNG: no pyplot, so the
    # process's backend is left alone (switching it to Agg silenced a notebook's inline figures).
    from matplotlib.figure import Figure
  except ImportError:
    print("matplotlib is not installed: no loss curve written")
    return False
  steps = [r["step"] for r in records]
  fig = Figure(figsize=(7, 4), dpi=100)
  ax = fig.subplots()
  ax.plot(steps, [r["ce"] for r in records], lw=1, label="train cross-entropy")
  if records and "mtp" in records[0]:
    ax.plot(steps, [r["mtp"] for r in records], lw=1, alpha=0.6, label="train MTP (token t+2)")
  if unigram is not None:
    ax.axhline(unigram, color="gray", ls="--", lw=1, label=f"unigram baseline {unigram:.3f}")
  if eval_loss is not None and steps:
    ax.plot([steps[-1]], [eval_loss], "o", color="C3", label=f"final eval {eval_loss:.3f}")
  ax.set_xlabel("step")
  ax.set_ylabel("loss (nats / token)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path)
  return True
