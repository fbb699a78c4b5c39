"""The publish protocol every ling_jax writer shares (`ling_jax.io.destination`): what it may
delete, how it replaces a folder, how a re-run repairs a killed one, and the writers' lock.

The kill tests run the protocol in a subprocess that exits (`os._exit`, no cleanup, as a kill)
at its n-th filesystem operation, for every n, and check what a re-run makes of what is left.
"""

import json
import os
import subprocess
import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from ling_jax.io import destination as d
from ling_jax.io.destination import DISCARD, MARKER, Destination, DestinationError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def make_ours(folder, version: str, fmt="ling_jax.orbax/1"):
  """A folder shaped like a converted checkpoint of ours, whose data says `version`."""
  os.makedirs(folder / "state")
  (folder / "state" / "data").write_text(version)
  (folder / MARKER).write_text(json.dumps({"format": fmt, "files": ["state"]}))


def version(folder) -> str | None:
  """The version a complete folder of ours holds (None if it is not complete)."""
  marker = d.read_json(str(folder / MARKER))
  if not isinstance(marker, dict) or not (folder / "state" / "data").exists():
    return None
  return (folder / "state" / "data").read_text()


def publish(target, new_version: str, **kw):
  with Destination(target, **kw) as dest:
    os.mkdir(os.path.join(dest.partial, "state"))
    with open(os.path.join(dest.partial, "state", "data"), "w") as f:
      f.write(new_version)
    dest.commit({"format": "ling_jax.orbax/1"})


def leftovers(folder):
  return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name
                and p.name.startswith(folder.name))


# ------------------------------------------------------------------------------ what is ours
def test_only_empty_folders_and_folders_whose_marker_lists_everything_are_ours(tmp_path):
  (tmp_path / "empty").mkdir()
  assert d.why_not_ours(str(tmp_path / "empty")) is None
  make_ours(tmp_path / "ours", "v1")
  assert d.why_not_ours(str(tmp_path / "ours")) is None
  (tmp_path / "ours" / "tokenizer.json").write_text("{}")
  assert "1 entry ling_jax did not write: 'tokenizer.json'" in d.why_not_ours(
      str(tmp_path / "ours"))
  (tmp_path / "hf").mkdir()
  (tmp_path / "hf" / "config.json").write_text("{}")
  assert d.why_not_ours(str(tmp_path / "hf")) == (
      "holds 'config.json' and no valid ling_jax.json, so ling_jax did not write it")
  make_ours(tmp_path / "other", "v1", fmt="someone-else/1")
  assert "no valid ling_jax.json" in d.why_not_ours(str(tmp_path / "other"))
  (tmp_path / "file").write_text("x")
  assert d.why_not_ours(str(tmp_path / "file")) == "is not a folder"
  # A marker that predates the `files` list stands for exactly `state/`.
  (tmp_path / "ours" / "tokenizer.json").unlink()
  (tmp_path / "ours" / MARKER).write_text(json.dumps({"format": "ling_jax.orbax/1"}))
  assert d.why_not_ours(str(tmp_path / "ours")) is None


@pytest.mark.parametrize("dst, src, expect", [
    ("a", "a", "is the source itself"),
    ("a/b", "a", "lies inside the source"),
    ("a", "a/b", "contains the source"),
    ("link", "a", "is the source itself"),        # link -> a
    ("link/b", "a", "lies inside the source"),
])
def test_a_destination_must_stay_apart_from_its_sources(tmp_path, dst, src, expect):
  (tmp_path / "a" / "b").mkdir(parents=True)
  (tmp_path / "link").symlink_to(tmp_path / "a")
  with pytest.raises(DestinationError, match=expect):
    Destination(tmp_path / dst, overwrite=True, sources=[tmp_path / src])
  Destination(tmp_path / "ab", overwrite=True, sources=[tmp_path / "a"])  # a prefix, not a parent


def test_overwrite_refuses_folders_it_did_not_write_and_leaves_them_alone(tmp_path):
  target = tmp_path / "ckpt"
  target.mkdir()
  (target / "notes.txt").write_text("mine")
  with pytest.raises(FileExistsError, match="overwrite"):
    publish(target, "v2")
  with pytest.raises(DestinationError, match="'notes.txt'"):
    publish(target, "v2", overwrite=True)
  assert (target / "notes.txt").read_text() == "mine" and leftovers(target) == []
  (target / "notes.txt").unlink()
  publish(target, "v2")  # an empty folder may be replaced, even without overwrite
  assert version(target) == "v2" and leftovers(target) == []
  publish(target, "v3", overwrite=True)
  assert version(target) == "v3" and leftovers(target) == []


def test_a_users_old_and_partial_folders_are_never_touched(tmp_path):
  target = tmp_path / "ckpt"
  make_ours(tmp_path / "ckpt.old", "backup")  # a backup the user made, even of one of ours
  publish(target, "v1")
  assert version(tmp_path / "ckpt.old") == "backup" and version(target) == "v1"
  with pytest.raises(DestinationError, match="ckpt.old is in the way"):
    publish(target, "v2", overwrite=True)
  assert version(tmp_path / "ckpt.old") == "backup" and version(target) == "v1"
  (tmp_path / "ckpt.partial").mkdir()
  (tmp_path / "ckpt.partial" / "notes.txt").write_text("mine")
  with pytest.raises(DestinationError, match="ckpt.partial is in the way"):
    publish(tmp_path / "ckpt", "v2")
  assert (tmp_path / "ckpt.partial" / "notes.txt").read_text() == "mine"


def test_a_symlinked_destination_replaces_the_folder_it_points_to(tmp_path):
  make_ours(tmp_path / "real", "v1")
  (tmp_path / "link").symlink_to(tmp_path / "real")
  publish(tmp_path / "link", "v2", overwrite=True)
  assert (tmp_path / "link").is_symlink() and version(tmp_path / "link") == "v2"
  assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


# ---------------------------------------------------------------------- failures and kills
def test_a_failed_second_rename_puts_the_old_folder_back(tmp_path, monkeypatch):
  target = tmp_path / "ckpt"
  make_ours(target, "v1")
  real = os.replace

  def failing(src, dst):
    if src.endswith(".partial"):
      raise OSError("simulated")
    return real(src, dst)

  monkeypatch.setattr(os, "replace", failing)
  with pytest.raises(OSError, match="simulated"):
    publish(target, "v2", overwrite=True)
  monkeypatch.undo()
  assert version(target) == "v1" and leftovers(target) == []
  assert sorted(os.listdir(target)) == [MARKER, "state"]


def test_a_failure_after_the_commit_is_only_a_warning(tmp_path, monkeypatch):
  target = tmp_path / "ckpt"
  make_ours(target, "v1")
  real = d.remove_ours

  def failing(folder):
    if folder.endswith(".old"):
      raise PermissionError("simulated")
    return real(folder)

  monkeypatch.setattr(d, "remove_ours", failing)
  with pytest.warns(UserWarning, match="the next run removes it"):
    publish(target, "v2", overwrite=True)  # no exception: the new folder is in place
  monkeypatch.undo()
  assert version(target) == "v2" and leftovers(target) == ["ckpt.old"]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    publish(target, "v3", overwrite=True)
  assert version(target) == "v3" and leftovers(target) == []


KILLED = r"""
import os, shutil, sys, types
pkg = types.ModuleType("ling_jax")  # only ling_jax.io: no jax import, so each run is quick
pkg.__path__ = [os.path.join(sys.argv[1], "ling_jax")]
sys.modules["ling_jax"] = pkg
from ling_jax.io import destination as d
target, kill_at, count = sys.argv[2], int(sys.argv[3]), [0]

def killing(f):
  def op(*args, **kwargs):
    count[0] += 1
    if count[0] == kill_at:
      os._exit(17)
    return f(*args, **kwargs)
  return op

with d.Destination(target, overwrite=True) as dest:
  os.mkdir(os.path.join(dest.partial, "state"))
  with open(os.path.join(dest.partial, "state", "data"), "w") as f:
    f.write("v2")
  for mod, name in [(os, "replace"), (os, "unlink"), (os, "rmdir"), (os, "open"),
                    (shutil, "rmtree"), (d, "_write_json")]:
    setattr(mod, name, killing(getattr(mod, name)))
  dest.commit({"format": "ling_jax.orbax/1"})
"""


def test_a_rerun_repairs_a_run_killed_at_any_point_of_its_commit(tmp_path):
  outcomes = []
  for kill_at in range(1, 100):
    work = tmp_path / str(kill_at)
    work.mkdir()
    target = work / "ckpt"
    make_ours(target, "v1")
    r = subprocess.run([sys.executable, "-c", KILLED, ROOT, str(target), str(kill_at)],
                       capture_output=True, text=True)
    if r.returncode == 0:
      break
    assert r.returncode == 17, r.stderr
    # Whatever is at the destination is complete: the old version or the new one.
    assert not target.exists() or version(target) in ("v1", "v2"), kill_at
    with Destination(target, overwrite=True):  # a re-run, failing before it commits anything
      pass
    outcomes.append(version(target))
    assert leftovers(target) == [], (kill_at, leftovers(target))
    assert sorted(os.listdir(target)) == [MARKER, "state"], kill_at
  else:
    raise AssertionError("the commit never finished")
  assert version(target) == "v2" and leftovers(target) == []
  # Killed before the second rename: the old version stays; after it: the new one.
  first_new = outcomes.index("v2")
  assert first_new > 0 and outcomes == ["v1"] * first_new + ["v2"] * (len(outcomes) - first_new)


# ------------------------------------------------------------------------------------ lock
HOLDER = r"""
import os, sys, types
pkg = types.ModuleType("ling_jax")
pkg.__path__ = [os.path.join(sys.argv[1], "ling_jax")]
sys.modules["ling_jax"] = pkg
from ling_jax.io import destination as d
with d.Destination(sys.argv[2]):
  print("ready", flush=True)
  sys.stdin.readline()
"""


def test_a_second_writer_of_the_same_destination_fails_naming_the_first(tmp_path):
  target = tmp_path / "ckpt"
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, ROOT, str(target)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline() == "ready\n"
    with pytest.raises(DestinationError,
                       match=f"another ling_jax process \\(pid {holder.pid}\\) is writing "
                             f"{target}"):
      publish(target, "v2")
    # Through a symlink too: the lock is on the resolved path.
    (tmp_path / "link").symlink_to(target, target_is_directory=True)
    with pytest.raises(DestinationError, match=f"pid {holder.pid}"):
      publish(tmp_path / "link", "v2")
  finally:
    holder.communicate("done\n")
  assert holder.returncode == 0
  assert not (tmp_path / "ckpt.lock").exists() and not (tmp_path / "ckpt.partial").exists()
  publish(target, "v2")
  assert version(target) == "v2" and leftovers(target) == []


def test_a_lock_left_by_a_dead_process_does_not_block(tmp_path):
  (tmp_path / "ckpt.lock").write_text("ling_jax 999999\n")  # flock died with its process
  publish(tmp_path / "ckpt", "v1")
  assert version(tmp_path / "ckpt") == "v1" and leftovers(tmp_path / "ckpt") == []
  (tmp_path / "ckpt.lock").write_text("my notes")
  with pytest.raises(DestinationError, match="not a lock file of ling_jax"):
    publish(tmp_path / "ckpt", "v2", overwrite=True)
  assert (tmp_path / "ckpt.lock").read_text() == "my notes"


# ------------------------------------------------------------------ save_hf shares the protocol
def test_save_hf_overwrites_only_what_ling_jax_wrote(tmp_path, tmp_path_factory):
  import ling_jax
  from hf_fixtures import tiny_hf_config, write_random_hf_checkpoint
  src = tmp_path_factory.mktemp("src")  # a model to save (building one from scratch is slower)
  write_random_hf_checkpoint(src, tiny_hf_config(), num_shards=1)
  cfg, model = ling_jax.load_hf(src, jnp.float32, progress=False)
  out = tmp_path / "out"
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  with pytest.raises(DestinationError, match="'notes.txt'"):
    ling_jax.save_hf(model, cfg, out, overwrite=True, progress=False)
  assert os.listdir(out) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
  (out / "notes.txt").unlink()
  ling_jax.save_hf(model, cfg, out, overwrite=True, progress=False)
  (tmp_path / "link").symlink_to(out, target_is_directory=True)
  ling_jax.save_hf(model, cfg, tmp_path / "link", overwrite=True, progress=False)
  assert (tmp_path / "link").is_symlink() and sorted(os.listdir(tmp_path)) == ["link", "out"]
  assert d.why_not_ours(str(out)) is None and MARKER in os.listdir(out)
  _, loaded = ling_jax.load_hf(out, jnp.float32, progress=False)  # still an HF folder
  assert np.array_equal(loaded.word_embeddings.get_value(), model.word_embeddings.get_value())
