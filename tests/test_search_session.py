"""A person's search session across calls (the application layer every face shares), on fakes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from imageloop.app import App
from imageloop.cli import main
from imageloop.errors import ImageloopError
from imageloop.graphs.steps import Step
from imageloop.tools.indexing.indexer import index_folder
from tests.fake_providers import FAKE_SETTINGS, FakeBackends, captioned_folder, fake_backends

FAKE_OPTIONS = [option for role, spec in FAKE_SETTINGS.items() for option in (f"--{role}", spec)]


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

    app = App(fakes.settings, runs_dir=tmp_path, sessions_db=tmp_path / "s.db")
    shown = app.start_search(photos, "a bird", knobs={"k": 2}, on_step=steps.append)

    assert shown.status == "awaiting_feedback"
    assert [s["node"] for s in steps] == ["prepare", "choose_feedback", "generate_synthetic", "retrieve", "present"]


def test_a_round_stopped_by_its_step_callback_shows_incomplete_and_continues_without_drawing_again(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    app = App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")

    def stop_after_drawing(step: Step) -> None:
        if step["node"] == "generate_synthetic":
            raise Cancelled

    with pytest.raises(Cancelled):
        app.start_search(photos, "a bird", knobs={"k": 2}, on_step=stop_after_drawing)
    [out_dir] = (tmp_path / "runs").iterdir()
    thread_id = out_dir.name.removeprefix("search-")

    assert app.show_search(thread_id).status == "incomplete"
    played: list[Step] = []
    resumed = app.continue_search(thread_id, None, on_step=played.append)

    assert resumed.status == "awaiting_feedback" and resumed.round == 0
    # The drawing node's saved writes are applied (and its step reported again from them); it is not run again.
    assert [s["node"] for s in played] == ["generate_synthetic", "retrieve", "present"]
    assert len(fakes.generator.requests) == 1


def test_showing_a_session_plays_nothing_and_shows_the_same_round(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    app = App(fakes.settings, runs_dir=tmp_path, sessions_db=tmp_path / "sessions.sqlite")
    started = app.start_search(photos, "a bird", knobs={"k": 2})

    shown = app.show_search(started.session_id)

    assert shown == started
    assert len(fakes.generator.requests) == 1


def test_a_found_answer_naming_no_shown_result_is_refused_in_one_line(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    app = App(fakes.settings, runs_dir=tmp_path, sessions_db=tmp_path / "sessions.sqlite")
    started = app.start_search(photos, "a bird", knobs={"k": 2, "feedback": "verbal"})
    for answer, why in (
        ("found: 9", r"is not a position shown \(1\.\.2\)"),
        ("found: zz", "is not one of the results"),
    ):
        with pytest.raises(ImageloopError, match=rf"{why}.*: answer with one of 1 \w+\.png, 2 \w+\.png"):
            app.continue_search(started.session_id, answer)
    assert app.show_search(started.session_id).status == "awaiting_feedback"  # still asking, nothing ended


def test_resuming_with_other_settings_says_which_differ(fakes: FakeBackends, photos: Path, tmp_path: Path) -> None:
    app = App(fakes.settings, runs_dir=tmp_path, sessions_db=tmp_path / "sessions.sqlite")
    started = app.start_search(photos, "a bird", knobs={"k": 2, "feedback": "verbal"})
    with pytest.raises(ImageloopError, match="was started with feedback 'verbal', not 'visual'"):
        app.show_search(started.session_id, knobs={"feedback": "visual", "k": 2})


def test_the_cli_resumes_a_round_cut_off_mid_way_without_its_out_folder(
    fakes: FakeBackends,
    photos: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    app = App(fakes.settings, runs_dir=tmp_path / "elsewhere", sessions_db=tmp_path / "sessions.sqlite")

    def stop_after_drawing(step: Step) -> None:
        if step["node"] == "generate_synthetic":
            raise Cancelled

    with pytest.raises(Cancelled):
        app.start_search(photos, "a bird", knobs={"k": 2}, on_step=stop_after_drawing)
    [out_dir] = (tmp_path / "elsewhere").iterdir()
    session = out_dir.name.removeprefix("search-")
    monkeypatch.setattr("builtins.input", lambda prompt="": "found: 1")

    code = main(["search", "--resume", session, "--sessions", str(tmp_path / "sessions.sqlite"), *FAKE_OPTIONS])

    assert code == 0 and "found:" in capsys.readouterr().out
    assert (out_dir / "round_0.html").is_file() and (out_dir / "session.json").is_file()
    assert len(fakes.generator.requests) == 1  # the round was finished, not drawn again


def test_a_session_draws_with_the_knobs_it_started_with_whichever_app_plays_it_on(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.sqlite"
    starting = App(fakes.settings, runs_dir=tmp_path / "a", sessions_db=db)
    knobs = {"seed": 7, "size": (48, 32), "steps": 3, "k": 2, "feedback": "visual"}
    started = starting.start_search(photos, "a bird", knobs=knobs)
    fakes.vlm.answers.append({"query": "a blue bird"})  # the refiner folds the feedback in
    elsewhere = fakes.settings.with_overrides({"seed": 3, "size": "64x64", "steps": 9})  # another face's settings
    App(elsewhere, runs_dir=tmp_path / "b", sessions_db=db).continue_search(started.session_id, "bluer")

    drawn = [(r.seed, r.size, r.steps) for r in fakes.generator.requests]
    assert drawn == [(7, (48, 32), 3)] * 2  # round 1 drew as round 0 did, not with the other face's settings
    assert started.knobs["seed"] == 7 and started.knobs["size"] == [48, 32]


def test_a_knob_a_session_left_to_the_backend_stays_so_in_another_app(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    db = tmp_path / "sessions.sqlite"
    started = App(fakes.settings, runs_dir=tmp_path / "a", sessions_db=db).start_search(photos, "a bird")
    fakes.vlm.answers.append({"query": "a blue bird"})
    elsewhere = fakes.settings.with_overrides({"steps": 9, "user_temperature": 1.5})
    App(elsewhere, runs_dir=tmp_path / "b", sessions_db=db).continue_search(started.session_id, "bluer")
    assert [r.steps for r in fakes.generator.requests] == [None, None]  # unset (the backend's own) both times


@pytest.mark.parametrize("knob", ["seeds", "user_temperature"])
def test_a_knob_a_search_does_not_have_is_refused_naming_those_it_has(
    fakes: FakeBackends, photos: Path, tmp_path: Path, knob: str
) -> None:
    app = App(fakes.settings, runs_dir=tmp_path, sessions_db=tmp_path / "s.db")
    with pytest.raises(ImageloopError, match=rf"^unknown genir knob '{knob}': expected one of seed, size, steps"):
        app.start_search(photos, "a bird", knobs={knob: 1})
    assert fakes.generator.requests == []
