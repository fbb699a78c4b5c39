"""Chat conversations: the message schema, chat templates, and tokens with an assistant-only loss mask.

A conversation is a list of messages, plain dicts as in chat JSONL files:
  {"role": "system" | "user" | "assistant" | "tool", "content": str}
and an assistant message may also carry structured tool calls
  "tool_calls": [{"tool": name, "args": {...}}, ...]
(the JSON tool-call format of docs/posttrain.md, "Tool calls").

Templates render a conversation to text. Two kinds, one interface (`render(messages,
add_generation_prompt)` plus the `stop` string that ends an assistant turn):
  BuiltinTemplate - a short byte-friendly format for byte-level tiny models (no special tokens):
                      <|user|>\\n{content}<|end|>\\n<|assistant|>\\n{content}<|end|>
  JinjaTemplate   - a checkpoint folder's own template (`chat_template.jinja`, or the
                    `chat_template` field of `tokenizer_config.json`), rendered with jinja2 in a
                    sandbox, as Hugging Face renders it (trim_blocks, lstrip_blocks).

`encode_chat` finds the assistant spans by rendering prefixes: for assistant message i, the text
of `render(messages[:i], add_generation_prompt=True)` is the prompt the model sees at generation,
and what `render(messages[:i+1])` adds after it is the model's turn (content and end marker).
Each piece is tokenized on its own, so the tokens are exactly those of a prompt followed by the
model's own output. A template whose earlier text changes when a later message is added (e.g.
one that drops old reasoning) cannot be split this way and is refused, naming the message.
"""

from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

ROLES = ("system", "user", "assistant", "tool")
_KEYS = {"role", "content", "tool_calls"}


class ChatError(ValueError):
  """Bad chat input: malformed messages or JSONL, a missing or unusable chat template."""


# ---------------------------------------------------------------------------------- messages
def validate_messages(messages, where: str = "messages") -> list[dict]:
  """`messages` if it is a well-formed conversation, else ChatError naming `where` and the field."""
  if not isinstance(messages, list) or not messages:
    raise ChatError(f"{where}: expected a non-empty list of messages, got {type(messages).__name__}")
  for i, m in enumerate(messages):
    at = f"{where}[{i}]"
    if not isinstance(m, dict):
      raise ChatError(f"{at}: expected an object with 'role' and 'content', got {m!r:.80}")
    if set(m) - _KEYS:
      raise ChatError(f"{at}: unknown fields {sorted(set(m) - _KEYS)}; allowed {sorted(_KEYS)}")
    if m.get("role") not in ROLES:
      raise ChatError(f"{at}.role={m.get('role')!r}; expected one of {ROLES}")
    if not isinstance(m.get("content"), str):
      raise ChatError(f"{at}.content must be a string, got {type(m.get('content')).__name__}")
    if "tool_calls" in m:
      if m["role"] != "assistant":
        raise ChatError(f"{at}: only assistant messages carry tool_calls (role {m['role']!r})")
      calls = m["tool_calls"]
      if not isinstance(calls, list):
        raise ChatError(f"{at}.tool_calls must be a list")
      for j, c in enumerate(calls):
        if (not isinstance(c, dict) or set(c) != {"tool", "args"} or not isinstance(c["tool"], str)
            or not isinstance(c["args"], dict)):
          raise ChatError(f"{at}.tool_calls[{j}]={c!r:.80}: expected {{\"tool\": str, \"args\": {{...}}}}")
  return messages


def tool_call_text(call: dict) -> str:
  """One tool call as the JSON line the built-in template writes and `tasks.parse_tool_call` reads."""
  return json.dumps({"tool": call["tool"], "args": call["args"]})


def read_chat_jsonl(path: str) -> list[list[dict]]:
  """The conversations of a chat JSONL file: one `{"messages": [...]}` object a line (blank lines
  skipped). Every error names the file and line."""
  if not os.path.isfile(path):
    raise ChatError(f"{path}: no such chat JSONL file")
  convs = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise ChatError(f"{path}:{n}: not JSON ({e.msg} at column {e.colno})") from None
      if not isinstance(record, dict) or "messages" not in record:
        raise ChatError(f"{path}:{n}: expected an object with a 'messages' list")
      convs.append(validate_messages(record["messages"], f"{path}:{n}: messages"))
  if not convs:
    raise ChatError(f"{path}: no conversations")
  return convs


# ---------------------------------------------------------------------------------- templates
class BuiltinTemplate:
  """The byte-friendly format for models without a chat template of their own.

  Message i renders as ("\\n" unless i == 0) + "<|role|>\\n" + body + "<|end|>", where body is the
  content followed by one JSON line per tool call. The generation prompt is ("\\n" unless empty)
  + "<|assistant|>\\n". The separator sits before a header rather than after "<|end|>", so an
  assistant turn is exactly body + "<|end|>": generation stops at `stop` and nothing after it is
  trained.
  """

  stop = "<|end|>"
  name = "builtin"

  def _body(self, m: dict) -> str:
    lines = [m["content"]] if m["content"] else []
    lines += [tool_call_text(c) for c in m.get("tool_calls", ())]
    return "\n".join(lines)

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    parts = [f"<|{m['role']}|>\n{self._body(m)}{self.stop}" for m in messages]
    if add_generation_prompt:
      parts.append("<|assistant|>\n")
    return "\n".join(parts)


BUILTIN = BuiltinTemplate()


def _special(value):
  """A tokenizer_config special token: a string, or an AddedToken dict with its 'content'."""
  return value.get("content") if isinstance(value, dict) else value


class JinjaTemplate:
  """A Hugging Face style jinja chat template (rendered in jinja2's immutable sandbox)."""

  def __init__(self, source: str, *, name: str = "chat_template", bos_token=None, eos_token=None):
    try:
      import jinja2
      from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
      raise ChatError(f"{name}: rendering a checkpoint's chat template needs jinja2 "
                      "(pip install jinja2); byte-level models can use chat.BUILTIN") from None

    def raise_exception(message):
      raise ChatError(f"{name}: the template refused the conversation: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    # Templates expect JSON with non-ASCII text kept (HF's tojson), not jinja2's HTML-safe one.
    env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, ensure_ascii=False,
                                                                   indent=indent)
    try:
      self._template = env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
      raise ChatError(f"{name}: invalid jinja template at line {e.lineno}: {e.message}") from None
    self._errors = jinja2.TemplateError
    self.name, self.bos_token, self.eos_token = name, bos_token, eos_token
    self.stop = eos_token

  def render(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    hf = []
    for m in messages:  # our tool calls in the OpenAI / HF structure the templates read
      m = dict(m)
      if "tool_calls" in m:
        m["tool_calls"] = [{"type": "function", "function": {"name": c["tool"], "arguments": c["args"]}}
                           for c in m["tool_calls"]]
      hf.append(m)
    try:
      return self._template.render(messages=hf, add_generation_prompt=add_generation_prompt,
                                   bos_token=self.bos_token or "", eos_token=self.eos_token or "")
    except self._errors as e:
      raise ChatError(f"{self.name}: rendering failed: {e}") from None


def load_chat_template(folder: str) -> JinjaTemplate:
  """The chat template of a checkpoint folder: `chat_template.jinja` if present, else the
  `chat_template` field of `tokenizer_config.json` (a string, or a list of named templates of
  which "default" is taken). ChatError when the tokenizer has none."""
  config_path = os.path.join(folder, "tokenizer_config.json")
  config = {}
  if os.path.isfile(config_path):
    try:
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    except json.JSONDecodeError as e:
      raise ChatError(f"{config_path}: not JSON ({e.msg}, line {e.lineno})") from None
  special = dict(bos_token=_special(config.get("bos_token")),
                 eos_token=_special(config.get("eos_token")))
  jinja_path = os.path.join(folder, "chat_template.jinja")
  if os.path.isfile(jinja_path):
    with open(jinja_path, encoding="utf-8") as f:
      return JinjaTemplate(f.read(), name=jinja_path, **special)
  source = config.get("chat_template")
  if isinstance(source, list):
    named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
    if "default" not in named:
      raise ChatError(f"{config_path}: chat_template lists {sorted(map(str, named))} but no "
                      "'default' template")
    source = named["default"]
  if not isinstance(source, str) or not source.strip():
    raise ChatError(f"{folder}: the checkpoint's tokenizer has no chat template (no "
                    "chat_template.jinja, and tokenizer_config.json has no 'chat_template'); add "
                    "one, or use chat.BUILTIN for a byte-level model")
  return JinjaTemplate(source, name=f"{config_path}:chat_template", **special)


# ---------------------------------------------------------------------------------- encoding
def chat_pieces(messages: Sequence[dict], template) -> list[tuple[str, bool]]:
  """The rendered conversation cut into (text, is_assistant_turn) pieces, in order; their
  concatenation is `template.render(messages)`."""
  messages = validate_messages(list(messages))
  pieces, done = [], ""

  def extend(text: str, i: int, what: str) -> str:
    if not text.startswith(done):
      raise ChatError(f"{template.name}: the template is not prefix-stable at message {i} "
                      f"({what} does not start with the text rendered before it), so the "
                      "assistant turns cannot be located")
    return text[len(done):]

  for i, m in enumerate(messages):
    if m["role"] != "assistant":
      continue
    prompt = template.render(messages[:i], add_generation_prompt=True)
    pieces.append((extend(prompt, i, "the generation prompt"), False))
    done = prompt
    turn = template.render(messages[: i + 1])
    pieces.append((extend(turn, i, "the assistant turn"), True))
    done = turn
  pieces.append((extend(template.render(messages), len(messages), "the conversation"), False))
  return [(t, a) for t, a in pieces if t]


def encode_chat(messages: Sequence[dict], tokenizer, template=BUILTIN):
  """(tokens [T] int32, loss_mask [T] int32): loss_mask is 1 exactly on the tokens of assistant
  turns (content, tool-call lines and end marker), 0 on everything else."""
  tokens, mask = [], []
  for text, is_assistant in chat_pieces(messages, template):
    ids = np.asarray(tokenizer.encode(text), np.int32)
    tokens.append(ids)
    mask.append(np.full(len(ids), int(is_assistant), np.int32))
  if not tokens:
    return np.zeros(0, np.int32), np.zeros(0, np.int32)
  return np.concatenate(tokens), np.concatenate(mask)


def encode_prompt(messages: Sequence[dict], tokenizer, template=BUILTIN) -> np.ndarray:
  """The generation prompt for the next assistant turn, as token ids [T] int32."""
  text = template.render(validate_messages(list(messages)), add_generation_prompt=True)
  return np.asarray(tokenizer.encode(text), np.int32)
