"""Publishing a folder that ling_jax writes (a converted checkpoint, an HF folder), safely.

    with Destination(path, overwrite=False, sources=[src]) as dest:
      ...                               # write everything into dest.partial
      dest.commit({"format": "ling_jax.orbax/1", ...})

The one protocol of `convert import` / `export`, `ling_jax.convert.save` and `save_hf`
(docs/checkpoints.md, "Publishing a folder, and what --overwrite may delete"):

- Paths are resolved first, symlinks followed: a link to a folder publishes into the folder it
  points to and stays a link. A destination that is, contains or lies inside a source is refused.
- `X.lock` beside the destination is held (`flock`) from start to end: a second writer of X fails
  at once, naming the first one's pid. The kernel drops the lock if its process dies.
- Everything is written into `X.partial`. `commit` writes the marker `ling_jax.json` last (the
  format, and the list of every entry it publishes), then renames X -> X.old, X.partial -> X and
  removes X.old.
- Only an empty folder, or one whose marker lists every entry in it, is ever replaced or removed:
  the tool deletes nothing it did not write. A folder it is about to discard holds `DISCARD`
  first, which it removes last, so a folder is recognised as garbage at every point of its
  removal; a `X.old` without it (a user's backup, say) is never touched.
- A run first repairs what an interrupted one left (under the lock): a `X.partial` is removed; a
  discarded `X.old` is removed if X exists, and renamed back to X if X is missing (killed between
  the two renames: the old X is the complete one, which the interrupted command did not replace).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import warnings
from typing import Any, Iterable

from ling_jax.io.safetensors import fsync_dir

MARKER = "ling_jax.json"
PARTIAL, OLD, LOCK = ".partial", ".old", ".lock"
DISCARD = ".ling_jax-discard"
# A converted checkpoint whose marker predates the `files` list holds exactly this.
_UNLISTED_FILES = ("state",)


class DestinationError(ValueError):
  """A destination that ling_jax refuses to write or replace; the message names it and why."""


def real_path(path: str | os.PathLike) -> str:
  return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, folder: str) -> bool:
  return path.startswith(folder.rstrip(os.sep) + os.sep)


def check_apart(dst: str, sources: Iterable[str | os.PathLike]) -> None:
  """Refuse a (resolved) destination that is, contains or lies inside one of `sources`."""
  for source in sources:
    src = real_path(source)
    if dst == src:
      raise DestinationError(f"the destination {dst} is the source itself")
    if _inside(dst, src):
      raise DestinationError(f"the destination {dst} lies inside the source {src}")
    if _inside(src, dst):
      raise DestinationError(f"the destination {dst} contains the source {src}")


def read_json(path: str) -> Any:
  """The JSON value in `path`, or None if it is missing or unreadable."""
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def why_not_ours(folder: str) -> str | None:
  """None if ling_jax may remove `folder`: it is empty, or its marker lists every entry in it;
  else why not (for an error message: "<folder> <reason>")."""
  if os.path.islink(folder) or not os.path.isdir(folder):
    return "is not a folder"
  entries = set(os.listdir(folder)) - {DISCARD}
  if not entries:
    return None
  marker = read_json(os.path.join(folder, MARKER))
  fmt = marker.get("format") if isinstance(marker, dict) else None
  files = marker.get("files", _UNLISTED_FILES) if isinstance(marker, dict) else None
  if not (isinstance(fmt, str) and fmt.startswith("ling_jax.") and isinstance(files, list | tuple)
          and all(isinstance(f, str) for f in files)):
    return f"holds {_few(entries)} and no valid {MARKER}, so ling_jax did not write it"
  extra = entries - set(files) - {MARKER}
  if extra:
    return (f"holds {len(extra)} entr{'y' if len(extra) == 1 else 'ies'} ling_jax did not write: "
            + _few(extra))
  return None


def _few(names, k: int = 5) -> str:
  names = sorted(names)
  return ", ".join(map(repr, names[:k])) + (", ..." if len(names) > k else "")


def remove_ours(folder: str) -> None:
  """Delete a folder of ours (`why_not_ours` is None, or it holds `DISCARD`) so that a crash at
  any point leaves it recognisable: `DISCARD` is written first and removed last, the marker goes
  before the data, so a half-removed folder is never mistaken for a complete one."""
  discard = os.path.join(folder, DISCARD)
  if not os.path.exists(discard):
    _touch(discard)
    fsync_dir(folder)
  _unlink(os.path.join(folder, MARKER))
  for name in os.listdir(folder):
    if name != DISCARD:
      path = os.path.join(folder, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.unlink(path)
  os.unlink(discard)
  os.rmdir(folder)


def _touch(path: str) -> None:
  os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))


def _unlink(path: str) -> None:
  try:
    os.unlink(path)
  except FileNotFoundError:
    pass


def _write_json(path: str, obj: Any) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())


def fsync_tree(root: str) -> None:
  """fsync every file and folder under `root` (a rename must not become visible before the data
  it publishes is durable)."""
  for folder, _, files in os.walk(root):
    for name in files:
      fd = os.open(os.path.join(folder, name), os.O_RDONLY)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
    fsync_dir(folder)


class Lock:
  """An advisory `flock` on `path` (created if missing, removed on release) naming its holder."""

  def __init__(self, path: str, what: str):
    self.path, self.what, self.fd = path, what, None

  def acquire(self) -> None:
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
          os.close(fd)
          raise
        text = os.pread(fd, 100, 0).decode(errors="replace").split()
        os.close(fd)
        pid = text[1] if len(text) > 1 and text[0] == "ling_jax" else "unknown"
        raise DestinationError(f"another ling_jax process (pid {pid}) is writing {self.what}; "
                               f"wait for it to finish (its lock: {self.path})") from None
      try:  # the holder we waited for may have removed the file: lock the one at the path now
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if not same:
        os.close(fd)
        continue
      text = os.pread(fd, 100, 0).decode(errors="replace")
      if text and not text.startswith("ling_jax "):
        os.close(fd)
        raise DestinationError(f"{self.path} exists and is not a lock file of ling_jax's; "
                               f"ling_jax locks {self.what} there: move it away")
      os.ftruncate(fd, 0)
      os.pwrite(fd, f"ling_jax {os.getpid()}\n".encode(), 0)
      self.fd = fd
      return

  def release(self) -> None:
    if self.fd is not None:
      _unlink(self.path)  # while still held: a waiter then finds a new file and locks that
      os.close(self.fd)
      self.fd = None


class Destination:
  """A folder being written: `partial` to write into, `commit(marker)` to publish it (module doc).

  `path` is the resolved destination; `sources` are folders it must stay apart from.
  """

  def __init__(self, path: str | os.PathLike, *, overwrite: bool = False,
               sources: Iterable[str | os.PathLike] = ()):
    self.path = real_path(path)
    check_apart(self.path, sources)
    self.overwrite = overwrite
    self.partial, self.old = self.path + PARTIAL, self.path + OLD
    self.committed = False
    self._lock = Lock(self.path + LOCK, self.path)

  def __enter__(self) -> "Destination":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    self._lock.acquire()
    try:
      self.recover()
      self._check_replaceable()
      os.mkdir(self.partial)
      _touch(os.path.join(self.partial, DISCARD))  # until `commit`: incomplete, ours
    except BaseException:
      self._lock.release()
      raise
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if not self.committed and os.path.lexists(self.partial):
        try:
          remove_ours(self.partial)
        except OSError as e:
          if exc_type is None:
            raise
          warnings.warn(f"could not remove {self.partial}: {e}; the next run removes it")
    finally:
      self._lock.release()

  def recover(self) -> None:
    """Repair what an interrupted run left beside the destination (call under the lock)."""
    path, old, partial = self.path, self.old, self.partial
    if os.path.isdir(old) and not os.path.islink(old) and (
        DISCARD in os.listdir(old) or not os.listdir(old)):  # (empty: its removal was cut short)
      if not os.path.lexists(path) and why_not_ours(old) is None and os.path.exists(
          os.path.join(old, MARKER)):
        os.replace(old, path)  # killed between the two renames of a replacement: undo the first
        fsync_dir(os.path.dirname(path))
      else:
        remove_ours(old)
    if (os.path.isdir(path) and os.path.exists(os.path.join(path, DISCARD))
        and why_not_ours(path) is None):
      os.unlink(os.path.join(path, DISCARD))  # killed before it moved away: it stays
    if os.path.lexists(partial):
      if not (os.path.isdir(partial) and not os.path.islink(partial)
              and (DISCARD in os.listdir(partial) or why_not_ours(partial) is None)):
        raise DestinationError(f"{partial} is in the way: ling_jax builds {path} there, and did "
                               f"not write what is there now; move it away")
      remove_ours(partial)

  def _check_replaceable(self) -> None:
    path = self.path
    if not os.path.lexists(path):
      return
    if not os.path.isdir(path):
      raise FileExistsError(f"{path} exists and is not a folder")
    if os.listdir(path):
      if not self.overwrite:
        raise FileExistsError(f"{path} exists and is not empty (pass overwrite=True / "
                              f"--overwrite)")
      why = why_not_ours(path)
      if why is not None:
        raise DestinationError(f"{path} {why}: overwrite replaces only an empty folder or one "
                               f"ling_jax wrote, and leaves this one alone")
    if os.path.lexists(self.old):
      raise DestinationError(f"{self.old} is in the way: ling_jax moves {path} there while "
                             f"replacing it, and did not write what is there now; move it away")

  def commit(self, marker: dict[str, Any], durable: bool = True) -> None:
    """Write `marker` (with the list of the entries written) and publish the folder as `path`.

    `durable`: fsync everything first, so that after a crash the renamed folder never refers to
    data that did not reach the disk. Once the new folder is in place, failing to remove the old
    one is only a warning: the command did what it was asked, and the next run removes it.
    """
    files = sorted(set(os.listdir(self.partial)) - {DISCARD, MARKER})
    _write_json(os.path.join(self.partial, MARKER), {**marker, "files": files})
    os.unlink(os.path.join(self.partial, DISCARD))
    if durable:
      fsync_tree(self.partial)
    parent = os.path.dirname(self.path)
    if not os.path.lexists(self.path):
      os.replace(self.partial, self.path)
      self.committed = True
      fsync_dir(parent)
      return
    _touch(os.path.join(self.path, DISCARD))
    fsync_dir(self.path)
    os.replace(self.path, self.old)
    try:
      os.replace(self.partial, self.path)
    except BaseException:
      os.replace(self.old, self.path)
      _unlink(os.path.join(self.path, DISCARD))
      raise
    self.committed = True
    fsync_dir(parent)
    try:
      remove_ours(self.old)
    except OSError as e:
      warnings.warn(f"{self.path} is written, but its previous version could not be removed "
                    f"from {self.old}: {e}; the next run removes it")


__all__ = ["DISCARD", "MARKER", "Destination", "DestinationError", "Lock", "check_apart",
           "fsync_tree", "read_json", "real_path", "remove_ours", "why_not_ours"]
