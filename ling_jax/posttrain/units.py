"""Linguistic units: the sentences / reasoning steps of a response, and which tokens belong to each.

The unit-level policy loss (losses.unit_policy_loss) takes its importance ratio per unit. A unit
is defined on the decoded text by `split_units` (docs/posttrain.md, "Linguistic units"):

  1. A newline ends a unit (the newline belongs to the unit it ends): every line is a step.
  2. Inside a line, a unit ends after sentence-final punctuation, a run of . ! ? (optionally
     followed by closing quotes or brackets), when whitespace and then a non-space character
     follow; the whitespace belongs to the ending unit. So "3.5" and "x.y" never split (no
     whitespace after the dot), and the end of the text ends the last unit.
  3. Exceptions to rule 2: an enumeration marker ("1. ", "12. ": digits and a dot, the whole unit
     so far) and the abbreviations e.g. / i.e. / vs. / cf. do not end a unit; a line whose first
     non-space character is "{" (a JSON tool call) is never split inside.
  4. A unit that is only whitespace (blank lines, leading spaces) joins the unit before it, or
     the one after it at the start of the text. So no unit is empty or blank.

Tokens are mapped to units through the text each token completes. `char_ends` gives, per token,
how many characters of the decoded text are final once that token is decoded: with the byte
tokenizer exactly (an incremental UTF-8 decoder), with any other tokenizer by decoding each
prefix and taking its common prefix with the full text, which is robust to tokenizers that
rewrite spaces or hold back partial characters, at O(T^2) decoding cost. A token belongs to the
unit of the last character it completes (so " The" after "3. " opens the new unit, ".\\n" closes
the old one); a token that completes no character (part of a multi-byte character) belongs to
the unit of the character it starts.
"""

from __future__ import annotations

import codecs
import re

import numpy as np

from ling_jax.data.tokenizer import ByteTokenizer

_FINAL = ".!?"
_CLOSERS = "\"')]}»”’"
_SPACE = " \t\r\f\v"
_ABBREVIATIONS = ("e.g.", "i.e.", "vs.", "cf.")
_ENUMERATION = re.compile(r"\d+\.")
_JSON_LINE = re.compile(r"[ \t\r\f\v]*\{")


def _ends_sentence(unit: str) -> bool:
  """Whether `unit` (the text since the unit's start, without the whitespace after it) ends with
  sentence-final punctuation that rule 2 counts (rule 3's exceptions excluded)."""
  core = unit.rstrip(_CLOSERS)
  if not core or core[-1] not in _FINAL:
    return False
  if _ENUMERATION.fullmatch(unit.strip()):
    return False
  words = core.split()
  return not (words and words[-1].lower() in _ABBREVIATIONS)


def split_units(text: str) -> list[tuple[int, int]]:
  """The (start, stop) character spans of the units of `text`, in order, covering it exactly."""
  cuts, start = [], 0
  n = len(text)
  json_line = bool(_JSON_LINE.match(text))
  for i, ch in enumerate(text):
    if ch == "\n":
      cuts.append(i + 1)
      start = i + 1
      json_line = bool(_JSON_LINE.match(text, i + 1))
    elif (ch in _SPACE and not json_line and i + 1 < n and text[i + 1] not in _SPACE + "\n"):
      if _ends_sentence(text[start: i + 1].rstrip(_SPACE)):
        cuts.append(i + 1)
        start = i + 1
  bounds = [0] + [c for c in cuts if c < n] + [n]
  spans = [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
  merged: list[list[int]] = []
  for a, b in spans:  # rule 4
    if merged and not text[a:b].strip():
      merged[-1][1] = b
    elif merged and not text[merged[-1][0]: merged[-1][1]].strip():
      merged[-1][1] = b
    else:
      merged.append([a, b])
  return [(a, b) for a, b in merged]


def char_ends(tokens, tokenizer) -> tuple[np.ndarray, str]:
  """(ends [T] int: characters of the decoded text final after token t, the decoded text)."""
  tokens = [int(t) for t in tokens]
  if isinstance(tokenizer, ByteTokenizer):
    # The incremental decoder emits a character once its bytes are complete (or known invalid:
    # then U+FFFD), exactly as the whole-text decode with errors="replace" does.
    dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
    ends, parts, n = [], [], 0
    for t in tokens:
      piece = dec.decode(bytes([t % 256]))
      parts.append(piece)
      n += len(piece)
      ends.append(n)
    tail = dec.decode(b"", final=True)  # a cut character at the end
    parts.append(tail)
    if tail:
      ends[-1] += len(tail)
    return np.asarray(ends, np.int64), "".join(parts)
  full = tokenizer.decode(tokens)
  ends, best = [], 0
  for t in range(len(tokens)):
    prefix = tokenizer.decode(tokens[: t + 1])
    if full.startswith(prefix):
      common = len(prefix)
    else:
      common = 0
      for a, b in zip(prefix, full):
        if a != b:
          break
        common += 1
    best = max(best, common)  # a later token cannot un-finalise text
    ends.append(best)
  if ends:
    ends[-1] = len(full)
  return np.asarray(ends, np.int64), full


def token_units(tokens, tokenizer) -> np.ndarray:
  """unit ids [T] int32 (0, 1, ... in order, every id used) of a token sequence's units."""
  T = len(tokens)
  if T == 0:
    return np.zeros(0, np.int32)
  ends, text = char_ends(tokens, tokenizer)
  if not text:
    return np.zeros(T, np.int32)
  unit_of_char = np.zeros(len(text), np.int64)
  for u, (a, b) in enumerate(split_units(text)):
    unit_of_char[a:b] = u
  starts = np.concatenate([[0], ends[:-1]])
  last = np.where(ends > starts, ends - 1, starts)  # no character completed: the one it starts
  ids = unit_of_char[np.minimum(last, len(text) - 1)]
  return np.unique(ids, return_inverse=True)[1].astype(np.int32)  # renumber densely


def masked_units(tokens, mask, tokenizer) -> np.ndarray:
  """unit ids [T] int32 for the masked tokens of a (multi-turn) response, -1 elsewhere.

  Each maximal run of mask == 1 (one assistant turn) is split on its own, so no unit straddles a
  tool message; ids keep increasing from one run to the next, unique within the sequence.
  """
  tokens, mask = np.asarray(tokens), np.asarray(mask) > 0
  out = np.full(len(tokens), -1, np.int32)
  t, next_id = 0, 0
  while t < len(tokens):
    if not mask[t]:
      t += 1
      continue
    stop = t
    while stop < len(tokens) and mask[stop]:
      stop += 1
    ids = token_units(tokens[t:stop], tokenizer)
    out[t:stop] = ids + next_id
    next_id += int(ids.max()) + 1
    t = stop
  return out
