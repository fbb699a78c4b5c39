"""The safetensors reader / writer (docs/architecture.md §4.1): bit-exact round trips, interop,
clear errors."""

import json
import os
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from ling_jax.io.safetensors import (DTYPES, SafetensorsError, SafetensorsFile, TensorNotFoundError,
                                     write_safetensors)


def random_array(rng, dtype, shape):
  dtype = np.dtype(dtype)
  if dtype == np.bool_:
    return rng.random(shape) < 0.5
  if dtype.kind in "iu":
    info = np.iinfo(dtype)
    return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
  # Floats of every width incl. bf16 / fp8: random bit patterns cover NaN, inf and subnormals,
  # which a value-level comparison would miss.
  bits = rng.integers(0, 256, size=int(np.prod(shape)) * dtype.itemsize, dtype=np.uint8)
  return bits.view(dtype).reshape(shape)


def as_bits(a):
  a = np.ascontiguousarray(a)
  return a.reshape(-1).view(np.uint8)


def test_round_trip_every_dtype_is_bit_exact(tmp_path):
  rng = np.random.default_rng(0)
  tensors = {f"t.{code.lower()}": random_array(rng, dt, (3, 5)) for code, dt in DTYPES.items()}
  tensors["scalar"] = np.array(1.5, np.float32)
  tensors["empty"] = np.zeros((0, 4), ml_dtypes.bfloat16)
  tensors["odd.length"] = random_array(rng, np.int8, (7,))  # later tensors start misaligned
  tensors["transposed"] = random_array(rng, np.float32, (6, 4)).T  # non-contiguous input
  path = tmp_path / "all.safetensors"
  n = write_safetensors(path, tensors, metadata={"format": "pt", "note": "x"})
  assert n == sum(a.nbytes for a in tensors.values())
  assert (8 + struct.unpack("<Q", path.read_bytes()[:8])[0]) % 8 == 0

  with SafetensorsFile(path) as st:
    assert st.metadata == {"format": "pt", "note": "x"}
    assert sorted(st.keys()) == sorted(tensors) == st.keys()  # data is in sorted name order
    for name, want in tensors.items():
      dtype, shape = st.info(name)
      got = st.get(name)
      assert dtype == want.dtype and shape == want.shape == got.shape and got.dtype == want.dtype
      np.testing.assert_array_equal(as_bits(got), as_bits(want), err_msg=name)
      assert isinstance(got, np.memmap) or got.size == 0
      assert not got.flags.writeable
  assert not list(tmp_path.glob("*.tmp-*"))


def test_reads_files_written_by_the_safetensors_package(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {
      "a.f32": rng.standard_normal((4, 3)).astype(np.float32),
      "b.f16": rng.standard_normal((2, 8)).astype(np.float16),
      "c.i64": rng.integers(-9, 9, (5,)).astype(np.int64),
      "d.i32": rng.integers(-9, 9, (2, 2, 2)).astype(np.int32),
      "e.u8": rng.integers(0, 255, (3,)).astype(np.uint8),
  }
  path = tmp_path / "theirs.safetensors"
  safetensors.numpy.save_file(tensors, str(path), metadata={"format": "np"})
  with SafetensorsFile(path) as st:
    assert set(st.keys()) == set(tensors) and st.metadata == {"format": "np"}
    for name, want in tensors.items():
      np.testing.assert_array_equal(st.get(name), want)
      assert st.get(name).dtype == want.dtype


def test_files_written_here_load_in_the_safetensors_package(tmp_path):
  rng = np.random.default_rng(2)
  tensors = {"w": rng.standard_normal((16, 8)).astype(np.float32),
             "b": rng.standard_normal((8,)).astype(np.float32),
             "i": np.arange(6, dtype=np.int64).reshape(2, 3)}
  path = tmp_path / "ours.safetensors"
  write_safetensors(path, tensors, metadata={"format": "pt"})
  loaded = safetensors.numpy.load_file(str(path))
  assert set(loaded) == set(tensors)
  for name, want in tensors.items():
    np.testing.assert_array_equal(loaded[name], want)


def test_bf16_written_here_loads_in_mlx(tmp_path):
  mx = pytest.importorskip("mlx.core")
  rng = np.random.default_rng(3)
  w = rng.standard_normal((32, 16)).astype(ml_dtypes.bfloat16)
  path = tmp_path / "bf16.safetensors"
  write_safetensors(path, {"w": w, "bias": np.float32([0.5, -1.0])})
  loaded = mx.load(str(path))
  assert loaded["w"].dtype == mx.bfloat16
  np.testing.assert_array_equal(np.array(loaded["w"].astype(mx.float32)), w.astype(np.float32))
  np.testing.assert_array_equal(np.array(loaded["bias"]), [0.5, -1.0])


def test_reads_bf16_written_by_mlx(tmp_path):
  mx = pytest.importorskip("mlx.core")
  w = mx.random.normal((8, 12)).astype(mx.bfloat16)
  path = tmp_path / "mlx.safetensors"
  mx.save_safetensors(str(path), {"w": w, "i": mx.arange(5)})
  with SafetensorsFile(path) as st:
    assert st.info("w") == (np.dtype(ml_dtypes.bfloat16), (8, 12))
    np.testing.assert_array_equal(st.get("w").astype(np.float32), np.array(w.astype(mx.float32)))
    np.testing.assert_array_equal(st.get("i"), np.arange(5))


def test_truncated_file_names_the_file_and_the_tensor(tmp_path):
  path = tmp_path / "model-00002-of-00003.safetensors"
  write_safetensors(path, {"model.layers.3.attention.dense.weight": np.ones((8, 8), np.float32),
                           "model.layers.3.attention.g_norm.weight": np.ones((8,), np.float32)})
  size = path.stat().st_size
  with open(path, "r+b") as f:
    f.truncate(size - 3)
  with pytest.raises(SafetensorsError) as err:
    SafetensorsFile(path)
  msg = str(err.value)
  assert "model-00002-of-00003.safetensors is truncated" in msg
  # Sorted order puts dense before g_norm, so g_norm is the tensor that runs past the end.
  assert "'model.layers.3.attention.g_norm.weight'" in msg
  assert f"ends at byte {size}" in msg and f"has {size - 3} bytes" in msg


@pytest.mark.parametrize("corrupt, expect", [
    (lambda raw: raw[:8] + b"{not json" + raw[17:], "not UTF-8 JSON"),
    (lambda raw: struct.pack("<Q", 10**12) + raw[8:], "header length"),
    (lambda raw: raw[:5], "too short"),
])
def test_corrupted_header_is_a_clear_error(tmp_path, corrupt, expect):
  path = tmp_path / "bad.safetensors"
  write_safetensors(path, {"x": np.ones((4,), np.float32)})
  path.write_bytes(corrupt(path.read_bytes()))
  with pytest.raises(SafetensorsError, match=expect) as err:
    SafetensorsFile(path)
  assert "bad.safetensors" in str(err.value)


def write_raw(path, header, data=b""):
  blob = json.dumps(header).encode()
  path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


@pytest.mark.parametrize("header, expect", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, "'b'.*overlaps tensor 'a'"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}}, "'a' has data_offsets out of"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, "'a' spans 8 bytes"),
    ({"a": {"dtype": "Q4", "shape": [2], "data_offsets": [0, 8]}}, "'a' has unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, "'a' has an invalid shape"),
    ({"a": {"dtype": "F32", "shape": [2]}}, "'a' needs dtype, shape and data_offsets"),
    ({"__metadata__": {"n": 3}}, "__metadata__ must map strings"),
    ([1, 2], "expected a JSON object"),
])
def test_invalid_headers_name_the_file_and_tensor(tmp_path, header, expect):
  path = tmp_path / "h.safetensors"
  write_raw(path, header, b"\0" * 16)
  with pytest.raises(SafetensorsError, match=expect) as err:
    SafetensorsFile(path)
  assert "h.safetensors" in str(err.value)


def test_unknown_tensor_name_is_a_key_error_naming_it_and_the_file(tmp_path):
  path = tmp_path / "one.safetensors"
  write_safetensors(path, {"x": np.ones((2,), np.float32)})
  with SafetensorsFile(path) as st:
    assert "x" in st and "y" not in st and len(st) == 1
    with pytest.raises(KeyError) as err:
      st.get("model.norm.weight")
    assert isinstance(err.value, TensorNotFoundError)
    assert "'model.norm.weight'" in str(err.value) and "one.safetensors" in str(err.value)
    with pytest.raises(KeyError):
      st.info("y")


class FailsToConvert:
  """Claims a shape and dtype (so the header is written) but fails when its data is needed."""
  shape, dtype = (4,), np.dtype(np.float32)

  def __array__(self, dtype=None, copy=None):
    raise RuntimeError("device lost")


def test_atomic_write_leaves_nothing_when_the_writer_fails_midway(tmp_path):
  path = tmp_path / "x.safetensors"
  # "a" is streamed to disk before "b" (sorted order) fails to convert.
  with pytest.raises(RuntimeError, match="device lost"):
    write_safetensors(path, {"a": np.ones((1000,), np.float32), "b": FailsToConvert()})
  assert list(tmp_path.iterdir()) == []

  # An existing file is left untouched by a failed overwrite.
  write_safetensors(path, {"old": np.zeros((2,), np.float32)})
  with pytest.raises(RuntimeError):
    write_safetensors(path, {"a": np.ones((3,), np.float32), "b": FailsToConvert()})
  assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
  with SafetensorsFile(path) as st:
    assert st.keys() == ["old"]


def test_writer_rejects_unsupported_dtypes_and_bad_metadata(tmp_path):
  with pytest.raises(SafetensorsError, match="'c'"):
    write_safetensors(tmp_path / "c.safetensors", {"c": np.zeros((2,), np.complex64)})
  with pytest.raises(TypeError, match="metadata"):
    write_safetensors(tmp_path / "m.safetensors", {"x": np.zeros(2)}, metadata={"n": 3})
  assert list(tmp_path.iterdir()) == []


def test_big_endian_input_is_written_little_endian(tmp_path):
  a = np.arange(5, dtype=">i4")
  path = tmp_path / "be.safetensors"
  write_safetensors(path, {"a": a})
  with SafetensorsFile(path) as st:
    np.testing.assert_array_equal(st.get("a"), a)
    assert st.get("a").dtype == np.dtype("<i4")
  assert os.path.getsize(path) % 4 == 0


F32 = lambda shape, begin, end: {"dtype": "F32", "shape": shape, "data_offsets": [begin, end]}


@pytest.mark.parametrize("header, data, expect", [
    ({"a": F32([1], 0, 4), "b": F32([1], 8, 12)}, 12, "'b' starts at byte 8.*gap of 4 bytes after "
                                                      "tensor 'a'"),
    ({"a": F32([1], 4, 8)}, 8, "'a' starts at byte 4.*gap of 4 bytes before it"),
    ({"a": F32([1], 0, 4)}, 8, "last 4 bytes, after the last tensor \\('a'\\), belong to no"),
    ({}, 4, "last 4 bytes, after the header, belong to no tensor"),
    ({"a": F32([2**32, 2**32], 0, 0)}, 0, "'a': F32\\[4294967296, 4294967296\\] overflows"),
    ({"a": F32([2**40, 2**40, 0], 0, 0)}, 0, "'a': F32.* overflows"),
    ({"a": F32([2**62], 0, 0)}, 0, "'a': F32.* overflows"),
    ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, 4, "unsupported dtype"),
    ({"__metadata__": [], "a": F32([1], 0, 4)}, 4, "__metadata__ must map strings"),
])
def test_headers_the_reference_library_refuses_are_refused(tmp_path, header, data, expect):
  """The data buffer must be covered exactly, and sizes computed without overflow, as the
  `safetensors` package requires; each case is checked against it."""
  path = tmp_path / "gap.safetensors"
  write_raw(path, header, b"\1" * data)
  with pytest.raises(Exception):
    safetensors.numpy.load_file(path)
  with pytest.raises(SafetensorsError, match=expect) as err:
    SafetensorsFile(path)
  assert "gap.safetensors" in str(err.value)


@pytest.mark.parametrize("header, data", [
    ({"a": F32([1], 0, 4), "z": F32([0, 3], 4, 4), "b": F32([2], 4, 12)}, 12),
    ({"z": F32([0], 0, 0)}, 0),
    ({"__metadata__": None, "a": F32([1], 0, 4)}, 4),
    ({}, 0),
])
def test_headers_the_reference_library_accepts_are_accepted(tmp_path, header, data):
  path = tmp_path / "ok.safetensors"
  write_raw(path, header, np.arange(data // 4, dtype=np.float32).tobytes())
  want = safetensors.numpy.load_file(path)
  with SafetensorsFile(path) as st:
    assert sorted(st.keys()) == sorted(want)
    for name, w in want.items():
      np.testing.assert_array_equal(st.get(name), w)
