"""`python -m ling_jax.generate` on a tiny random checkpoint with a tokenizer built here.

The tokenizer is a `tokenizers` word-level model over 200 words plus chat markers; the chat
template is a jinja string in tokenizer_config.json. The eos id is forced: it is the third token
the model generates for the prompt, written into config.json after a first run, so the command
must stop right after it.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

import ling_jax
from ling_jax.config import ling_tiny
from ling_jax.convert import import_hf
from ling_jax.generate import generate
from ling_jax.generate.cli import main
from testing import random_model

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CFG = ling_tiny(num_experts_per_tok=8, topk_group=4)  # routing without near ties (test_generate)
SPECIAL = ["<unk>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
WORDS = [f"w{i}" for i in range(200)] + ["hello", "world"]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
PROMPT = "hello world w7"


def build_tokenizer() -> Tokenizer:
  vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.add_special_tokens(SPECIAL)
  return tok


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
  """(HF folder, the tokens the model generates for the chat prompt, the forced eos index)."""
  root = tmp_path_factory.mktemp("cli")
  hf = root / "hf"
  model = random_model(CFG, seed=4)
  ling_jax.save_hf(model, CFG, hf, progress=False)
  tok = build_tokenizer()
  tok.save(str(hf / "tokenizer.json"))
  (hf / "tokenizer_config.json").write_text(json.dumps(
      {"chat_template": TEMPLATE, "eos_token": "</s>", "bos_token": None}))
  text = f"<|user|> {PROMPT} <|assistant|>"
  ids = tok.encode(text, add_special_tokens=False).ids
  assert tok.id_to_token(ids[0]) == "<|user|>" and len(ids) == 5
  new = generate(model, [ids], 6, eos_ids=None).sequences()[0]
  eos = new[2]
  stop = new.index(eos) + 1
  config = json.loads((hf / "config.json").read_text())
  (hf / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
  return hf, tok, new, stop


def run(capsys, *argv) -> tuple[int, str, str]:
  rc = main([str(a) for a in argv])
  out = capsys.readouterr()
  return rc, out.out, out.err


def test_cli_streams_the_chat_reply_and_stops_at_eos(folder, capsys, tmp_path):
  hf, tok, new, stop = folder
  rc, out, err = run(capsys, hf, "--prompt", PROMPT, "--max-new-tokens", 6, "--dtype", "float32",
                     "--steps-per-sync", 2)
  assert rc == 0, err
  assert out == tok.decode(new[:stop]) + "\n"
  assert "prompt: 5 tokens, chat template" in err
  assert f"generated {stop} tokens (stopped at eos)" in err
  rc, out, err = run(capsys, hf, "--prompt", PROMPT, "--max-new-tokens", 6, "--dtype", "float32",
                     "--ignore-eos")
  assert rc == 0 and out == tok.decode(new) + "\n" and "stopped at max_new_tokens" in err
  # A converted checkpoint carries the tokenizer and template along (convert import copies them).
  import_hf(hf, tmp_path / "ckpt", progress=False)
  assert (tmp_path / "ckpt" / "tokenizer_config.json").is_file()
  rc, out2, err = run(capsys, tmp_path / "ckpt", "--prompt", PROMPT, "--max-new-tokens", 6)
  assert rc == 0 and out2 == tok.decode(new[:stop]) + "\n", err


def test_cli_bad_input_gives_clear_errors(folder, capsys, tmp_path):
  hf = folder[0]
  (tmp_path / "empty.txt").write_text("  \n")
  (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
  (tmp_path / "bare").mkdir()
  cases = [
      (["--prompt-file", tmp_path / "missing.txt"], "missing.txt: no such file"),
      (["--prompt-file", tmp_path / "empty.txt"], "empty.txt is empty"),
      (["--prompt-file", tmp_path / "latin1.txt"], "latin1.txt: not UTF-8 text (byte 3"),
      (["--prompt", "hi", "--max-new-tokens", 5000],
       "exceeds the model's max_position_embeddings (2048)"),
  ]
  for extra, message in cases:
    rc, _, err = run(capsys, hf, *extra)
    assert rc == 1 and message in err, (extra, err)
  rc, _, err = run(capsys, tmp_path / "bare", "--prompt", "hi")
  assert rc == 1 and "bare has no tokenizer.json" in err


def test_cli_help_needs_no_jax():
  proc = subprocess.run([sys.executable, "-c", "import sys, runpy; sys.argv = ['x', '--help']; "
                         "runpy.run_module('ling_jax.generate', run_name='__main__')"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0 and "--prompt-file" in proc.stdout
  probe = subprocess.run([sys.executable, "-c", "import sys, ling_jax.generate.cli; "
                          "print('jax' in sys.modules)"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
  assert probe.stdout.strip() == "False", probe.stderr
