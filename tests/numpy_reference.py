"""A float64 NumPy reading of docs/architecture.md §3.2, 3.5-3.7 and 3.9, on HF-layout tensors by
name.

Independent of the JAX model code: it takes the PyTorch-layout weights ([out, in]) keyed by their
checkpoint names and follows the spec's formulas literally, loops and all. Used for the MTP layer,
which mlx-lm does not implement, and for the router.
"""

import numpy as np


def rms(x, w, eps):
  return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def rope_interleaved(x, pos, theta):
  """GPT-J pairs (2j, 2j+1) rotated by pos * theta^(-2j/R) (docs/architecture.md §3.5.3). x [..., T,
  R]."""
  R = x.shape[-1]
  inv = theta ** (-np.arange(0, R, 2) / R)
  ang = pos[:, None] * inv[None, :]  # [T, R/2]
  c, s = np.cos(ang), np.sin(ang)
  out = x.copy()
  out[..., 0::2] = x[..., 0::2] * c - x[..., 1::2] * s
  out[..., 1::2] = x[..., 1::2] * c + x[..., 0::2] * s
  return out


def mla(W, p, a, pos, cfg):
  """Plain MLA of docs/architecture.md §3.5 for one sequence a [T, D]."""
  H, K, R, Vd, Lr = (cfg["num_attention_heads"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"],
                     cfg["v_head_dim"], cfg["kv_lora_rank"])
  eps, theta = cfg["rms_norm_eps"], cfg["rope_theta"]
  T = a.shape[0]
  if cfg.get("q_lora_rank") is None:
    q = a @ W[f"{p}.q_proj.weight"].T
  else:
    cq = rms(a @ W[f"{p}.q_a_proj.weight"].T, W[f"{p}.q_a_layernorm.weight"], eps)
    q = cq @ W[f"{p}.q_b_proj.weight"].T
  q = q.reshape(T, H, K + R).transpose(1, 0, 2)  # [H, T, K+R]
  ckv = a @ W[f"{p}.kv_a_proj_with_mqa.weight"].T
  c, k_pe = rms(ckv[:, :Lr], W[f"{p}.kv_a_layernorm.weight"], eps), ckv[:, Lr:]
  kv = (c @ W[f"{p}.kv_b_proj.weight"].T).reshape(T, H, K + Vd).transpose(1, 0, 2)
  q_pe = rope_interleaved(q[..., K:], pos, theta)
  k_pe = rope_interleaved(k_pe, pos, theta)
  scores = (q[..., :K] @ kv[..., :K].transpose(0, 2, 1) + q_pe @ k_pe.T) / np.sqrt(K + R)
  scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
  p_ = np.exp(scores - scores.max(-1, keepdims=True))
  p_ /= p_.sum(-1, keepdims=True)
  o = (p_ @ kv[..., K:]).transpose(1, 0, 2).reshape(T, H * Vd)
  return o @ W[f"{p}.dense.weight"].T


def swiglu(W, p, x):
  g, u = x @ W[f"{p}.gate_proj.weight"].T, x @ W[f"{p}.up_proj.weight"].T
  return (g / (1 + np.exp(-g)) * u) @ W[f"{p}.down_proj.weight"].T


def route(W, p, x, cfg):
  """docs/architecture.md §3.7 steps 1-5 for one token x [D] -> (expert ids, weights)."""
  E, G, TG, X = cfg["num_experts"], cfg["n_group"], cfg["topk_group"], cfg["num_experts_per_tok"]
  s = 1 / (1 + np.exp(-(W[f"{p}.gate.weight"] @ x)))
  b = s + W[f"{p}.gate.expert_bias"]
  if TG < G:
    groups = b.reshape(G, E // G)
    gscore = np.sort(groups, axis=-1)[:, -2:].sum(-1)
    keep = np.argsort(-gscore)[:TG]
    masked = np.full_like(groups, -np.inf)
    masked[keep] = groups[keep]
    b = masked.reshape(E)
  ids = np.argsort(-b)[:X]
  w = s[ids] / (s[ids].sum() + 1e-20) * cfg["routed_scaling_factor"]
  return ids, w


def moe(W, p, x, cfg):
  out = np.zeros_like(x)
  for t in range(x.shape[0]):
    ids, w = route(W, p, x[t], cfg)
    for e, wt in zip(ids, w):
      out[t] += wt * swiglu(W, f"{p}.experts.{e}", x[t])
  if cfg["num_shared_experts"]:
    out += swiglu(W, f"{p}.shared_experts", x)
  return out


def mtp_logits(W, cfg, hidden, tokens):
  """docs/architecture.md §3.9 for one sequence: hidden [T, D] (post final norm), tokens [T] ->
  logits [T, vocab]."""
  L, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
  p = f"model.layers.{L}"
  nxt = np.concatenate([tokens[1:], tokens[-1:]])
  e = rms(W["model.word_embeddings.weight"][nxt], W[f"{p}.enorm.weight"], eps)
  g = rms(hidden, W[f"{p}.hnorm.weight"], eps)
  h = np.concatenate([e, g], axis=-1) @ W[f"{p}.eh_proj.weight"].T
  pos = np.arange(len(tokens), dtype=np.float64)
  h = h + mla(W, f"{p}.attention", rms(h, W[f"{p}.input_layernorm.weight"], eps), pos, cfg)
  h = h + moe(W, f"{p}.mlp", rms(h, W[f"{p}.post_attention_layernorm.weight"], eps), cfg)
  return rms(h, W[f"{p}.final_layernorm.weight"], eps) @ W["lm_head.weight"].T
