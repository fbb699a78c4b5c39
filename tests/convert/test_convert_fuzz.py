"""Randomly corrupted safetensors headers and config.json files fed to `load_hf` and `import_hf`.

A corrupted shard must be refused by our reader exactly when the reference `safetensors` library
refuses it. Every case must end in a clean load or in one of the project's own error types, whose
message names the corrupted file (a shard, or the index where the culprit is the disagreement
between the two); no other exception, no hang, and nothing at the import's destination that looks
complete unless it is. Seeded and bounded: a few hundred cases on a two-layer model, each under an
alarm.
"""

import json
import os
import random
import shutil
import struct

import pytest
import safetensors

from testing import deadline
from hf_fixtures import INDEX, MTP_FILE, tiny_hf_config, write_random_hf_checkpoint
from ling_jax.convert import (CheckpointFormatError, ConversionError, DestinationError,
                              import_hf, store)
from ling_jax.hf_io import CheckpointError, load_hf
from ling_jax.io.safetensors import SafetensorsError, SafetensorsFile, TensorNotFoundError

PROJECT_ERRORS = (CheckpointError, SafetensorsError, TensorNotFoundError, CheckpointFormatError,
                  ConversionError, DestinationError)
SMALL = dict(progress=False, block_bytes=1 << 16, chunk_bytes=1 << 16, workers=2)
CASE_SECONDS = 60  # a hang, not a slow machine: a clean case takes about a second


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
  root = tmp_path_factory.mktemp("fuzz")
  write_random_hf_checkpoint(root / "hf", tiny_hf_config(num_hidden_layers=2), num_shards=2)
  return root / "hf"


def check_case(folder, ckpt, culprits: tuple[str, ...], what: str) -> str:
  """Run load_hf and import_hf on the corrupted folder -> "ok" / "error" (asserts the rules)."""
  outcomes = []
  for name, run in (("load_hf", lambda: load_hf(folder, progress=False)),
                    ("import_hf", lambda: import_hf(folder, ckpt, **SMALL))):
    try:
      with deadline(CASE_SECONDS, f"{name} on {what}"):
        run()
      outcomes.append("ok")
    except PROJECT_ERRORS as e:
      assert any(c in str(e) for c in culprits), f"{name} on {what}: {type(e).__name__}: {e}"
      outcomes.append("error")
    except Exception as e:  # noqa: BLE001 - the point of the test
      raise AssertionError(f"{name} on {what}: {type(e).__name__}: {e}") from e
    if name == "import_hf":
      beside = sorted(p for p in os.listdir(os.path.dirname(ckpt))
                      if p.startswith(os.path.basename(ckpt)))
      if outcomes[-1] == "ok":
        assert beside == ["ckpt"] and sorted(os.listdir(ckpt)) == [store.MARKER, store.STATE]
        store.read_marker(ckpt)
        shutil.rmtree(ckpt)
      else:
        assert beside == [], f"import_hf on {what} left {beside}"
  return "/".join(outcomes)


# ------------------------------------------------------------------------ safetensors headers
def mutate_entry(rng: random.Random, entry):
  """A corrupted copy of one tensor's header entry (or a replacement for it)."""
  e = dict(entry) if isinstance(entry, dict) else {}
  b, end = entry["data_offsets"]
  shape = list(entry["shape"])
  choice = rng.randrange(6)
  if choice == 0:
    e["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "Q4", "",
                             "f32", None, 3, ["F32"], {"F32": 1}])
  elif choice == 1:
    d = rng.randrange(len(shape)) if shape else 0
    e["shape"] = rng.choice([
        [], shape + [1], shape[1:], shape[:d] + [shape[d] * 2 if shape else 2] + shape[d + 1:],
        shape[:d] + [-1] + shape[d + 1:], [2**40] + shape, [2**32, 2**32], [2**63] + shape,
        [float(x) for x in shape], [str(x) for x in shape], None, [shape], shape[::-1], 3,
        [True] + shape])
  elif choice == 2:
    e["data_offsets"] = rng.choice([
        [b + 1, end + 1], [b, end - 1], [end, b], [b - 4, end - 4], [0, end - b], [b],
        [b, end, 0], [str(b), end], [float(b), end], None, [2**64, 2**64 + 4], [-1, end],
        [b, 2**63], [b + 2**32, end + 2**32]])
  elif choice == 3:
    del e[rng.choice(["dtype", "shape", "data_offsets"])]
  elif choice == 4:
    return rng.choice([3, [], "x", None, True, {"dtype": "F32"}])
  else:
    e["extra"] = rng.choice([1, "x", None])
  return e


def corrupt_shard(rng: random.Random, raw: bytes) -> bytes:
  (n,) = struct.unpack("<Q", raw[:8])
  header_bytes, data = raw[8:8 + n], raw[8 + n:]
  choice = rng.randrange(8)
  if choice == 0:  # a few random bytes of the header text
    h = bytearray(header_bytes)
    for _ in range(rng.randint(1, 3)):
      h[rng.randrange(len(h))] = rng.randrange(256)
    return raw[:8] + bytes(h) + data
  if choice == 1:  # the header length
    m = rng.choice([0, 1, 7, n - 1, n + 1, n + 8, 2 * n, len(raw), 2**63, 2**64 - 1,
                    rng.randrange(2**64)])
    return struct.pack("<Q", m) + raw[8:]
  if choice == 2:  # cut or extended
    return (raw[:rng.randrange(len(raw))] if rng.random() < 0.5
            else raw + bytes(rng.randrange(256) for _ in range(rng.randint(1, 64))))
  header = json.loads(header_bytes)
  names = sorted(k for k in header if k != "__metadata__")
  name = rng.choice(names)
  if choice in (3, 4, 5):
    header[name] = mutate_entry(rng, header[name])
  elif choice == 6:
    kind = rng.randrange(4)
    if kind == 0:
      header[name + ".x"] = header.pop(name)  # renamed
    elif kind == 1:
      header[name.replace(".weight", ".bias")] = dict(header[name])  # a second tensor on its bytes
    elif kind == 2:
      header["__metadata__"] = rng.choice([{"format": 3}, [], "pt", {"a": None}, 0])
    else:
      del header[name]
  else:
    header = rng.choice([[], "x", 3, None, [header]])
  blob = json.dumps(header).encode()
  blob += b" " * (-len(blob) % 8)
  return struct.pack("<Q", len(blob)) + blob + data


def accepts(open_file) -> bool:
  try:
    with open_file():
      return True
  except (safetensors.SafetensorError, SafetensorsError):
    return False


def test_corrupted_safetensors_headers(pristine, tmp_path):
  rng = random.Random(1234)
  shards = sorted(f for f in os.listdir(pristine) if f.endswith(".safetensors"))
  assert MTP_FILE in shards and len(shards) == 3
  outcomes = {}
  for case in range(240):
    fname = rng.choice(shards)
    path = pristine / fname
    raw = path.read_bytes()
    bad = corrupt_shard(rng, raw)
    path.write_bytes(bad)
    try:
      what = f"case {case} ({fname})"
      # The reference library is the judge of the header: it and we accept the same files.
      assert accepts(lambda: safetensors.safe_open(path, "np")) == accepts(
          lambda: SafetensorsFile(path)), what
      outcome = check_case(pristine, str(tmp_path / "ckpt"), (fname, INDEX), what)
    finally:
      path.write_bytes(raw)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
  # The corruptions reach every check: most cases fail, and the harmless ones still load.
  assert outcomes.get("error/error", 0) > 150 and outcomes.get("ok/ok", 0) > 0, outcomes


# ------------------------------------------------------------------------------- config.json
def corrupt_config(rng: random.Random, config: dict) -> str:
  choice = rng.randrange(6)
  c = dict(config)
  key = rng.choice(sorted(c))
  if choice == 0:
    del c[key]
  elif choice == 1:  # a wrong type
    v = c[key]
    c[key] = rng.choice([str(v), [v], {"v": v}, None, not v if isinstance(v, bool) else True,
                         1.5, "", []])
  elif choice == 2:  # a wrong value of the right type
    v = c[key]
    if isinstance(v, bool):
      c[key] = not v
    elif isinstance(v, int):
      c[key] = rng.choice([0, -1, 1, v + 1, 2 * v, 10**12, -(2**63)])
    elif isinstance(v, float):
      c[key] = rng.choice([0.0, -1.0, 1e30, float("nan"), float("inf")])
    elif isinstance(v, str):
      c[key] = rng.choice(["", "x", v.upper(), v + "_v2"])
    else:
      c[key] = rng.choice([{}, {"type": "yarn"}, [], 0])
  elif choice == 3:
    c[rng.choice(["new_field", "moe_type", "head_dim_v2"])] = 1
  elif choice == 4:  # not JSON, or not an object
    text = json.dumps(config)
    return rng.choice([text[:rng.randrange(len(text))], "", "null", "[]", "3", "\x00\xff",
                       text.replace(":", "=", 1)])
  else:
    c.update(rng.choice([{"torch_dtype": "int8"}, {"torch_dtype": 3}, {"dtype": None},
                         {"quantization_config": {"quant_method": "gptq"}},
                         {"quantization_config": 3}]))
  return json.dumps(c)


@pytest.mark.filterwarnings("ignore::ling_jax.hf_config.ConfigDefaultsWarning")  # deleted fields
def test_corrupted_config_json(pristine, tmp_path):
  """config.json fields deleted, of the wrong type or value, unknown, or not JSON at all."""
  rng = random.Random(4321)
  path = pristine / "config.json"
  raw = path.read_text()
  config = json.loads(raw)
  outcomes = {}
  for case in range(120):
    bad = corrupt_config(rng, config)
    path.write_text(bad)
    try:
      outcome = check_case(pristine, str(tmp_path / "ckpt"), ("config.json",),
                           f"case {case} (config.json: {bad[:200]})")
    finally:
      path.write_text(raw)
    outcomes[outcome] = outcomes.get(outcome, 0) + 1
  assert outcomes.get("error/error", 0) > 40 and outcomes.get("ok/ok", 0) > 0, outcomes
