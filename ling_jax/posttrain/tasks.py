"""Verifiable tasks made in process: multi-step arithmetic and list manipulation, with checkers.

Every task is drawn from a seed, so a data set is (kind, seed range, difficulty) and nothing is
downloaded. A response ends with a line "Answer: <value>"; `check` reads the last such line and
returns reward 1.0 when the value is right and 0.0 otherwise: for a wrong, missing or malformed
answer alike, never an exception (docs/posttrain.md, "Tasks").

`reference_messages(task, verbosity)` is a correct conversation for SFT with a chain of thought
of controllable length: 0 answer only, 1 terse (one short line per step), 2 verbose (a sentence
per step with an introduction). A model fine-tuned on verbose references starts verbose, so RL
with a length-aware reward and shortest-correct distillation have length to remove.

The texts are short ASCII so the byte-level `ling_tiny` (vocabulary 256) can learn them. The
multi-turn tool task lives in tool_task.py.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re

VERBOSITY = (0, 1, 2)
_ANSWER = re.compile(r"^[ \t]*Answer:[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_INT = re.compile(r"[+-]?\d+")


@dataclasses.dataclass(frozen=True)
class Task:
  """One problem: what the user asks, the canonical answer text, and what its solution needs."""

  kind: str      # "arith", "list" or "tool"
  prompt: str    # the user message
  answer: str    # the canonical answer ("33", "[1, 3, 5]")
  data: dict     # JSON-able details for the reference solution and the environment


def extract_answer(text: str) -> str | None:
  """The value of the last "Answer:" line of `text`, or None."""
  found = _ANSWER.findall(text) if isinstance(text, str) else []
  return found[-1] if found else None


def parse_int(value: str | None) -> int | None:
  """An integer answer ("33", "-4", "33."), or None when the text is not one."""
  if value is None:
    return None
  value = value.strip().rstrip(".").strip()
  return int(value) if _INT.fullmatch(value) else None


def parse_int_list(value: str | None) -> list[int] | None:
  """A list answer "[1, 3, 5]" (JSON), or None when the text is not a list of integers."""
  if value is None:
    return None
  try:
    out = json.loads(value.strip().rstrip("."))
  except (json.JSONDecodeError, ValueError):
    return None
  if not isinstance(out, list) or not all(type(v) is int for v in out):
    return None
  return out


def _check_verbosity(verbosity: int):
  if verbosity not in VERBOSITY:
    raise ValueError(f"verbosity={verbosity!r}; choose one of {VERBOSITY}")


# ---------------------------------------------------------------------------------- arithmetic
_WORD = {"+": "Add", "-": "Subtract", "*": "Multiply by"}


def arithmetic_task(seed: int, steps: int = 3) -> Task:
  """An expression of `steps` operations (+, -, *) evaluated left to right, brackets where the
  order needs them: "(3+4)*5-2". `steps` is the difficulty knob."""
  if steps < 1:
    raise ValueError(f"steps={steps} must be >= 1")
  rng = random.Random(f"arith/{seed}/{steps}")
  value = rng.randint(1, 20)
  expr, top = str(value), None  # top: the expression's outermost operator
  ops = []
  for _ in range(steps):
    op = rng.choice("+-*") if abs(value) < 200 else rng.choice("+-")
    b = rng.randint(2, 9) if op == "*" else rng.randint(1, 20)
    if op == "*" and top in ("+", "-"):
      expr = f"({expr})"
    expr, top = f"{expr}{op}{b}", op
    new = value + b if op == "+" else value - b if op == "-" else value * b
    ops.append([value, op, b, new])
    value = new
  return Task("arith", f"Compute {expr}.", str(value), {"expr": expr, "ops": ops})


def _arith_reasoning(task: Task, verbosity: int) -> list[str]:
  ops = task.data["ops"]
  if verbosity == 1:
    return [f"{a}{op}{b}={c}" for a, op, b, c in ops]
  lines = ["Go left to right, brackets first."]
  lines += [f"{_WORD[op]} {b}: {a}{op}{b}={c}." for a, op, b, c in ops]
  return lines + [f"So the result is {ops[-1][3]}."]


# ---------------------------------------------------------------------------------- lists
LIST_OPS = ("sort", "sort descending", "reverse", "unique")


def list_task(seed: int, length: int = 5, op: str | None = None) -> Task:
  """Sort (ascending or descending), reverse, or remove repeats (keeping first occurrences) of a
  list of `length` integers in [0, 99] (fewer distinct values for "unique"). `length` is the
  difficulty knob."""
  if length < 1:
    raise ValueError(f"length={length} must be >= 1")
  rng = random.Random(f"list/{seed}/{length}/{op}")
  op = op or rng.choice(LIST_OPS)
  if op not in LIST_OPS:
    raise ValueError(f"op={op!r}; choose one of {LIST_OPS}")
  top = max(2, length // 2) if op == "unique" else 99
  items = [rng.randint(0, top) for _ in range(length)]
  if op == "sort":
    out = sorted(items)
  elif op == "sort descending":
    out = sorted(items, reverse=True)
  elif op == "reverse":
    out = items[::-1]
  else:
    out = list(dict.fromkeys(items))
  prompt = f"{op[0].upper()}{op[1:]}: {json.dumps(items)}"
  return Task("list", prompt, json.dumps(out), {"op": op, "items": items})


def _list_reasoning(task: Task, verbosity: int) -> list[str]:
  op, items = task.data["op"], task.data["items"]
  out = json.loads(task.answer)
  if verbosity == 1:
    head = {"sort": "Smallest first", "sort descending": "Largest first",
            "reverse": "From the end", "unique": "Drop repeats"}[op]
    return [f"{head}: {' '.join(map(str, out))}"]
  if op in ("sort", "sort descending"):
    word = "smallest" if op == "sort" else "largest"
    rest, lines = list(items), [f"Take the {word} left each time."]
    for v in out:
      lines.append(f"The {word} of {json.dumps(rest)} is {v}.")
      rest.remove(v)
    return lines
  if op == "reverse":
    return ["Read the list from the end."] + [f"Next is {v}." for v in out]
  seen, lines = set(), ["Keep each number the first time it appears."]
  for v in items:
    lines.append(f"{v} is a repeat, drop it." if v in seen else f"{v} is new, keep it.")
    seen.add(v)
  return lines


# ---------------------------------------------------------------------------------- common
def make_task(kind: str, seed: int, difficulty: int = 3) -> Task:
  """A task of `kind` ("arith", "list" or "tool") with the kind's difficulty knob."""
  if kind == "arith":
    return arithmetic_task(seed, steps=difficulty)
  if kind == "list":
    return list_task(seed, length=difficulty)
  if kind == "tool":
    from ling_jax.posttrain.tool_task import tool_task  # tool_task imports this module

    return tool_task(seed, items=difficulty)
  raise ValueError(f"unknown task kind {kind!r}; choose 'arith', 'list' or 'tool'")


def check(task: Task, text: str) -> float:
  """Reward of a single-turn response: 1.0 if its last "Answer:" line is right, else 0.0."""
  value = extract_answer(text)
  if task.kind == "arith":
    got = parse_int(value)
    return float(got is not None and got == int(task.answer))
  if task.kind == "list":
    got = parse_int_list(value)
    return float(got is not None and got == json.loads(task.answer))
  raise ValueError(f"check() scores single-turn tasks; a {task.kind!r} task is scored by "
                   "tool_task.ToolEnv over its turns")


def reference_messages(task: Task, verbosity: int = 1) -> list[dict]:
  """A correct conversation (user prompt, then the assistant's turns) for SFT."""
  _check_verbosity(verbosity)
  if task.kind == "tool":
    from ling_jax.posttrain.tool_task import tool_reference

    return tool_reference(task, verbosity)
  reasoning = [] if verbosity == 0 else (
      _arith_reasoning(task, verbosity) if task.kind == "arith" else _list_reasoning(task, verbosity))
  content = "\n".join(reasoning + [f"Answer: {task.answer}"])
  return [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": content}]


def sft_conversations(kind: str, seeds, *, difficulty: int = 3, verbosity: int = 1) -> list[list]:
  """Reference conversations for the tasks of `kind` drawn from each seed in `seeds`."""
  return [reference_messages(make_task(kind, s, difficulty), verbosity) for s in seeds]
