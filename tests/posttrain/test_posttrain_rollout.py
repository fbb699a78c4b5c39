"""Episodes and shortest-correct distillation with a scripted sampler: the rollout's token and
mask bookkeeping, its rewards (right, wrong, unfinished, a bad tool call), and `run_distill`
end to end (it keeps the shortest correct answer and trains on it)."""

import dataclasses
import json
import os

import numpy as np
import pytest

from experiments import distill_tiny
from ling_jax.config import ling_tiny
from ling_jax.data.tokenizer import ByteTokenizer
from ling_jax.posttrain import rollout as rollout_module
from ling_jax.posttrain.chat import BUILTIN, encode_chat
from ling_jax.posttrain.distill_loop import run_distill
from ling_jax.posttrain.rollout import rollout
from ling_jax.posttrain.tasks import arithmetic_task
from ling_jax.posttrain.tool_task import tool_task

TOK = ByteTokenizer()


class Script:
  """A stand-in for `sampler.generate_rows`: row r of call c answers script[c][r] (bytes, padded
  with "x" to max_new_tokens), and every prompt it saw is kept."""

  def __init__(self, script):
    self.script, self.calls, self.prompts = script, 0, []

  def __call__(self, model, prompts, max_new_tokens, *, temperature, seed):
    texts = self.script[min(self.calls, len(self.script) - 1)]
    self.calls += 1
    self.prompts.append([np.asarray(p) for p in prompts])
    out = []
    for p, text in zip(prompts, texts):
      ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32)[:max_new_tokens]
      out.append(np.concatenate([ids, np.full(max_new_tokens - len(ids), ord("x"), np.int32)]))
    return out


def test_single_turn_episodes(monkeypatch):
  task = arithmetic_task(5, steps=1)
  wrong = int(task.answer) + 1
  script = Script([[f"Answer: {task.answer}<|end|>", f"So.\nAnswer: {task.answer}<|end|>",
                    f"Answer: {wrong}<|end|>", f"Answer: {task.answer}"]])
  monkeypatch.setattr(rollout_module, "generate_rows", script)
  eps = rollout(None, [task], TOK, BUILTIN, samples=4, temperature=1.0, max_new_tokens=24)
  assert [e.reward for e in eps] == [1.0, 1.0, 0.0, 0.0]
  assert "no end of turn" in eps[3].reason  # the right answer, never ended: not an answer
  short = f"Answer: {task.answer}<|end|>"
  assert eps[0].length == len(short) and eps[3].length == 24
  for e in eps[:3]:
    # The tokens are the prompt followed by what was sampled, exactly the SFT encoding of the
    # conversation; the mask marks the sampled tokens.
    tokens, mask = encode_chat(e.messages, TOK, BUILTIN)
    np.testing.assert_array_equal(e.tokens, tokens)
    np.testing.assert_array_equal(e.mask, mask)
  assert eps[1].answer == [{"role": "assistant", "content": f"So.\nAnswer: {task.answer}"}]


def test_tool_episode_turns_and_a_bad_call(monkeypatch):
  task = tool_task(3, items=1)
  (item, qty), = task.data["asked"]
  price = task.data["table"][item]
  lookup = json.dumps({"tool": "lookup", "args": {"item": item}})
  script = Script([[f"{lookup}<|end|>", f"{lookup}<|end|>"],
                   [f"Answer: {qty * price}<|end|>", '{"tool": "calc", "args": <|end|>']])
  monkeypatch.setattr(rollout_module, "generate_rows", script)
  good, bad = rollout(None, [task], TOK, BUILTIN, samples=2, temperature=1.0, max_new_tokens=80)
  assert good.reward == 1.0 and bad.reward == 0.0 and "JSON" in bad.reason
  # The second turn's prompt holds the tool's answer, which is not the model's (mask 0).
  assert [m["role"] for m in good.messages] == ["system", "user", "assistant", "tool", "assistant"]
  assert good.messages[3]["content"] == str(price)
  tokens, mask = encode_chat(good.messages, TOK, BUILTIN)
  np.testing.assert_array_equal(good.tokens, tokens)
  np.testing.assert_array_equal(good.mask, mask)
  np.testing.assert_array_equal(script.prompts[1][0], good.tokens[:len(script.prompts[1][0])])
  assert good.length == len(f"{lookup}<|end|>") + len(f"Answer: {qty * price}<|end|>")


def test_distill_keeps_the_shortest_correct_answer_and_trains(monkeypatch, tmp_path):
  exp = distill_tiny.config()
  out = str(tmp_path / "distill")
  exp = dataclasses.replace(
      exp, model=ling_tiny(num_hidden_layers=2), start=dataclasses.replace(exp.start, init=None),
      tasks=dataclasses.replace(exp.tasks, eval_prompts=1),
      distill=dataclasses.replace(exp.distill, prompts=2, samples=3, max_new_tokens=40,
                                  seq_len=96, batch_size=2),
      eval=dataclasses.replace(exp.eval, max_new_tokens=40),
      train=dataclasses.replace(exp.train, steps=2, out_dir=out, async_checkpoint=False))

  def answers(model, prompts, max_new_tokens, *, temperature, seed):
    """Per prompt: a long right answer, a wrong one, a short right one (the task is read back
    from the prompt's text)."""
    out = []
    for i, p in enumerate(prompts):
      expr = TOK.decode(p).split("Compute ")[1].split(".<|end|>")[0]
      right = eval(expr)  # the tasks' own expressions: digits and + - * ( )
      text = [f"Let me think it over.\nAnswer: {right}<|end|>", f"Answer: {right + 1}<|end|>",
              f"Answer: {right}<|end|>"][i % 3]
      ids = np.frombuffer(text.encode(), np.uint8).astype(np.int32)
      out.append(np.concatenate([ids, np.full(max_new_tokens - len(ids), 120, np.int32)]))
    return out

  monkeypatch.setattr(rollout_module, "generate_rows", answers)
  summary = run_distill(exp)
  with open(os.path.join(out, "distilled.json")) as f:
    picked = json.load(f)
  assert picked["samples"]["accuracy"] == pytest.approx(2 / 3) and picked["samples"]["kept"] == 2
  for conv in picked["conversations"]:
    assert conv[-1]["content"].startswith("Answer: ")  # the short one, not the long one
  assert summary["after"]["n"] == 1 and summary["steps"] == 2
