"""A person's search session across calls (the API the LangChain tools and the MCP server share), on fakes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imageloop.graphs.steps import Step
from imageloop.search_session import continue_search, show_search, start_search
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FakeBackends, captioned_folder, fake_backends


class Cancelled(Exception):
    """What a server's progress callback raises to stop a round."""


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as backends:
        yield backends


@pytest.fixture
def photos(fakes: FakeBackends, tmp_path: Path) -> Path:
    folder = captioned_folder(tmp_path / "photos")
    index_folder(folder, fakes.embedder, None, progress=False)
    return folder


def test_each_finished_node_reports_its_steps_as_the_round_plays(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    steps: list[Step] = []

    shown = start_search(
        photos,
        fakes.settings,
        query="a bird",
        k=2,
        runs_dir=tmp_path,
        sessions_db=tmp_path / "s.db",
        on_step=steps.append,
    )

    assert shown["status"] == "awaiting_feedback"
    assert [s["node"] for s in steps] == ["prepare", "choose_feedback", "generate_synthetic", "retrieve", "present"]


def test_a_round_stopped_by_its_step_callback_shows_incomplete_and_continues_without_drawing_again(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.sqlite"

    def stop_after_drawing(step: Step) -> None:
        if step["node"] == "generate_synthetic":
            raise Cancelled

    with pytest.raises(Cancelled):
        start_search(photos, fakes.settings, query="a bird", k=2, runs_dir=tmp_path / "runs", sessions_db=db,
                     on_step=stop_after_drawing)  # fmt: skip
    [out_dir] = (tmp_path / "runs").iterdir()
    thread_id = out_dir.name.removeprefix("search-")

    assert show_search(thread_id, fakes.settings, sessions_db=db)["status"] == "incomplete"
    played: list[Step] = []
    resumed = continue_search(thread_id, None, fakes.settings, sessions_db=db, on_step=played.append)

    assert resumed["status"] == "awaiting_feedback" and resumed["round"] == 0
    assert [s["node"] for s in played] == ["retrieve", "present"]
    assert len(fakes.generator.requests) == 1


def test_showing_a_session_plays_nothing_and_shows_the_same_round(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.sqlite"
    started = start_search(photos, fakes.settings, query="a bird", k=2, runs_dir=tmp_path, sessions_db=db)

    shown = show_search(started["thread_id"], fakes.settings, sessions_db=db)

    assert shown == started
    assert len(fakes.generator.requests) == 1
