"""python -m ling_jax.generate CKPT_OR_HF_DIR --prompt "..." : generate text, streamed.

PATH is a converted checkpoint (`python -m ling_jax.convert import`, which copies the HF folder's
tokenizer files into it) or an HF folder. The tokenizer is PATH/tokenizer.json (or --tokenizer),
the chat template PATH/chat_template.jinja or tokenizer_config.json's `chat_template`; with a
template the prompt becomes one user turn (after --system, if given) and the assistant's turn is
generated, without one the prompt is the raw text. Generation stops at max_new_tokens or at an eos
id: the config's eos_token_id and the tokenizer's eos_token. Text is printed as it is generated,
in pieces of --steps-per-sync decode steps (one host round trip a piece, none a token); a summary
line (tokens, tokens/s, MTP acceptance) goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

DTYPES = ("bfloat16", "float32")


class CliError(ValueError):
  """Bad command-line input; the message names the file or the value."""


def read_prompt(args) -> str:
  """The prompt text: --prompt, or the UTF-8 contents of --prompt-file."""
  if args.prompt is not None:
    if not args.prompt.strip():
      raise CliError("--prompt is empty")
    return args.prompt
  path = args.prompt_file
  if not os.path.isfile(path):
    raise CliError(f"--prompt-file {path}: no such file")
  with open(path, "rb") as f:
    data = f.read()
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    raise CliError(f"--prompt-file {path}: not UTF-8 text (byte {e.start}: "
                   f"{data[e.start:e.start + 1]!r})") from None
  if not text.strip():
    raise CliError(f"--prompt-file {path} is empty")
  return text


def tokenizer_file(path: str, given: str | None) -> str:
  """The tokenizer.json to use: --tokenizer (a file or a folder holding one), else PATH's."""
  where = given if given is not None else path
  file = os.path.join(where, "tokenizer.json") if os.path.isdir(where) else where
  if not os.path.isfile(file):
    if given is not None:
      raise CliError(f"--tokenizer {given}: no tokenizer.json there")
    raise CliError(f"{path} has no tokenizer.json: an HF folder needs its tokenizer files, and "
                   "a converted checkpoint gets them from `convert import` when its source "
                   "folder has them; or pass --tokenizer FILE_OR_DIR")
  return file


def load_model(path: str, dtype: str | None, kernels):
  """(config, model) from a converted checkpoint (its ling_jax.json marks it) or an HF folder."""
  import jax.numpy as jnp

  import ling_jax
  from ling_jax.convert import store
  from ling_jax.io.destination import MARKER, read_json

  if not os.path.isdir(path):
    raise CliError(f"{path}: no such folder (a converted checkpoint or an HF folder)")
  marker = read_json(os.path.join(path, MARKER))
  dt = None if dtype is None else getattr(jnp, dtype)
  if isinstance(marker, dict) and marker.get("format") in store.KNOWN_FORMATS:
    return ling_jax.load(path, dtype=dt, kernels=kernels)
  if not os.path.isfile(os.path.join(path, "config.json")):
    raise CliError(f"{path} is neither a converted checkpoint ({MARKER}) nor an HF folder "
                   "(config.json)")
  return ling_jax.load_hf(path, dtype=jnp.bfloat16 if dt is None else dt, kernels=kernels,
                          progress=False)


def eos_ids(cfg, folder: str, tok) -> list[int]:
  """The config's eos ids plus the tokenizer's eos_token (tokenizer_config.json), if it has one."""
  ids = cfg.eos_token_id
  ids = [] if ids is None else list(ids) if isinstance(ids, tuple) else [ids]
  try:
    with open(os.path.join(folder, "tokenizer_config.json"), encoding="utf-8") as f:
      eos = json.load(f).get("eos_token")
  except (OSError, ValueError):
    eos = None
  eos = eos.get("content") if isinstance(eos, dict) else eos
  if isinstance(eos, str) and tok.token_to_id(eos) is not None:
    ids.append(tok.token_to_id(eos))
  return sorted(set(ids))


def parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog="python -m ling_jax.generate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("path", metavar="CKPT_OR_HF_DIR")
  src = p.add_mutually_exclusive_group(required=True)
  src.add_argument("--prompt", help="the prompt text")
  src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from a UTF-8 file")
  p.add_argument("--max-new-tokens", type=int, default=256)
  p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
  p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
  p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: all)")
  p.add_argument("--seed", type=int, default=0)
  chat = p.add_mutually_exclusive_group()
  chat.add_argument("--chat", dest="chat", action="store_true", default=None,
                    help="apply the chat template (default: when the folder has one)")
  chat.add_argument("--no-chat", dest="chat", action="store_false", help="the raw prompt")
  p.add_argument("--system", help="a system message before the prompt (chat only)")
  p.add_argument("--mtp", type=int, default=0, metavar="K",
                 help="MTP speculative decoding, K drafted tokens a step (0: off)")
  p.add_argument("--dtype", choices=DTYPES, default=None,
                 help="parameter and compute dtype (default: a converted checkpoint's own, "
                      "bfloat16 for an HF folder)")
  p.add_argument("--tokenizer", metavar="FILE_OR_DIR", help="tokenizer.json, if not PATH's")
  p.add_argument("--ignore-eos", action="store_true", help="run to --max-new-tokens")
  p.add_argument("--chunk", type=int, default=2048, help="prompt tokens per prefill call")
  p.add_argument("--steps-per-sync", type=int, default=8,
                 help="decode steps between two prints (one host round trip each)")
  return p


def main(argv=None) -> int:
  args = parser().parse_args(argv)
  try:
    return _run(args)
  except (ValueError, OSError) as e:  # bad input: the message names the culprit
    print(f"error: {e}", file=sys.stderr)
    return 1


def _run(args) -> int:
  if args.system is not None and args.chat is False:
    raise CliError("--system needs the chat template (drop --no-chat)")
  text = read_prompt(args)
  tok_file = tokenizer_file(args.path, args.tokenizer)
  from tokenizers import Tokenizer  # after the cheap checks: --help and bad input stay instant

  from ling_jax.generate.api import stream
  from ling_jax.model import Kernels
  from ling_jax.posttrain.chat import ChatError, load_chat_template

  tok = Tokenizer.from_file(tok_file)
  template = None
  if args.chat is not False:
    try:
      template = load_chat_template(args.path)
    except ChatError:
      if args.chat:  # asked for explicitly
        raise
  if template is not None:
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    text = template.render(messages + [{"role": "user", "content": text}],
                           add_generation_prompt=True)
  elif args.system is not None:
    raise CliError(f"--system needs a chat template, and {args.path} has none")
  ids = tok.encode(text, add_special_tokens=False).ids
  if not ids:
    raise CliError("the prompt encodes to no tokens")
  cfg, model = load_model(args.path, args.dtype, Kernels())
  eos = None if args.ignore_eos else eos_ids(cfg, args.path, tok)
  print(f"prompt: {len(ids)} tokens"
        + (f", chat template {template.name}" if template is not None else ", no chat template"),
        file=sys.stderr)
  t0 = time.perf_counter()
  pieces = stream(model, [ids], args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, eos_ids=eos, seed=args.seed,
                  mtp_draft=args.mtp, chunk=args.chunk, steps_per_sync=args.steps_per_sync)
  out, shown, first = [], "", None
  for piece in pieces:
    if not isinstance(piece, list):
      result = piece
      break
    first = first or time.perf_counter()
    out += piece[0]
    # Decode everything so far: a token may complete a character or merge with the next one.
    now = tok.decode(out)
    if now.startswith(shown):
      sys.stdout.write(now[len(shown):])
      sys.stdout.flush()
      shown = now
  sys.stdout.write(tok.decode(out)[len(shown):] + "\n")
  elapsed = time.perf_counter() - (first or t0)
  n = int(result.lengths[0])
  stop = "eos" if eos and n and out[-1] in eos else "max_new_tokens"
  rate = f", {(n - 1) / elapsed:.1f} tokens/s after the first" if n > 1 and elapsed > 0 else ""
  accept = (f", MTP acceptance {result.acceptance:.2f}" if result.acceptance is not None else "")
  print(f"generated {n} tokens (stopped at {stop}){rate}{accept}", file=sys.stderr)
  return 0
