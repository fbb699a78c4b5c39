"""The linguistic-unit splitter on tricky text, and the token -> unit map for byte and HF tokenizers."""

import numpy as np
import pytest

from ling_jax.data import ByteTokenizer, HFTokenizer
from ling_jax.posttrain.units import char_ends, masked_units, split_units, token_units

TOK = ByteTokenizer()


def units(text):
  spans = split_units(text)
  assert "".join(text[a:b] for a, b in spans) == text  # the units cover the text exactly, in order
  return [text[a:b] for a, b in spans]


@pytest.mark.parametrize("text, expected", [
    ("First, 3+4=7. Then 7*5=35!\nAnswer: 35", ["First, 3+4=7. ", "Then 7*5=35!\n", "Answer: 35"]),
    ("Pi is about 3.14 and x.y stays. Ok", ["Pi is about 3.14 and x.y stays. ", "Ok"]),
    ("1. first item\n2. second. Third\n10. tenth", ["1. first item\n", "2. second. ", "Third\n",
                                                    "10. tenth"]),
    ("\n\n  Hello.  World\n\n\nEnd\n", ["\n\n  Hello.  ", "World\n\n\n", "End\n"]),
    ("Use e.g. this or i.e. that. Vs. cf. Done", ["Use e.g. this or i.e. that. ",
                                                  "Vs. cf. Done"]),
    ('He said "Stop." Then (why?) left.', ['He said "Stop." ', "Then (why?) ", "left."]),
    ('{"tool": "calc", "args": {"expr": "1. 2"}}\nWait... what?! Yes.',
     ['{"tool": "calc", "args": {"expr": "1. 2"}}\n', "Wait... ", "what?! ", "Yes."]),
    ("end.", ["end."]), ("a.\tb", ["a.\t", "b"]), ("   ", ["   "]), ("", []),
    ("x = 3.\n", ["x = 3.\n"]), ("Price: $3.50. Next", ["Price: $3.50. ", "Next"]),
])
def test_split_units_tricky_cases(text, expected):
  assert units(text) == expected
  assert all(u.strip() for u in units(text)) or not text.strip()  # no blank unit unless all blank


def test_byte_tokens_to_units_with_multibyte_characters():
  text = "Der Preis: 3.5 €. Nächster Schritt.\n漢字 ok"
  ids = TOK.encode(text)
  ends, decoded = char_ends(ids, TOK)
  assert decoded == text and ends[-1] == len(text)
  # A character's last byte completes it; its earlier bytes complete nothing.
  euro = text.index("€")
  euro_bytes = np.flatnonzero(ends == euro + 1)
  assert len(euro_bytes) == 1 and ends[euro_bytes[0] - 1] == euro
  got = token_units(ids, TOK)
  spans = split_units(text)
  expected = np.concatenate([np.full(len(text[a:b].encode()), u) for u, (a, b) in enumerate(spans)])
  np.testing.assert_array_equal(got, expected)  # each byte goes to the unit of its character
  # A cut character at the end, and invalid bytes, still map every token.
  cut = ids[:-4]
  assert len(token_units(cut, TOK)) == len(cut)
  bad = np.array([0xFF, ord("a"), ord("."), ord(" "), 0xE6, ord("b")])
  assert token_units(bad, TOK).tolist() == [0, 0, 0, 0, 1, 1]


class _PlainBytes:
  """The byte tokenizer seen only through encode / decode: exercises the generic prefix path."""

  def encode(self, text):
    return TOK.encode(text)

  def decode(self, ids):
    return TOK.decode(ids)


def test_generic_prefix_path_matches_the_byte_path():
  rng = np.random.default_rng(0)
  for text in ["Héllo wörld. Zwei! Drei?\n漢. x", "a. b. c.\n\n\nd"]:
    ids = TOK.encode(text)
    np.testing.assert_array_equal(token_units(ids, _PlainBytes()), token_units(ids, TOK))
  noise = rng.integers(0, 256, 60)
  np.testing.assert_array_equal(token_units(noise, _PlainBytes()), token_units(noise, TOK))


def test_hf_bpe_tokens_to_units(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  tk = tokenizers.Tokenizer(tokenizers.models.BPE())
  tk.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tk.decoder = tokenizers.decoders.ByteLevel()
  corpus = ["First add 3 and 4. Then multiply by 5.\nAnswer: 35"] * 20
  tk.train_from_iterator(corpus, tokenizers.trainers.BpeTrainer(
      vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
  path = str(tmp_path / "tokenizer.json")
  tk.save(path)
  tok = HFTokenizer(path)
  text = "First add 3 and 4. Then multiply by 5.\nAnswer: 35"
  ids = tok.encode(text)
  assert len(ids) < len(text)  # real merges, tokens span several characters
  got = token_units(ids, tok)
  assert got.tolist() == sorted(got.tolist()) and got.max() + 1 == len(split_units(text))
  # " Then" (one token with its leading space) opens the second unit; ".\n" closes it.
  pieces = [tok.decode(ids[: t + 1])[len(tok.decode(ids[:t])):] for t in range(len(ids))]
  text_of = lambda u: "".join(p for p, g in zip(pieces, got) if g == u)
  assert [text_of(u) for u in range(3)] == ["First add 3 and 4.", " Then multiply by 5.\n",
                                            "Answer: 35"]


def test_masked_units_split_each_turn_separately():
  turn1, tool, turn2 = "Look it up. Now.\n", "<|tool|>\n7", "So. Answer: 7"
  ids = np.concatenate([TOK.encode(turn1), TOK.encode(tool), TOK.encode(turn2)])
  mask = np.concatenate([np.ones(len(turn1)), np.zeros(len(tool)), np.ones(len(turn2))])
  got = masked_units(ids, mask, TOK)
  assert (got[mask == 0] == -1).all()
  expected = ([0] * len("Look it up. ") + [1] * len("Now.\n") + [-1] * len(tool)
              + [2] * len("So. ") + [3] * len("Answer: 7"))
  assert got.tolist() == expected
  assert masked_units(ids, np.zeros(len(ids)), TOK).tolist() == [-1] * len(ids)
