"""Atomic file writes: readers (and a process killed mid-write) see the old file or the new one, never half.

Every file imageloop writes for others to read (run records, reports, artifacts, `store.json`, HNSW
indexes) goes through `atomic_writer`: a uniquely named temporary file beside the target, flushed and
fsynced, renamed over the target, then the folder fsynced so the rename itself survives a power cut.
Unique names let several processes write the same target at once; the last rename wins, whole.

Evaluations keep a journal instead (`jsonl_journal`, `read_jsonl`): one JSON line per finished item,
fsynced as it is written, so a crash loses at most the items in flight and a rerun skips the rest.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from imageloop.errors import StorageError

# What the disk (not the program) did: full, read-only, refused, failing.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


@contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """A binary file that replaces `path` when the block ends, and is discarded if the block raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; a record or report is as readable as any file its owner writes.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_folder(path.parent)


def write_atomic(path: Path, data: bytes | str) -> None:
    """Write `data` (str as UTF-8) to `path` atomically."""
    with atomic_writer(path) as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write `data` as indented UTF-8 JSON, atomically."""
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines journal, in order; a line a crash cut short is skipped (its item runs again)."""
    records: list[dict[str, Any]] = []
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


@contextmanager
def jsonl_journal(path: Path) -> Iterator[Callable[[Mapping[str, Any]], None]]:
    """A function appending one record to `path` as a JSON line, flushed and fsynced before it returns.

    A last line a crash cut short is ended first, so the next record starts on a line of its own.
    """
    if path.is_file() and path.stat().st_size:
        with path.open("rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    with path.open("a", encoding="utf-8") as out:

        def append(record: Mapping[str, Any]) -> None:
            out.write(json.dumps(record) + "\n")
            out.flush()
            os.fsync(out.fileno())

        yield append


def fsync_folder(folder: Path) -> None:
    """Make a rename inside `folder` durable (a no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


AGAIN = "run the same command again"
"""What to do after a full disk when the command line's own command is what to repeat (a run not yet resumable)."""
TRY_AGAIN = "try again"
"""What to do after a full disk on any face (a tool, the UI, the command line alike)."""


def os_error_message(error: OSError, doing: str, again: str = TRY_AGAIN) -> str:
    """One line for an OSError met while `doing` (e.g. "writing the index at X"): what happened, what to do
    (once some space is freed: `again`)."""
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return f"disk full while {doing} ({reason}): free some space and {again}"
    if error.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write while {doing} ({reason}): the folder is read-only for imageloop; choose a writable one"
    if error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        where = f": {error.filename}" if error.filename else ""
        return f"a file stands where a folder is needed while {doing} ({reason}{where}): move it or choose another path"
    return f"{doing} failed: {reason}" + (f" ({error.filename})" if error.filename else "")


def disk_error(error: BaseException, doing: str, again: str = TRY_AGAIN) -> StorageError | None:
    """A one-line StorageError when `error` is the disk's doing (full, read-only, failing), else None.

    Covers OSErrors with a disk errno and SQLite's errors about its files (a checkpoint or session
    database on a full or read-only disk).
    """
    if isinstance(error, OSError) and error.errno in DISK_ERRNOS:
        return StorageError(os_error_message(error, doing, again))
    if isinstance(error, sqlite3.OperationalError):
        name = getattr(error, "sqlite_errorname", "") or ""
        if name.startswith("SQLITE_FULL"):
            return StorageError(os_error_message(OSError(errno.ENOSPC, str(error)), doing, again))
        if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_IOERR")):
            return StorageError(os_error_message(OSError(errno.EROFS, str(error)), doing, again))
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
