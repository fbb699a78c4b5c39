"""Shortest-correct-response distillation: keep, per prompt, the shortest of n sampled answers that
the checker accepts, and fine-tune on those (docs/posttrain.md, "Shortest-correct distillation").

Length is the number of output tokens the model generated for the answer (assistant tokens only:
prompt and tool messages do not count), so "capability per output token" is accuracy against
mean length. `answer_stats` gives both, before (on the samples) and after (on the distilled
model's samples, drawn the same way).
"""

from __future__ import annotations

from typing import Sequence


def shortest_correct(samples: Sequence, rewards: Sequence[float], lengths: Sequence[int],
                     threshold: float = 1.0) -> int | None:
  """The index of the shortest sample with reward >= threshold (the first on ties), or None."""
  if not len(samples) == len(rewards) == len(lengths):
    raise ValueError(f"{len(samples)} samples, {len(rewards)} rewards, {len(lengths)} lengths")
  ok = [i for i in range(len(samples)) if rewards[i] >= threshold]
  return min(ok, key=lambda i: (lengths[i], i)) if ok else None


def answer_stats(rewards: Sequence[float], lengths: Sequence[int], threshold: float = 1.0) -> dict:
  """{n, accuracy, mean_length, mean_correct_length (None if nothing is correct)}."""
  n = len(rewards)
  if n == 0 or n != len(lengths):
    raise ValueError(f"need as many lengths as rewards (>= 1), got {n} and {len(lengths)}")
  correct = [l for r, l in zip(rewards, lengths) if r >= threshold]
  return {"n": n, "accuracy": len(correct) / n, "mean_length": sum(lengths) / n,
          "mean_correct_length": sum(correct) / len(correct) if correct else None}


def distill(groups: Sequence[dict], threshold: float = 1.0) -> tuple[list[list[dict]], dict]:
  """(SFT conversations, stats of all samples) from groups {prompt: messages, samples: [the
  messages that followed the prompt], rewards: [n], lengths: [n]}; prompts with no correct
  sample give no conversation (stats["kept"] counts those that did)."""
  convs, rewards, lengths = [], [], []
  for g in groups:
    i = shortest_correct(g["samples"], g["rewards"], g["lengths"], threshold)
    if i is not None:
      convs.append(list(g["prompt"]) + list(g["samples"][i]))
    rewards += list(g["rewards"])
    lengths += list(g["lengths"])
  stats = answer_stats(rewards, lengths, threshold)
  stats["kept"] = len(convs)
  return convs, stats
