"""`python -m experiments.<name> --help`: every field an override can set, with its type, this
experiment's value and the comment beside the field in the config's source.

The comments are read from the dataclasses' own source (`inspect.getsource`; `ast` finds the
fields, `tokenize` the comments), so the code stays the one place a field is explained: a
comment at the end of a field's line is that field's, and a block of comment lines directly
above a field heads it (in the configs such a block introduces the run of fields below it).
Nothing here imports jax: the help is instant.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import sys
import textwrap
import tokenize


def field_comments(cls) -> dict[str, tuple[list[str], str | None]]:
  """{field: (the comment lines heading it, its end-of-line comment)} of dataclass `cls`."""
  try:
    source = textwrap.dedent(inspect.getsource(cls))
  except (OSError, TypeError):  # no source (e.g. a class built at run time)
    return {}
  own_line, trailing = {}, {}  # line number -> comment text
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      text = tok.string.lstrip("#").strip()
      standalone = not tok.line[:tok.start[1]].strip()
      (own_line if standalone else trailing)[tok.start[0]] = text
  body = ast.parse(source).body[0].body
  out = {}
  for node in body:
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
      heading, line = [], node.lineno - 1
      while line in own_line:
        heading.insert(0, own_line[line])
        line -= 1
      out[node.target.id] = (heading, trailing.get(node.end_lineno))
  return out


def _summary(cls) -> str:
  return (inspect.getdoc(cls) or "").split("\n\n")[0].replace("\n", " ")


def describe(cfg, prefix: str) -> list[str]:
  """Lines `prefix.field: type = value  # comment` for every field of dataclass instance `cfg`,
  recursing into fields that hold a dataclass."""
  comments = field_comments(type(cfg))
  lines = []
  for f in dataclasses.fields(cfg):
    heading, comment = comments.get(f.name, ([], None))
    lines += [f"  # {h}" for h in heading]
    value = getattr(cfg, f.name)
    tp = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if dataclasses.is_dataclass(value):
      lines.append(f"  {prefix}{f.name}: {tp}" + (f"  # {comment}" if comment else ""))
      lines += describe(value, f"{prefix}{f.name}.")
    else:
      lines.append(f"  {prefix}{f.name}: {tp} = {value!r}" + (f"  # {comment}" if comment else ""))
  return lines


def help_text(experiment, program: str, doc: str | None) -> str:
  """The `--help` page of an experiment (an `Experiment` of model, data and train configs)."""
  out = [f"usage: {program} [-h] [key.sub=value ...]", ""]
  if doc:
    out += [doc.strip(), ""]
  out += ["Each key.sub=value sets one field below (parsed by its type; a field that holds None",
          "cannot take sub-fields). The values shown are this experiment's, after the overrides",
          "given before --help.", ""]
  for f in dataclasses.fields(experiment):
    section = getattr(experiment, f.name)
    out.append(f"{f.name} ({type(section).__name__}): {_summary(type(section))}")
    out += describe(section, f"{f.name}.")
    out.append("")
  return "\n".join(out)


def program_of(config_fn) -> tuple[str, str | None]:
  """(`python -m experiments.<name>`, the module's docstring) of the module defining config_fn."""
  module = sys.modules.get(config_fn.__module__)
  spec = getattr(module, "__spec__", None)
  name = spec.name if spec is not None else config_fn.__module__
  return f"python -m {name}", getattr(module, "__doc__", None)
