"""Generation with the decode cache (docs/architecture.md §5): chunked prefill, a jitted decode
loop over a fixed batch of slots, MTP speculative decoding, sampling, and a command line.

    from ling_jax.generate import generate
    out = generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=32, mtp_draft=1)
    out.tokens, out.lengths, out.logprobs, out.acceptance

    python -m ling_jax.generate CKPT_OR_HF_DIR --prompt "..."      (python -m ... --help)

api.py (`generate`, `stream`, `Generation`), sampling.py (temperature, top-k, top-p), engine.py
(prefill chunks, the decode loop), speculative.py (MTP drafts, verification, the Lightning states'
commit), slots.py (what the loop carries), cli.py (the command line).
"""

_API = {"Generation": "api", "generate": "api", "prompt_array": "api", "stream": "api",
        "Sampling": "sampling", "log_probs": "sampling", "sample": "sampling"}


def __getattr__(name):
  # On first use, so that `python -m ling_jax.generate --help` and bad input answer without jax.
  if name in _API:
    import importlib
    return getattr(importlib.import_module(f"ling_jax.generate.{_API[name]}"), name)
  raise AttributeError(f"module 'ling_jax.generate' has no attribute {name!r}")


__all__ = ["Generation", "Sampling", "generate", "log_probs", "prompt_array", "sample", "stream"]
