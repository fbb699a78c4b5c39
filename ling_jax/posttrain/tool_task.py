"""The multi-turn tool task: look prices up in the episode's table, compute a total, answer.

"What do 3 pear and 2 fig cost?" The prices are drawn per episode from the task's seed and live
only in the environment's table, so the model must call the `lookup` tool to know them; a
calculator tool `calc` evaluates + - * expressions on integers. Tool calls use the JSON tool-call
format (docs/posttrain.md, "Tool calls"): the last non-empty line of an assistant turn is

  {"tool": "lookup", "args": {"item": "pear"}}     or     {"tool": "calc", "args": {"expr": "3*5+2*7"}}

`ToolEnv` runs an episode: `step(assistant_text)` executes a call and returns its result as the
content of the next `tool` message, or ends the episode on a final turn. Rewards:
  1.0  the final "Answer:" is the right total AND every needed price was looked up (the answer
       must use the tool's results: a right total without them is a guess),
  0.0  otherwise: wrong or missing answer, a tool call that is not valid JSON or not of the form
       {"tool": str, "args": {...}} (the episode ends: a failure, not a crash), or more than
       `max_turns` assistant turns.
An unknown tool or bad arguments is answered with an "error: ..." tool message and the episode
goes on (as a real tool server would answer), so the model can recover.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import random

from ling_jax.posttrain.tasks import Task, extract_answer, parse_int

ITEMS = ("apple", "pear", "fig", "plum", "milk", "bread", "egg", "rice", "tea", "salt", "corn",
         "bean", "nut", "jam", "oat", "lime")
TOOL_SYSTEM = ('Tools: {"tool": "lookup", "args": {"item": NAME}} gives a price; '
               '{"tool": "calc", "args": {"expr": EXPR}} computes. '
               'Call one per turn as the last line. End with "Answer: N".')
_MAX_EXPR = 80
_MAX_VALUE = 10 ** 12


def tool_task(seed: int, items: int = 2) -> Task:
  """`items` (the difficulty knob) distinct items with quantities 1..5; the episode's price
  table covers 6 items (at least the asked ones) with prices 1..20."""
  if not 1 <= items <= 6:
    raise ValueError(f"items={items} must be in 1..6")
  rng = random.Random(f"tool/{seed}/{items}")
  names = rng.sample(ITEMS, 6)
  table = {n: rng.randint(1, 20) for n in names}
  asked = [[n, rng.randint(1, 5)] for n in names[:items]]
  total = sum(q * table[n] for n, q in asked)
  listing = " and ".join(f"{q} {n}" for n, q in asked)
  return Task("tool", f"What do {listing} cost?", str(total), {"table": table, "asked": asked})


def parse_tool_call(text: str) -> tuple[dict | None, str | None]:
  """(call, None) when the turn's last non-empty line is a valid tool call; (None, reason) when
  it starts like one ("{") but is not valid; (None, None) when the turn is not a call."""
  lines = [l for l in (text or "").splitlines() if l.strip()]
  if not lines or not lines[-1].lstrip().startswith("{"):
    return None, None
  try:
    call = json.loads(lines[-1])
  except json.JSONDecodeError as e:
    return None, f"tool call is not valid JSON ({e.msg} at column {e.colno})"
  if (not isinstance(call, dict) or set(call) != {"tool", "args"}
      or not isinstance(call["tool"], str) or not isinstance(call["args"], dict)):
    return None, 'tool call must be {"tool": name, "args": {...}}'
  return call, None


def _calc(node):
  """Value of an expression tree of integers, + - * and brackets (no names, calls or powers)."""
  if isinstance(node, ast.Expression):
    return _calc(node.body)
  if isinstance(node, ast.Constant) and type(node.value) is int:
    return node.value
  if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
    v = _calc(node.operand)
    return v if isinstance(node.op, ast.UAdd) else -v
  if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult)):
    a, b = _calc(node.left), _calc(node.right)
    v = a + b if isinstance(node.op, ast.Add) else a - b if isinstance(node.op, ast.Sub) else a * b
    if abs(v) > _MAX_VALUE:
      raise ValueError("result too large")
    return v
  raise ValueError("only integers, + - * and brackets are allowed")


def run_tool(call: dict, table: dict) -> tuple[str, str | None]:
  """(the tool message content, the looked-up item or None). Errors become "error: ..." text."""
  tool, args = call["tool"], call["args"]
  if tool == "lookup":
    item = args.get("item")
    if set(args) != {"item"} or not isinstance(item, str):
      return 'error: lookup takes {"item": NAME}', None
    if item not in table:
      return f"error: no item {item!r}; the table has {', '.join(sorted(table))}", None
    return str(table[item]), item
  if tool == "calc":
    expr = args.get("expr")
    if set(args) != {"expr"} or not isinstance(expr, str):
      return 'error: calc takes {"expr": EXPR}', None
    if len(expr) > _MAX_EXPR:
      return f"error: expression longer than {_MAX_EXPR} characters", None
    try:
      return str(_calc(ast.parse(expr, mode="eval"))), None
    except (SyntaxError, ValueError) as e:
      return f"error: {e.msg if isinstance(e, SyntaxError) else e}", None
  return f"error: unknown tool {tool!r}; use lookup or calc", None


@dataclasses.dataclass
class Step:
  """What the environment answers to one assistant turn."""

  tool_message: str | None  # the next `tool` message's content; None when the episode ended
  done: bool
  reward: float
  reason: str               # why the episode ended ("" while it goes on)


class ToolEnv:
  """One episode of a tool task. `messages` is the conversation so far (system, user, then the
  assistant and tool turns); feed each assistant turn's text (without the template's end marker)
  to `step`."""

  def __init__(self, task: Task, max_turns: int = 8):
    if task.kind != "tool":
      raise ValueError(f"ToolEnv runs tool tasks, not {task.kind!r}")
    self.task, self.max_turns = task, max_turns
    self.messages = [{"role": "system", "content": TOOL_SYSTEM},
                     {"role": "user", "content": task.prompt}]
    self.looked_up: set[str] = set()
    self.turns, self.done = 0, False

  def _end(self, reward: float, reason: str) -> Step:
    self.done = True
    return Step(None, True, reward, reason)

  def step(self, text: str) -> Step:
    if self.done:
      raise RuntimeError("the episode has ended")
    text = text if isinstance(text, str) else ""
    self.turns += 1
    self.messages.append({"role": "assistant", "content": text})
    call, error = parse_tool_call(text)
    if error:
      return self._end(0.0, error)
    if call is None:
      got = parse_int(extract_answer(text))
      needed = {n for n, _ in self.task.data["asked"]}
      if got is None:
        return self._end(0.0, "no integer answer")
      if got != int(self.task.answer):
        return self._end(0.0, f"wrong answer {got} (expected {self.task.answer})")
      if not needed <= self.looked_up:
        return self._end(0.0, f"right total without looking up {sorted(needed - self.looked_up)}")
      return self._end(1.0, "correct")
    if self.turns >= self.max_turns:
      return self._end(0.0, f"no answer within {self.max_turns} turns")
    result, item = run_tool(call, self.task.data["table"])
    if item is not None:
      self.looked_up.add(item)
    self.messages.append({"role": "tool", "content": result})
    return Step(result, False, 0.0, "")


def score_turns(task: Task, turns: list[str], max_turns: int = 8) -> tuple[float, str]:
  """(reward, reason) of an episode given its assistant turns in order (the environment replayed);
  turns left after the episode ended are ignored, too few turns score 0."""
  env = ToolEnv(task, max_turns)
  for text in turns:
    step = env.step(text)
    if step.done:
      return step.reward, step.reason
  return 0.0, "the episode has not ended"


def tool_reference(task: Task, verbosity: int) -> list[dict]:
  """A correct episode: one lookup per item, one calc, the answer; with reasoning lines before
  each call at verbosity >= 1 (a sentence each at 2)."""
  table, asked = task.data["table"], task.data["asked"]
  msgs = [{"role": "system", "content": TOOL_SYSTEM}, {"role": "user", "content": task.prompt}]

  def turn(say: str, call: dict | None, result: str | None, final: str = ""):
    lines = ([say] if say and verbosity else []) + ([json.dumps(call)] if call else [final])
    msgs.append({"role": "assistant", "content": "\n".join(lines)})
    if result is not None:
      msgs.append({"role": "tool", "content": result})

  for n, _ in asked:
    say = f"I need the price of {n}." if verbosity == 2 else f"price {n}"
    turn(say, {"tool": "lookup", "args": {"item": n}}, str(table[n]))
  expr = "+".join(f"{q}*{table[n]}" for n, q in asked)
  turn(f"Now add them up: {expr}." if verbosity == 2 else "total",
       {"tool": "calc", "args": {"expr": expr}}, task.answer)
  turn(f"The total is {task.answer}." if verbosity == 2 else "", None, None,
       final=f"Answer: {task.answer}")
  return msgs
