"""Several processes creating one new index at the same moment (an agent's parallel calls, a shell loop):
every one of them opens it, none reports a locked database as an unreadable store."""

from __future__ import annotations

import multiprocessing
import traceback
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from imageloop.tools.indexing.image_index import create_or_open_index, open_index
from imageloop.tools.stores.engines import ANN_ENGINES, AnnEngine
from tests.fakes import FakeHashEmbedder

PROCESSES = 16
FOLDERS = 10


def open_at_once(folder: Path, start: Barrier, ann: AnnEngine | None) -> str:
    """Wait for the others, then create (or open) the folder's index; "" on success, else the error."""
    try:
        start.wait(timeout=60)
        create_or_open_index(folder, FakeHashEmbedder(), ann=ann).close()
        return ""
    except Exception:
        return traceback.format_exc(limit=3)


@pytest.mark.parametrize("ann", [None, *ANN_ENGINES])
def test_sixteen_processes_creating_one_new_index_all_succeed(tmp_path: Path, ann: AnnEngine | None) -> None:
    context = multiprocessing.get_context("fork")  # the pool starts in milliseconds: the opens really collide
    failures: list[str] = []
    with context.Manager() as manager, context.Pool(PROCESSES) as pool:
        for n in range(FOLDERS):
            folder = tmp_path / f"folder{n}"
            folder.mkdir()
            start = manager.Barrier(PROCESSES)
            failures += pool.starmap(open_at_once, [(folder, start, ann)] * PROCESSES)
            index = open_index(folder)
            try:
                assert index.embedder_id == "fake:hash" and index.count() == 0
                assert index.store.get_meta().get("ann_engine") == ann
            finally:
                index.close()

    assert [failure for failure in failures if failure] == []
    assert len(failures) == PROCESSES * FOLDERS
