"""Past work, read from the runs folder (`App.history`): what every face left there, newest first."""

from __future__ import annotations

import json
import os
from pathlib import Path

from imageloop.app import App
from tests.fake_providers import FakeBackends
from tests.test_search_session import fakes, photos

__all__ = ["fakes", "photos"]  # the scripted backends and an indexed folder, shared with the session tests
ALIGNED = {"aligned": True, "missing_concepts": []}


def test_runs_searches_and_rage_sessions_are_listed_newest_first_with_their_files(
    fakes: FakeBackends, photos: Path, tmp_path: Path
) -> None:
    app = App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=tmp_path / "sessions.sqlite")
    fakes.vlm.answers.append(ALIGNED)
    run = app.generate("a blue jay", photos)
    search = app.start_search(photos, "a tabby cat", knobs={"feedback": "verbal", "k": 2})
    rage = app.start_rage("a red sneaker", photos)
    records = [Path(run["final_image"]).parent / "run.json", Path(search.out_dir) / "session.json", Path(rage.record)]
    for age, record in enumerate(records):  # written in this order, newest first
        os.utime(record, (1e9 - age, 1e9 - age))
    listed = app.history(10)
    assert [(item.kind, item.title, item.status) for item in listed] == [
        ("generate", "a blue jay", "aligned"),
        ("search", "a tabby cat", "awaiting_feedback"),
        ("rage", "a red sneaker", "awaiting_selection"),
    ]
    assert (listed[0].id, listed[0].final_image, listed[0].report) == (
        run["run_id"], run["final_image"], str(Path(run["final_image"]).parent / "report.html"),
    )  # fmt: skip
    assert (listed[1].id, listed[2].id) == (search.session_id, rage.session_id)


def test_a_record_that_cannot_be_read_is_left_out_not_a_failure(fakes: FakeBackends, tmp_path: Path) -> None:
    app = App(fakes.settings, runs_dir=tmp_path / "runs")
    (tmp_path / "runs" / "broken").mkdir(parents=True)
    (tmp_path / "runs" / "broken" / "run.json").write_text("{not json")
    (tmp_path / "runs" / "search-0123456789ab").mkdir()
    (tmp_path / "runs" / "search-0123456789ab" / "session.json").write_text("[]")
    assert app.history(10) == []


def test_a_run_still_going_lists_as_running_and_a_stopped_one_as_cancelled(fakes: FakeBackends, tmp_path: Path) -> None:
    app = App(fakes.settings, runs_dir=tmp_path / "runs")
    for name, status, stop_reason in [("going", "running", None), ("stopped", "cancelled", "cancelled")]:
        (tmp_path / "runs" / name).mkdir(parents=True)
        record = {"prompt": name, "status": status, "stop_reason": stop_reason}
        (tmp_path / "runs" / name / "run.json").write_text(json.dumps(record))
    assert {(item.title, item.status) for item in app.history(10)} == {("going", "running"), ("stopped", "cancelled")}
