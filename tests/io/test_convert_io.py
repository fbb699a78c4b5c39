"""The converter's I/O building blocks: the tiled transpose, recycled block buffers,
direct reads, the piecewise safetensors writer and the page-cache recycler. Each must give the
same bytes as the plain way of doing it, and fail loudly, never silently."""

import concurrent.futures
import errno
import os
import random

import ml_dtypes
import numpy as np
import pytest

from ling_jax.convert import store
from ling_jax.convert.pagecache import PageCacheRecycler
from ling_jax.convert.pipeline import Buffers
from ling_jax.convert.source import read_buffer_bytes, read_view, transpose2d
from ling_jax.io.safetensors import (ALIGN, SafetensorsError, SafetensorsFile, TensorNotFoundError,
                                     write_safetensors)
from ling_jax.io.safetensors_writer import SafetensorsWriter, phased


def random_bits(rng, dtype, shape):
  dtype = np.dtype(dtype)
  n = int(np.prod(shape)) * dtype.itemsize
  return rng.integers(0, 256, n, dtype=np.uint8).view(dtype).reshape(shape)


# ------------------------------------------------------------------------------- transpose2d
@pytest.mark.parametrize("dtype", [np.uint8, ml_dtypes.bfloat16, np.float32])
@pytest.mark.parametrize("shape", [(1, 1), (5, 300), (256, 128), (300, 131)])
def test_transpose2d_is_bit_exact(dtype, shape):
  x = random_bits(np.random.default_rng(0), dtype, shape)
  want = np.ascontiguousarray(x.T)
  got = transpose2d(x)
  assert got.dtype == x.dtype and got.shape == want.shape and got.flags.c_contiguous
  assert got.tobytes() == want.tobytes()
  out = np.empty(want.shape, dtype)
  assert transpose2d(x, out) is out and out.tobytes() == want.tobytes()
  strided = x[::2, ::3]
  assert transpose2d(strided).tobytes() == np.ascontiguousarray(strided.T).tobytes()
  with pytest.raises(ValueError, match="expected a C-contiguous"):
    transpose2d(x, np.empty((shape[1] + 1, shape[0]), dtype))


# ---------------------------------------------------------------------------- Buffers
def test_buffers_are_reused_only_when_nothing_refers_to_them():
  pool = Buffers(budget=3 * 1024)
  a, b = pool.take([1024, 1024])
  first = a.ctypes.data
  held = a[:10]  # e.g. tensorstore holding a written block, or a view of it
  del a
  (c,) = pool.take([1024])
  assert c.ctypes.data not in (first, b.ctypes.data)
  assert pool.take([1024]) is None  # the budget is spent and every buffer is in use
  del held
  (d,) = pool.take([1024])
  assert d.ctypes.data == first
  del b, c, d
  (e,) = pool.take([2048])  # makes room by letting go of free buffers of another size
  assert e.nbytes == 2048 and sum(x.nbytes for x in pool.buffers) <= 3 * 1024
  del e
  assert pool.take([4096]) is None  # larger than the whole budget: the caller allocates


def test_a_block_written_through_tensorstore_is_reused_only_after_its_write(tmp_path):
  """The importer hands tensorstore recycled buffers (can_reference_source_data_indefinitely):
  tensorstore must hold a reference until the write commits, and drop it then."""
  variables = {("w",): ((3, 64, 32), np.dtype(np.float32), 1)}
  writer = store.StateWriter(str(tmp_path / "state"), variables, chunk_bytes=1 << 20)
  pool = Buffers(64 * 32 * 4)
  first = None
  for k in range(3):
    (buf,) = pool.take([64 * 32 * 4])
    if k:
      assert buf.ctypes.data == first  # the same memory every time, once the write is done
    first = buf.ctypes.data
    block = buf.view(np.float32).reshape(64, 32)
    block[...] = k
    future = writer.write(("w",), (k,), block)
    del block
    assert pool.take([64 * 32 * 4]) is None or future.commit.done()
    del buf
    future.result()
  reader = store.StateReader(str(tmp_path / "state"))
  for k in range(3):
    assert (reader.read(("w",), (k,)) == k).all()


# ---------------------------------------------------------------------------- read_view
@pytest.fixture
def shard(tmp_path):
  rng = np.random.default_rng(1)
  tensors = {"a": random_bits(rng, np.uint8, (5000,)), "b": random_bits(rng, ml_dtypes.bfloat16,
                                                                          (37, 11)),
             "c": random_bits(rng, np.float32, (3 * ALIGN + 3,))}
  write_safetensors(tmp_path / "x.safetensors", tensors)
  return tmp_path / "x.safetensors", tensors


@pytest.mark.parametrize("direct", [True, False])
def test_direct_and_buffered_reads_give_the_file_bytes(shard, direct):
  path, tensors = shard
  with SafetensorsFile(path) as st:
    for name, want in tensors.items():
      view = st.get(name)
      for part, ref in [(view, want), (view[1:], want[1:]), (view[:1], want[:1])]:
        assert read_view(part, direct=direct).tobytes() == ref.tobytes()
        buf = np.empty(read_buffer_bytes(part.nbytes), np.uint8)
        got = read_view(part, buf, direct=direct)
        assert np.shares_memory(got, buf) and got.tobytes() == ref.tobytes()
        assert got.dtype == ref.dtype and got.shape == ref.shape


def test_direct_reads_fall_back_where_the_filesystem_refuses_them(shard, monkeypatch):
  path, tensors = shard
  real_open = os.open

  def no_direct(p, flags, *a):
    if flags & getattr(os, "O_DIRECT", 0):
      raise OSError(errno.EINVAL, "Invalid argument", p)
    return real_open(p, flags, *a)

  monkeypatch.setattr(os, "open", no_direct)
  with SafetensorsFile(path) as st:
    assert read_view(st.get("c"), direct=True).tobytes() == tensors["c"].tobytes()


@pytest.mark.parametrize("direct", [True, False])
def test_a_file_truncated_after_opening_is_an_error_naming_it(shard, direct):
  path, _ = shard
  with SafetensorsFile(path) as st:
    view = st.get("c")
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(OSError, match="unexpected end of file") as e:
      read_view(view, direct=direct)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------ SafetensorsWriter
@pytest.mark.parametrize("direct", [True, False])
def test_piecewise_writer_writes_what_write_safetensors_writes(tmp_path, direct):
  rng = np.random.default_rng(2)
  tensors = {"a": random_bits(rng, ml_dtypes.bfloat16, (300, 70)),
             "b": random_bits(rng, np.float32, (5000,)), "c": random_bits(rng, np.uint8, (3,))}
  write_safetensors(tmp_path / "ref.safetensors", tensors, metadata={"format": "pt"})
  specs = {n: (a.shape, a.dtype) for n, a in tensors.items()}
  size = 3 * ALIGN + 5  # pieces that straddle pages, with whole pages inside for O_DIRECT
  with SafetensorsWriter(tmp_path / "x.safetensors", specs, metadata={"format": "pt"},
                         direct=direct) as w:
    pieces = [(n, o, a.reshape(-1).view(np.uint8)[o:o + size])
              for n, a in tensors.items() for o in range(0, a.nbytes, size)]
    random.Random(0).shuffle(pieces)

    def put(piece):
      name, offset, data = piece
      buf = phased(np.empty(data.nbytes + ALIGN, np.uint8), w.position(name, offset), data.nbytes)
      buf[...] = data
      w.write(name, offset, buf)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
      list(pool.map(put, pieces))
    assert not (tmp_path / "x.safetensors").exists()  # published only on close
  assert (tmp_path / "x.safetensors").read_bytes() == (tmp_path / "ref.safetensors").read_bytes()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["ref.safetensors", "x.safetensors"]


def test_piecewise_writer_refuses_gaps_overlaps_and_strays(tmp_path):
  path = tmp_path / "x.safetensors"
  specs = {"a": ((10,), np.float32)}
  with pytest.raises(SafetensorsError, match=r"'a': bytes 20\.\.40 were never written"):
    with SafetensorsWriter(path, specs) as w:
      w.write("a", 0, np.zeros(5, np.float32))
  with pytest.raises(SafetensorsError, match=r"'a': bytes 20\.\.24 were written twice"):
    with SafetensorsWriter(path, specs) as w:
      w.write("a", 0, np.zeros(6, np.float32))
      w.write("a", 20, np.zeros(5, np.float32))
  w = SafetensorsWriter(path, specs)
  with pytest.raises(SafetensorsError, match="outside its 40 bytes"):
    w.write("a", 36, np.zeros(2, np.float32))
  with pytest.raises(TensorNotFoundError, match="'b'"):
    w.write("b", 0, np.zeros(1, np.float32))
  w.abort()
  with pytest.raises(RuntimeError, match="interrupted"):
    with SafetensorsWriter(path, specs) as w:
      w.write("a", 0, np.zeros(10, np.float32))
      raise RuntimeError("interrupted")
  assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------ PageCacheRecycler
def test_page_cache_recycler_never_changes_the_files(tmp_path):
  rng = np.random.default_rng(3)
  data = {f"f{k}": rng.integers(0, 256, 1 << 20, dtype=np.uint8).tobytes() for k in range(4)}
  with PageCacheRecycler(str(tmp_path), interval=0.001) as recycler:
    for name, blob in data.items():
      with open(tmp_path / name, "wb") as f:
        for k in range(0, len(blob), 4096):
          f.write(blob[k:k + 4096])
    os.remove(tmp_path / "f0")  # files may vanish under it
    del data["f0"]
    recycler.sweep()
  for name, blob in data.items():
    assert (tmp_path / name).read_bytes() == blob
