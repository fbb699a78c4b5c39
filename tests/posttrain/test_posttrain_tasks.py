"""Verifiable tasks: seeded generators, reference solutions of each verbosity, and checkers that
score right answers 1 and wrong, missing or malformed ones 0 without raising."""

import json

import pytest

from ling_jax.posttrain import tasks
from ling_jax.posttrain.distill import answer_stats, shortest_correct
from ling_jax.posttrain.tasks import check, make_task, reference_messages
from ling_jax.posttrain.tool_task import ToolEnv, parse_tool_call, run_tool, score_turns


def _assistant(msgs):
  return [m["content"] for m in msgs if m["role"] == "assistant"]


def test_generators_are_seeded_and_difficulty_counts():
  for kind in ("arith", "list", "tool"):
    assert make_task(kind, 5, 3) == make_task(kind, 5, 3)
    assert len({make_task(kind, s, 3).prompt for s in range(20)}) > 10
  for steps in (1, 2, 5):
    t = make_task("arith", 11, steps)
    assert len(t.data["ops"]) == steps
    expr = t.prompt.removeprefix("Compute ").removesuffix(".")
    assert eval(expr) == int(t.answer)  # Python's own precedence: the brackets are right
  t = make_task("list", 2, 6)
  assert len(t.data["items"]) == 6
  reference = {"sort": sorted, "sort descending": lambda x: sorted(x, reverse=True),
               "reverse": lambda x: x[::-1], "unique": lambda x: list(dict.fromkeys(x))}
  for op in tasks.LIST_OPS:
    t = tasks.list_task(9, 7, op)
    assert json.loads(t.answer) == reference[op](t.data["items"])
  t = make_task("tool", 4, 3)
  table = t.data["table"]
  assert int(t.answer) == sum(q * table[n] for n, q in t.data["asked"])
  with pytest.raises(ValueError, match="unknown task kind"):
    make_task("chess", 0)


@pytest.mark.parametrize("kind", ["arith", "list", "tool"])
def test_references_are_correct_and_verbosity_orders_length(kind):
  for seed in range(15):
    t = make_task(kind, seed, 3)
    lengths = []
    for v in tasks.VERBOSITY:
      msgs = reference_messages(t, v)
      turns = _assistant(msgs)
      if kind == "tool":
        assert score_turns(t, turns) == (1.0, "correct")
      else:
        assert len(turns) == 1 and check(t, turns[0]) == 1.0
      lengths.append(sum(map(len, turns)))
    assert lengths[0] < lengths[1] < lengths[2]
  with pytest.raises(ValueError, match="verbosity=3"):
    reference_messages(t, 3)


def test_single_turn_checkers_right_and_wrong():
  a = tasks.arithmetic_task(0, 3)
  right = int(a.answer)
  assert check(a, f"Answer: {right}") == 1.0
  assert check(a, f"Some thought.\nAnswer: {right}.") == 1.0
  assert check(a, f"Answer: {right + 1}\nWait.\nAnswer: {right}") == 1.0  # the last line counts
  for wrong in [f"Answer: {right + 1}", f"Answer: {right}\nAnswer: {right - 1}", f"{right}",
                "Answer:", "Answer: twelve", f"Answer: {right}0", "", "Answer: 1e3", None, 42]:
    assert check(a, wrong) == 0.0, wrong
  s = tasks.list_task(1, 4, "sort")
  assert check(s, f"Answer: {s.answer}") == 1.0
  assert check(s, "Answer: " + s.answer.replace(", ", ",")) == 1.0
  for wrong in ["Answer: " + json.dumps(json.loads(s.answer)[::-1]), "Answer: [1, 2",
                "Answer: [1.5, 2]", 'Answer: ["1"]', "Answer: {}", "no answer"]:
    assert check(s, wrong) == 0.0, wrong
  with pytest.raises(ValueError, match="scored by tool_task.ToolEnv"):
    check(make_task("tool", 0), "Answer: 1")


def test_tool_env_bad_calls_are_failures_not_crashes():
  t = make_task("tool", 7, 2)
  (n1, _), (n2, _) = t.data["asked"]
  look = lambda n: json.dumps({"tool": "lookup", "args": {"item": n}})
  assert score_turns(t, ['{"tool": "lookup", "args": {"item": "pear"']) == (
      0.0, "tool call is not valid JSON (Expecting ',' delimiter at column 43)")
  assert score_turns(t, ["thinking\n{tool: lookup}"])[1].startswith("tool call is not valid JSON")
  assert score_turns(t, ['{"tool": "lookup"}'])[1] == 'tool call must be {"tool": name, "args": {...}}'
  assert score_turns(t, ['{"tool": "lookup", "args": ["fig"]}'])[0] == 0.0
  # Right total without the lookups: a guess, no reward. Wrong total: none either.
  assert score_turns(t, [f"Answer: {t.answer}"]) == (
      0.0, f"right total without looking up {sorted([n1, n2])}")
  assert score_turns(t, [look(n1), look(n2), f"Answer: {int(t.answer) + 1}"])[0] == 0.0
  assert score_turns(t, [look(n1), look(n2), f"Answer: {t.answer}"]) == (1.0, "correct")
  assert score_turns(t, [look(n1)] * 8) == (0.0, "no answer within 8 turns")
  assert score_turns(t, [look(n1)]) == (0.0, "the episode has not ended")
  # Unknown tools and bad arguments are answered, and the episode goes on.
  env = ToolEnv(t)
  for call, reply in [({"tool": "search", "args": {}}, "error: unknown tool 'search'"),
                      ({"tool": "lookup", "args": {"item": "gold"}}, "error: no item 'gold'"),
                      ({"tool": "calc", "args": {"expr": "__import__('os').getcwd()"}},
                       "error: only integers"),
                      ({"tool": "calc", "args": {"expr": "2**99"}}, "error: only integers"),
                      ({"tool": "calc", "args": {"expr": "(1+"}}, "error: "),
                      ({"tool": "calc", "args": {"expr": "-(3+4)*5-2"}}, "-37")]:
    step = env.step(json.dumps(call))
    assert not step.done and step.tool_message.startswith(reply), (call, step)
  assert env.messages[-1] == {"role": "tool", "content": "-37"}
  step = env.step("Answer: 3")
  assert step.done and step.reward == 0.0
  with pytest.raises(RuntimeError, match="ended"):
    env.step("Answer: 3")
  assert parse_tool_call("Answer: 3") == (None, None)
  assert run_tool({"tool": "calc", "args": {"expr": "9" * 81}}, {})[0].startswith("error: expression")


def test_shortest_correct_and_stats():
  t = make_task("arith", 3, 2)
  samples = [f"long reasoning here\nAnswer: {t.answer}", f"Answer: {int(t.answer) + 1}",
             f"Answer: {t.answer}", f"x\nAnswer: {t.answer}"]
  rewards = [check(t, s) for s in samples]
  lengths = [len(s) for s in samples]
  assert shortest_correct(samples, rewards, lengths) == 2
  assert shortest_correct(samples[1:2], rewards[1:2], lengths[1:2]) is None
  stats = answer_stats(rewards, lengths)
  assert stats == {"n": 4, "accuracy": 0.75, "mean_length": sum(lengths) / 4,
                   "mean_correct_length": (lengths[0] + lengths[2] + lengths[3]) / 3}
