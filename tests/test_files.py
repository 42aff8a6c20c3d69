"""The one atomic-write helper every record, report, artifact and index file goes through."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest

from imageloop.files import atomic_writer, write_json_atomic


def test_a_written_record_is_readable_by_others_as_the_umask_allows(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "run.json", {"ok": True})
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o644


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "store.json"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_writer(target) as f:
        f.write(b"half")
        raise RuntimeError("disk full")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]


def test_concurrent_writers_of_one_file_never_collide(tmp_path: Path) -> None:
    target = tmp_path / "store.json"
    errors: list[BaseException] = []

    def write(n: int) -> None:
        try:
            for _ in range(20):
                write_json_atomic(target, {"writer": n})
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert target.read_text().startswith("{")
    assert [p.name for p in tmp_path.iterdir()] == ["store.json"]
