"""The application's index handles: a folder indexed again replaces its handle, and the old one is not kept."""

from __future__ import annotations

import gc
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

from imageloop.app import App
from tests.fake_providers import FakeBackends, fake_backends
from tests.image_folders import product_catalogue


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as fakes:
        yield fakes


def test_a_folder_indexed_again_and_again_keeps_one_open_handle(tmp_path: Path, fakes: FakeBackends) -> None:
    # A server's index_images calls each retired the folder's handle, and every retired handle (its database
    # connection, its vectors) stayed until the App closed: the 30-minute soak's RSS grew 27%.
    folder = product_catalogue(tmp_path / "catalogue")
    app = App(fakes.settings, runs_dir=tmp_path / "runs")
    try:
        app.index_folder(folder)
        first = weakref.ref(app.index(folder))
        for _ in range(5):
            app.index_folder(folder)
            app.retrieve(folder, query="a red sneaker", k=2)
        gc.collect()
        assert first() is None
        assert app.open_indexes() == 1
    finally:
        app.close()
    assert app.open_indexes() == 0


def vector_files_open_under(folder: Path) -> int:
    """How many of this process's file descriptors name a vector file under `folder` (SQLite's own descriptors
    are not counted: it keeps a closed connection's open while another connection holds a lock on the file,
    and reuses it for the next connection)."""
    links = (os.readlink(fd) for fd in Path("/proc/self/fd").iterdir() if fd.is_symlink())
    return sum(link.startswith(str(folder.resolve())) and "-vectors-" in link for link in links)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors through /proc")
def test_a_folder_indexed_again_and_again_leaves_no_vector_file_open_from_replaced_handles(
    tmp_path: Path, fakes: FakeBackends
) -> None:
    # A replaced handle freed without close() closed its database connection but not its vector file's raw
    # descriptor: the 10-minute soak's server held 268 descriptors of one vector file, one per index_images call.
    folder = product_catalogue(tmp_path / "catalogue")
    app = App(fakes.settings, runs_dir=tmp_path / "runs")
    try:
        for _ in range(2):
            app.index_folder(folder)
            app.retrieve(folder, query="a red sneaker", k=2)
        gc.collect()
        settled = vector_files_open_under(folder)  # the current handle's
        for _ in range(5):
            app.index_folder(folder)
            app.retrieve(folder, query="a red sneaker", k=2)
        gc.collect()
        assert vector_files_open_under(folder) == settled
    finally:
        app.close()
    assert vector_files_open_under(folder) == 0


def test_a_handle_still_searched_survives_its_retirement_until_let_go(tmp_path: Path, fakes: FakeBackends) -> None:
    folder = product_catalogue(tmp_path / "catalogue")
    app = App(fakes.settings, runs_dir=tmp_path / "runs")
    try:
        app.index_folder(folder)
        held = app.index(folder)  # as a search begun before the folder is indexed again holds it
        app.index_folder(folder)
        gc.collect()
        assert held.count() > 0  # still open for its search
        assert app.open_indexes() == 1  # and still counted, so close() closes it
    finally:
        app.close()
