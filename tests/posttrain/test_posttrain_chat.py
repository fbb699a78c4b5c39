"""Chat format: the message schema, templates (built-in and a checkpoint's jinja), the assistant-only
loss mask, the chat JSONL reader, and their errors on bad input."""

import json

import numpy as np
import pytest

from ling_jax.data import ByteTokenizer, HFTokenizer
from ling_jax.posttrain.chat import (BUILTIN, ChatError, JinjaTemplate, chat_pieces, encode_chat,
                                     encode_prompt, load_chat_template, read_chat_jsonl,
                                     validate_messages)

TOK = ByteTokenizer()
CONV = [{"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Compute 2+3. Ünïcode ok?"},
        {"role": "assistant", "content": "2+3=5\nAnswer: 5"},
        {"role": "user", "content": "And times 2?"},
        {"role": "assistant", "content": "", "tool_calls": [{"tool": "calc", "args": {"expr": "5*2"}}]},
        {"role": "tool", "content": "10"},
        {"role": "assistant", "content": "Answer: 10"}]
# A ChatML-like template, written as checkpoints write them.
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "{% if m.tool_calls %}{% for c in m.tool_calls %}<call>{{ c.function.name }} "
          "{{ c.function.arguments | tojson }}</call>{% endfor %}{% endif %}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _runs(mask):
  """(start, stop) of each run of ones."""
  edges = np.diff(np.concatenate([[0], mask, [0]]))
  return list(zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)))


def test_builtin_mask_is_exactly_the_assistant_turns():
  tokens, mask = encode_chat(CONV, TOK)
  assert tokens.dtype == mask.dtype == np.int32 and tokens.shape == mask.shape
  assert TOK.decode(tokens) == BUILTIN.render(CONV)
  turns = [TOK.decode(tokens[a:b]) for a, b in _runs(mask)]
  assert turns == ["2+3=5\nAnswer: 5<|end|>",
                   '{"tool": "calc", "args": {"expr": "5*2"}}<|end|>',
                   "Answer: 10<|end|>"]
  # Everything else (headers, user, system and tool text, the separators) is unmasked.
  rest = TOK.decode(tokens[mask == 0])
  assert "Answer" not in rest and "Ünïcode" in rest and "<|tool|>\n10<|end|>" in rest
  # The prompt for the first assistant turn is exactly what precedes its first masked token.
  prompt = encode_prompt(CONV[:2], TOK)
  assert np.array_equal(prompt, tokens[: _runs(mask)[0][0]])


def test_jinja_template_from_checkpoint_folder(tmp_path):
  pytest.importorskip("jinja2")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": CHATML, "eos_token": {"content": "<|im_end|>"}, "bos_token": None}))
  template = load_chat_template(str(tmp_path))
  assert template.stop == "<|im_end|>"
  tokens, mask = encode_chat(CONV, TOK, template)
  assert TOK.decode(tokens) == template.render(CONV)
  turns = [TOK.decode(tokens[a:b]) for a, b in _runs(mask)]
  assert turns == ["2+3=5\nAnswer: 5<|im_end|>\n",
                   '<call>calc {"expr": "5*2"}</call><|im_end|>\n', "Answer: 10<|im_end|>\n"]
  # chat_template.jinja takes precedence over the config field.
  (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                                "{% endfor %}{% if add_generation_prompt %}[assistant]"
                                                "{% endif %}")
  template = load_chat_template(str(tmp_path))
  tokens, mask = encode_chat(CONV[:3], TOK, template)
  assert TOK.decode(tokens[mask == 1]) == "2+3=5\nAnswer: 5"


def test_mask_with_an_hf_tokenizer_and_special_tokens(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  pytest.importorskip("jinja2")
  words = ["[UNK]", "user", "assistant", "system", "tool", "Be", "brief.", "hi", "hello", "there"]
  tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)},
                                                        unk_token="[UNK]"))
  tk.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
  tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  path = str(tmp_path / "tokenizer.json")
  tk.save(path)
  tok = HFTokenizer(path)
  template = JinjaTemplate(CHATML)
  conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
  tokens, mask = encode_chat(conv, tok, template)
  end, start = tk.token_to_id("<|im_end|>"), tk.token_to_id("<|im_start|>")
  assert tokens.tolist() == [start, 1, 7, end, start, 2, 8, 9, end]
  assert mask.tolist() == [0, 0, 0, 0, 0, 0, 1, 1, 1]


def test_missing_or_bad_chat_template(tmp_path):
  with pytest.raises(ChatError, match="has no chat template"):
    load_chat_template(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
  with pytest.raises(ChatError, match="has no chat template.*chat.BUILTIN"):
    load_chat_template(str(tmp_path))
  pytest.importorskip("jinja2")
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": [{"name": "tool_use", "template": CHATML}]}))
  with pytest.raises(ChatError, match="no 'default' template"):
    load_chat_template(str(tmp_path))
  (tmp_path / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": [{"name": "default", "template": CHATML}]}))
  assert load_chat_template(str(tmp_path)).render(CONV[:1]) == "<|im_start|>system\nBe brief.<|im_end|>\n"
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  with pytest.raises(ChatError, match="tokenizer_config.json: not JSON"):
    load_chat_template(str(tmp_path))
  with pytest.raises(ChatError, match="invalid jinja template at line 1"):
    JinjaTemplate("{% for m in messages %}")
  refusing = JinjaTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('user first') }}"
                           "{% endif %}", name="t")
  with pytest.raises(ChatError, match="t: the template refused the conversation: user first"):
    encode_chat(CONV, TOK, refusing)


def test_template_that_rewrites_earlier_turns_is_refused():
  pytest.importorskip("jinja2")
  # Renders only the last assistant turn's content: adding a message changes earlier text.
  unstable = JinjaTemplate("{% for m in messages %}{% if m.role != 'assistant' or loop.last %}"
                           "{{ m.content }}|{% endif %}{% endfor %}", name="unstable")
  with pytest.raises(ChatError, match="not prefix-stable at message 4"):
    chat_pieces(CONV[:4] + [{"role": "assistant", "content": "x"}], unstable)


def test_chat_jsonl_reader_names_file_and_line(tmp_path):
  good = {"messages": CONV[1:3]}
  path = tmp_path / "chat.jsonl"
  path.write_text(json.dumps(good) + "\n\n" + json.dumps(good) + "\n")
  assert read_chat_jsonl(str(path)) == [CONV[1:3]] * 2
  cases = [
      ('{"messages": [}', r"chat.jsonl:2: not JSON"),
      ('{"turns": []}', r"chat.jsonl:2: expected an object with a 'messages' list"),
      (json.dumps({"messages": [{"role": "bot", "content": "x"}]}),
       r"chat.jsonl:2: messages\[0\].role='bot'"),
      (json.dumps({"messages": [{"role": "user", "content": 3}]}),
       r"chat.jsonl:2: messages\[0\].content must be a string"),
      (json.dumps({"messages": [{"role": "user", "content": "x", "name": "a"}]}),
       r"chat.jsonl:2: messages\[0\]: unknown fields \['name'\]"),
      (json.dumps({"messages": [{"role": "user", "content": "x",
                                 "tool_calls": [{"tool": "calc", "args": {}}]}]}),
       r"chat.jsonl:2: messages\[0\]: only assistant messages carry tool_calls"),
      (json.dumps({"messages": [{"role": "assistant", "content": "",
                                 "tool_calls": [{"tool": "calc", "args": "1+1"}]}]}),
       r"chat.jsonl:2: messages\[0\].tool_calls\[0\]="),
      (json.dumps({"messages": []}), r"chat.jsonl:2: messages: expected a non-empty list"),
  ]
  for line, match in cases:
    path.write_text(json.dumps(good) + "\n" + line + "\n")
    with pytest.raises(ChatError, match=match):
      read_chat_jsonl(str(path))
  path.write_text("\n")
  with pytest.raises(ChatError, match="no conversations"):
    read_chat_jsonl(str(path))
  with pytest.raises(ChatError, match="no such chat JSONL file"):
    read_chat_jsonl(str(tmp_path / "missing.jsonl"))
  with pytest.raises(ChatError, match=r"messages\[1\]: expected an object"):
    validate_messages([CONV[0], "hi"])
