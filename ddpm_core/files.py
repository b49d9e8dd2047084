"""Files written so that nothing already saved is lost: atomic replacement, output paths
checked before the work starts, and one owner per run folder.

This module owns how outputs reach the disk; what they contain is the caller's. Every output
(checkpoint, PNG, GIF, tensor, JSON, figure) is written to a temporary file beside its target,
flushed to disk, then renamed over it: a crash or a full disk leaves the previous file intact.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".lock"


class OutputError(OSError):
    """An output cannot be written (a folder, read-only, full disk); the message says which and why."""


def _reason(error: OSError, path: Path) -> str:
    if error.errno == errno.ENOSPC:
        return f"no space left on the device holding {path.parent}; free some space"
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{path.parent} is not writable; choose a folder you can write to"
    return error.strerror or type(error).__name__


def check_output(path: str | Path, kind: str = "file") -> Path:
    """Fail now, before any work, if `path` cannot be written as a `kind` ("file" or "folder"):
    a file where a folder belongs or the reverse, a path under a file, a folder that is not
    writable. Nothing is created: the nearest folder that exists is tested instead."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise OutputError(f"{path} is a folder; give the name of a file (inside it, or elsewhere)")
    if kind == "folder" and path.exists() and not path.is_dir():
        raise OutputError(f"{path} is a file, not a folder; choose another path")
    folder = path if kind == "folder" else path.parent
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not existing.is_dir():
        raise OutputError(f"cannot write {path}: {existing} is a file, not a folder; choose another path")
    try:
        with tempfile.TemporaryFile(dir=existing):  # the only reliable test of "writable" (ACLs, read-only mounts)
            pass
    except OSError as error:
        raise OutputError(f"cannot write {path}: {_reason(error, existing / 'x')}") from error
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, durable: bool = True) -> Iterator[Path]:
    """A temporary path beside `path` (ending in the same suffix, so writers that read the
    format from the name still work); renamed over `path` when the block ends without an error, else removed.

        with atomic_path("grid.png") as tmp:
            image.save(tmp)

    `durable=False` skips the fsync (for thousands of small files): a crash of the machine may
    then lose the new file, but a failed write still never replaces the old one.
    """
    path = Path(path)
    if path.is_dir():  # refused now: os.replace would fail only after the work
        check_output(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # .grid.k3j2.tmp.png: hidden, marked as temporary, and still ending in the format's suffix
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f"{TEMP_SUFFIX}{path.suffix}", dir=path.parent)
    except OSError as error:
        check_output(path)  # says what is in the way (a file for a folder, a read-only folder)
        raise OutputError(f"cannot write {path}: {_reason(error, path)}") from error
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as handle:  # on disk before the rename, so a power cut keeps old or new
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        tmp.unlink(missing_ok=True)
        if isinstance(error, OutputError):
            raise
        raise OutputError(f"could not write {path} ({_reason(error, path)}); the previous file, if any, is kept") \
            from error
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> Path:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def to_json(data) -> str:
    """`data` as indented JSON, with NaN and inf (which JSON lacks) written as null."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: finite(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(item) for item in value]
        return value

    return json.dumps(finite(data), indent=2, allow_nan=False)


def write_json(path: str | Path, data) -> Path:
    """`data` as indented JSON (`to_json`), written atomically."""
    return write_text(path, to_json(data) + "\n")


def remove_orphans(folder: str | Path) -> list[Path]:
    """Delete the temporary files that killed writes left in `folder` and its sub-folders.
    Call it only while holding the folder's lock (no one else is writing there)."""
    orphans = [p for p in Path(folder).rglob(".*") if TEMP_SUFFIX in p.suffixes and p.is_file()]
    for path in orphans:
        path.unlink(missing_ok=True)
    if orphans:
        log.info("removed %d unfinished temporary file(s) from %s", len(orphans), folder)
    return orphans


class FolderLocked(FileExistsError):
    """Another live process owns the run folder; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


@contextlib.contextmanager
def folder_lock(folder: str | Path) -> Iterator[Path]:
    """Own `folder` for the duration of the block: FOLDER/.lock holds this process's pid, host and
    start time. A lock whose process is gone (same host, no such pid) is stale and taken over; a
    live owner, or one on another host, refuses the second process with FolderLocked."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):  # a second try after removing a stale lock
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                owner = json.loads(lock.read_text() or "{}")
            except (OSError, ValueError):
                owner = {}
            pid, host = owner.get("pid"), owner.get("host")
            if isinstance(pid, int) and host == me["host"] and not _alive(pid):
                log.info("taking over the stale lock of process %s in %s", pid, folder)
                lock.unlink(missing_ok=True)
                continue
            raise FolderLocked(
                f"{folder} is in use by process {pid} on {host} (since {owner.get('started', '?')}); wait for it to "
                f"finish or choose another --out (if that process is gone, delete {lock})") from None
        with os.fdopen(fd, "w") as handle:
            json.dump(me, handle)
        break
    else:
        raise FolderLocked(f"could not take the lock {lock}; delete it if no run uses {folder}")
    try:
        yield lock
    finally:
        with contextlib.suppress(OSError):
            if json.loads(lock.read_text()).get("pid") == me["pid"]:
                lock.unlink()
