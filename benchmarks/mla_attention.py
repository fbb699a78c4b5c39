"""MLA's causal attention at training shapes: the materialised XLA path, the flash kernel, cuDNN.

  python -m benchmarks.mla_attention [--shapes small,flash] [--docs 4,16] [--no-xla]

bf16, packed rows (`--docs` equal documents per row, segment ids), forward and forward+backward
(grads of q, k, v), through `pallas_kernels.attention` as MLA calls it (a shared RoPE key).
"xla" is `attention_reference`, the fp32 [B, H, T, S] scores path; "flash" is jax's Pallas
flash-attention kernel (`flash_attention`) under a few block sizes (the first is `FLASH_BLOCKS`;
jax's own default backward blocks are 32 x 32); "cudnn packed" is `cudnn_attention` (cuDNN's
packed layout, its capacity M from `CUDNN_SEGMENT_LADDER`, or fixed
with `--max-segments`); "cudnn unpacked" is one causal sequence a row, segment ids ignored (the
work of an unpacked row). TFLOP/s counts every causal pair of the row, as the MFU numerator does
(forward+backward = 3x the forward), whether or not a path skips pairs across documents
(an earlier table counted them twice, at 3.5x). Prints a markdown table; rows go to
$OUT/mla_attention.json.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import guarded, time_jax
from pallas_kernels.attention import (FLASH_BLOCKS, attention_reference, cudnn_attention,
                                      flash_attention, flash_width)

SHAPES = {"small": dict(B=8, T=4096, H=8, K=64, R=32, V=64),    # ling_small
          "flash": dict(B=1, T=8192, H=32, K=128, R=64, V=128)}  # Ling-2.6-flash's MLA
BWD_BLOCKS = [dict(), dict(block_q_dkv=32, block_kv_dkv=32, block_q_dq=32, block_kv_dq=32),
              dict(block_q_dkv=32, block_kv_dkv=64, block_q_dq=64, block_kv_dq=32),
              dict(block_q_dkv=64, block_kv_dkv=128, block_q_dq=128, block_kv_dq=64)]


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--shapes", default="small,flash")
  ap.add_argument("--docs", default="4", help="documents per row, comma-separated")
  ap.add_argument("--no-xla", action="store_true")
  ap.add_argument("--max-segments", default="",
                  help="also time cuDNN's packed layout at these fixed capacities M (documents a "
                       "row), comma-separated")
  ap.add_argument("--blocks", default=None,
                  help="JSON list of block-size overrides to time instead of BWD_BLOCKS")
  a = ap.parse_args()
  if a.blocks:
    BWD_BLOCKS[:] = json.loads(a.blocks)
  rows = []
  for name, docs in ((n, int(d)) for n in a.shapes.split(",") for d in a.docs.split(",")):
    B, T, H, K, R, V = (SHAPES[name][k] for k in "BTHKRV")
    keys = jax.random.split(jax.random.key(0), 5)
    shapes = ((B, T, H, K), (B, T, H, R), (B, T, H, K), (B, T, R), (B, T, H, V))
    args = tuple(jax.random.normal(k, s, jnp.bfloat16) for k, s in zip(keys, shapes))
    seg = jnp.asarray(np.repeat(np.arange(docs), T // docs)[None].repeat(B, 0) + 1, jnp.int32)
    pos = jnp.asarray(np.tile(np.arange(T // docs), docs)[None].repeat(B, 0), jnp.int32)
    scale = (K + R) ** -0.5

    def op(fn, segment_ids=seg, **kw):  # (q_nope, q_pe, k_nope, k_pe, v) -> fn's output
      return lambda qn, qp, kn, kp, v: fn(qn, kn, v, scale=scale, q_rope=qp, k_rope=kp,
                                          segment_ids=segment_ids, **kw)

    fns = {} if a.no_xla else {"xla": op(attention_reference, positions=pos)}
    for i, blk in enumerate(BWD_BLOCKS):
      fns[f"flash{i}"] = op(flash_attention, blocks=blk)
    fns["cudnn packed"] = op(cudnn_attention)  # M from the ladder
    for m in filter(None, a.max_segments.split(",")):
      fns[f"cudnn packed, M={m}"] = op(cudnn_attention, ladder=(int(m),))
    fns["cudnn unpacked"] = op(cudnn_attention, segment_ids=None)
    # QK^T and PV over the causal half of [T, T] (2 FLOPs a multiply-add, T^2 / 2 pairs): the
    # forward's count as the MFU numerator has it (config.flops_per_token); x 3 for f+b.
    causal_flops = B * H * T * T * (K + R + V)
    for impl, f in fns.items():
      fwd = guarded(time_jax, jax.jit(f), *args)
      loss = lambda *x, f=f: jnp.sum(f(*x).astype(jnp.float32) ** 2)
      fb = guarded(time_jax, jax.jit(jax.grad(loss, argnums=range(5))), *args)
      base = FLASH_BLOCKS[max(128, flash_width(K + R, V, jnp.bfloat16))]
      blocks = {**base, **BWD_BLOCKS[int(impl[5:])]} if impl.startswith("flash") else None
      rows.append(dict(shape=name, docs=docs, impl=impl, blocks=blocks, fwd_s=fwd, fwdbwd_s=fb,
                       causal_flops=causal_flops))
      print("# " + json.dumps(rows[-1]), flush=True)
      if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "mla_attention.json"), "w") as fh:
          json.dump(rows, fh, indent=1)
  ms = lambda t: f"{t * 1e3:.3f}" if isinstance(t, float) else ("err" if t else "-")
  print("| shape | docs | impl | blocks (q, k; q_dkv, kv_dkv, q_dq, kv_dq) | fwd ms | fwd+bwd ms | f+b TFLOP/s |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    b = r["blocks"]
    bb = "-" if b is None else (f"{b['block_q']}, {b['block_k']}; {b['block_q_dkv']}, {b['block_kv_dkv']}, "
                                f"{b['block_q_dq']}, {b['block_kv_dq']}")
    tf = f"{3 * r['causal_flops'] / r['fwdbwd_s'] / 1e12:.0f}" if isinstance(r["fwdbwd_s"], float) else "-"
    print(f"| {r['shape']} | {r['docs']} | {'flash' if r['blocks'] else r['impl']} | {bb} | {ms(r['fwd_s'])} | {ms(r['fwdbwd_s'])} | {tf} |")


if __name__ == "__main__":
  main()
