"""Several processes creating one new index at the same moment (an agent's parallel calls, a shell loop):
every one of them opens it, none reports a locked database as an unreadable store; several indexing one
folder at once embed each image once."""

from __future__ import annotations

import multiprocessing
import threading
import time
import traceback
from collections.abc import Sequence
from multiprocessing.synchronize import Barrier
from pathlib import Path

import pytest

from imageloop.protocols import Vector
from imageloop.tools.indexing.image_index import create_or_open_index, open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.stores.engines import ANN_ENGINES, AnnEngine
from tests.fakes import FakeHashEmbedder
from tests.image_folders import captioned_folder, write_image

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


class CountingEmbedder(FakeHashEmbedder):
    """Counts the texts it embeds, a little slowly, as a model would take its time."""

    def __init__(self) -> None:
        super().__init__()
        self.embedded = 0
        self.lock = threading.Lock()

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        time.sleep(0.05)
        with self.lock:
            self.embedded += len(texts)
        return super().embed_texts(texts)


def test_four_indexers_of_one_folder_at_once_embed_each_image_once(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    for i in range(20):
        write_image(folder / f"extra{i:02d}.png", 3 * i)
        (folder / f"extra{i:02d}.txt").write_text(f"picture number {i}")
    embedder, start = CountingEmbedder(), threading.Barrier(4)

    def index() -> None:
        start.wait(timeout=30)
        index_folder(folder, embedder, None, batch_size=4, progress=False)

    threads = [threading.Thread(target=index) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)

    assert embedder.embedded == len(list(folder.glob("*.png")))
