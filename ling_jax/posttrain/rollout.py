"""Episodes: a model answers verifiable tasks, single-turn or through the tool environment, and the
checkers score them (docs/posttrain.md, "Training loops").

An `Episode` keeps the conversation as messages (for SFT on it: shortest-correct distillation)
and as the exact token ids the sampler saw and produced (for RL: the learner scores the very
tokens that were sampled, with `mask` 1 on the model's own tokens). Each assistant turn is
generated after the template's generation prompt and cut at its end-of-turn marker (included in
the tokens and the length). A turn that never reaches the marker within `max_new_tokens` ends
the episode with reward 0 (a truncated answer is not an answer), which also keeps every trained
token sequence one the template could have produced.

Multi-turn (tool) episodes append, before each turn, what the template renders after the text
so far (the tool message and the next generation prompt), found as `chat.chat_pieces` finds it:
the rendering must extend the text so far, else a ChatError names the turn.

Length is output tokens: the tokens the model generated, over all its turns.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ling_jax.posttrain.chat import ChatError, encode_prompt
from ling_jax.posttrain.init import stop_ids
from ling_jax.posttrain.sampler import cut_at_stop, generate_rows
from ling_jax.posttrain.tasks import Task, check, make_task
from ling_jax.posttrain.tool_task import ToolEnv


@dataclasses.dataclass
class Episode:
  """One sampled answer (all its turns) to one task."""

  task: Task
  messages: list[dict]   # the prompt messages, then the assistant (and tool) turns
  prompt_messages: int   # how many of `messages` are the prompt
  tokens: np.ndarray     # [L] int32: the prompt and every turn, as sampled
  mask: np.ndarray       # [L] int32: 1 on the model's own tokens
  reward: float = 0.0
  reason: str = ""
  done: bool = False

  @property
  def length(self) -> int:
    return int(self.mask.sum())

  @property
  def answer(self) -> list[dict]:
    """The messages after the prompt (what distillation keeps)."""
    return self.messages[self.prompt_messages:]

  @property
  def text(self) -> str:
    return "\n".join(m["content"] for m in self.answer if m["role"] == "assistant")


def prompt_messages(task: Task) -> list[dict]:
  """What the model sees before its first turn."""
  if task.kind == "tool":
    return [dict(m) for m in ToolEnv(task).messages]
  return [{"role": "user", "content": task.prompt}]


def select_tasks(kinds, difficulty: int, seeds, count: int, *, tokenizer=None, template=None,
                 prompt_tokens: int = 0) -> list[Task]:
  """The first `count` tasks drawn from `seeds` (kinds round-robin by seed), keeping only those
  whose generation prompt is exactly `prompt_tokens` tokens when that is > 0 (the sampler
  compiles once per prompt length). ValueError when the seeds run out first."""
  out = []
  for seed in seeds:
    task = make_task(kinds[seed % len(kinds)], seed, difficulty)
    if prompt_tokens and len(encode_prompt(prompt_messages(task), tokenizer,
                                           template)) != prompt_tokens:
      continue
    out.append(task)
    if len(out) == count:
      return out
  raise ValueError(f"only {len(out)} of the {count} tasks asked for (kinds {tuple(kinds)}, "
                   f"difficulty {difficulty}) have prompts of tasks.prompt_tokens={prompt_tokens} "
                   "tokens in the seed range; change prompt_tokens (0: any) or the counts")


def _text(ids, tokenizer) -> str:
  return tokenizer.decode(np.asarray(ids, np.int32)) if len(ids) else ""


def rollout(model, tasks: list[Task], tokenizer, template, *, samples: int, temperature: float,
            max_new_tokens: int, max_turns: int = 8, seed: int = 0) -> list[Episode]:
  """`samples` episodes per task, laid out task by task (a task's episodes are consecutive: a
  GRPO group), each played to its end and scored."""
  stop = stop_ids(template, tokenizer)
  episodes, rendered, envs = [], [], []
  for task in tasks:
    for _ in range(samples):
      msgs = prompt_messages(task)
      ids = encode_prompt(msgs, tokenizer, template)
      episodes.append(Episode(task, msgs, len(msgs), ids, np.zeros(len(ids), np.int32)))
      rendered.append(template.render(msgs, add_generation_prompt=True))
      envs.append(ToolEnv(task, max_turns) if task.kind == "tool" else None)
  for turn in range(max_turns):
    active = [i for i, e in enumerate(episodes) if not e.done]
    if not active:
      break
    outs = generate_rows(model, [episodes[i].tokens for i in active], max_new_tokens,
                         temperature=temperature, seed=seed * 7919 + turn)
    for i, out in zip(active, outs):
      _turn(episodes[i], envs[i], out, stop, tokenizer, template, rendered, i, turn)
  for e in episodes:
    if not e.done:
      e.done, e.reward, e.reason = True, 0.0, f"no answer within {max_turns} turns"
  return episodes


def _turn(e: Episode, env, out, stop, tokenizer, template, rendered, i: int, turn: int):
  ids, ended = cut_at_stop(out, stop)
  e.tokens = np.concatenate([e.tokens, ids.astype(np.int32)])
  e.mask = np.concatenate([e.mask, np.ones(len(ids), np.int32)])
  text = _text(ids[: len(ids) - len(stop)] if ended else ids, tokenizer)
  rendered[i] += _text(ids, tokenizer)
  e.messages.append({"role": "assistant", "content": text})
  if not ended:
    e.done, e.reward, e.reason = True, 0.0, f"no end of turn within {len(ids)} tokens"
    return
  if env is None:
    e.done, e.reward = True, check(e.task, text)
    e.reason = "correct" if e.reward else "wrong"
    return
  e.messages.pop()  # the environment keeps the conversation from here on
  step = env.step(text)
  e.messages = [dict(m) for m in env.messages]
  if step.done:
    e.done, e.reward, e.reason = True, step.reward, step.reason
    return
  prompt = template.render(e.messages, add_generation_prompt=True)
  if not prompt.startswith(rendered[i]):
    raise ChatError(f"{template.name}: after turn {turn} the rendered conversation does not "
                    "extend the text sampled so far (the template is not prefix-stable)")
  extra = np.asarray(tokenizer.encode(prompt[len(rendered[i]):]), np.int32)
  rendered[i] = prompt
  e.tokens = np.concatenate([e.tokens, extra])
  e.mask = np.concatenate([e.mask, np.zeros(len(extra), np.int32)])


def stats(episodes: list[Episode]) -> dict:
  """{n, accuracy, mean_length, mean_correct_length}: reward 1 counts as correct."""
  from ling_jax.posttrain.distill import answer_stats
  return answer_stats([e.reward for e in episodes], [e.length for e in episodes])


def examples(episodes: list[Episode], show: int) -> list[dict]:
  """The first `show` episodes as {prompt, answer, reward, reason} (for summaries)."""
  return [{"prompt": e.task.prompt, "answer": e.text, "reward": e.reward, "reason": e.reason}
          for e in episodes[:show]]
