"""The converted checkpoint's format, pinned against Orbax itself (`ling_jax/convert/store.py`).

The streaming importer writes Orbax's layout by hand through tensorstore. These tests hold it to
the Orbax version pinned in pyproject.toml: Orbax's own `StandardCheckpointer` restores what
`StateWriter` writes bit-exactly, the metadata Orbax writes for the same state matches ours field
by field (chunking and compression are ours to choose), `StateReader` reads what Orbax writes,
and a checkpoint of a format this version does not know is refused. (A streamed import restored
through Orbax, on meshes, is `test_convert.py::test_restored_model_matches_mlx_and_any_mesh`.)
"""

import ast
import json
import os
import re
from importlib import metadata

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import tensorstore as ts

from ling_jax.convert import CheckpointFormatError, load, store

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BF16 = np.dtype(ml_dtypes.bfloat16)
# state path -> (shape, dtype, leading index axes): a stacked variable, integer layer keys, a
# vector, and a variable whose slices are chunked further (chunk_bytes below).
VARIABLES = {
    ("groups", "layers", "0", "mlp", "experts", "w"): ((2, 4, 16, 8), BF16, 2),
    ("groups", "layers", "1", "norm", "scale"): ((2, 8), np.dtype(np.float32), 1),
    ("word_embeddings",): ((40, 8), np.dtype(np.float32), 0),
}


def random_state():
  rng = np.random.default_rng(7)
  return {p: rng.standard_normal(s).astype(d) for p, (s, d, _) in VARIABLES.items()}


def nest(flat):
  out = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def write_ours(state_dir, values):
  """Written the importer's way: one leading-index slice at a time, small chunks."""
  writer = store.StateWriter(str(state_dir), VARIABLES, chunk_bytes=256)
  futures = []
  for path, value in values.items():
    n_lead = VARIABLES[path][2]
    for index in np.ndindex(*value.shape[:n_lead]):
      futures.append(writer.write(path, index, np.ascontiguousarray(value[index])))
  for f in futures:
    f.result()
  writer.finish()
  return writer


def zarr_metadata(state_dir) -> dict:
  kv = ts.KvStore.open(store._kvstore_spec(str(state_dir)), context=store._context()).result()
  return {k.decode()[:-len("/.zarray")]: json.loads(kv.read(k).result().value)
          for k in kv.list().result() if k.endswith(b"/.zarray")}


def test_tests_run_under_the_pinned_orbax():
  pins = dict(re.findall(r'"(orbax-checkpoint|tensorstore)==([^"]+)"',
                         open(os.path.join(ROOT, "pyproject.toml")).read()))
  assert pins == {"orbax-checkpoint": metadata.version("orbax-checkpoint"),
                  "tensorstore": metadata.version("tensorstore")}


def test_orbax_restores_what_the_streaming_writer_writes(tmp_path):
  values = random_state()
  write_ours(tmp_path / "state", values)
  with ocp.StandardCheckpointer() as ckptr:
    meta = ckptr.metadata(tmp_path / "state").item_metadata.tree
    restored = ckptr.restore(tmp_path / "state")  # no target: the checkpoint's own metadata
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = nest({p: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device)
                   for p, v in values.items()})
    on_device = ckptr.restore(tmp_path / "state", target)
  for path, want in values.items():
    m = nest_get(meta, path)
    assert (tuple(m.shape), np.dtype(m.dtype)) == (want.shape, want.dtype), path
    for got in (nest_get(restored, path), np.asarray(nest_get(on_device, path))):
      assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), path


def nest_get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def test_our_metadata_matches_what_orbax_writes_and_we_read_orbax(tmp_path):
  values = random_state()
  writer = write_ours(tmp_path / "ours", values)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(tmp_path / "orbax", nest({p: jax.numpy.asarray(v) for p, v in values.items()}))
    ckptr.wait_until_finished()

  ours = json.loads((tmp_path / "ours" / "_METADATA").read_text())
  theirs = json.loads((tmp_path / "orbax" / "_METADATA").read_text())
  for key, entry in theirs["tree_metadata"].items():
    entry["value_metadata"].pop("write_shape")  # Orbax writes one chunk per array; we choose ours
    path = ast.literal_eval(key)
    assert ours["tree_metadata"][key]["value_metadata"].pop("write_shape") == writer.chunks[path]
  assert ours == theirs

  ours, theirs = zarr_metadata(tmp_path / "ours"), zarr_metadata(tmp_path / "orbax")
  assert sorted(ours) == sorted(theirs) == sorted(store.param_name(p) for p in VARIABLES)
  for name, meta in theirs.items():
    assert meta.pop("compressor") is not None and ours[name].pop("compressor") is None
    ours[name].pop("chunks"), meta.pop("chunks")
    assert ours[name] == meta, name

  reader = store.StateReader(str(tmp_path / "orbax"))
  for path, want in values.items():
    got = reader.read(path, ())
    assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), path


@pytest.mark.parametrize("marker, expect", [
    ({"format": "ling_jax.orbax/2"}, "unknown checkpoint format 'ling_jax.orbax/2'; this version "
                                     "of ling_jax reads 'ling_jax.orbax/1'"),
    ({"config": {}}, "unknown checkpoint format None"),
    ({"format": "ling_jax.hf/1", "files": []}, "marks an HF folder that ling_jax wrote"),
    ("{not json", "is unreadable or not a JSON object"),
])
def test_a_checkpoint_of_unknown_format_is_refused_naming_the_file(tmp_path, marker, expect):
  (tmp_path / "ckpt").mkdir()
  path = tmp_path / "ckpt" / store.MARKER
  path.write_text(marker if isinstance(marker, str) else json.dumps(marker))
  with pytest.raises(CheckpointFormatError, match=re.escape(expect)) as e:
    load(tmp_path / "ckpt")
  assert str(path) in str(e.value)
