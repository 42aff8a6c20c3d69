"""Nothing read from a checkpoint runs code: a run folder or a sessions database whose checkpoint names a
callable (as one written by someone else may) is refused in one line, and the callable is never called."""

from __future__ import annotations

import io
import sqlite3
from contextlib import closing
from pathlib import Path

import ormsgpack
import pytest

from imageloop.app import App
from imageloop.app.checkpoints import StrictSerializer
from imageloop.cli import main
from imageloop.knobs import LOOPS
from tests.fake_providers import FakeBackends
from tests.test_run_durability import ALIGNED, FAKE, fakes, library

__all__ = ["fakes", "library"]  # fixtures shared with the durability tests: the scripted backends, an index


def plant_call(db: Path, channel: str, target: Path) -> None:
    """Make the latest checkpoint in `db` hold `os.mkdir(target)` in `channel`, as a crafted file would."""
    with closing(sqlite3.connect(db)) as conn:
        thread, checkpoint_id, blob = conn.execute(
            "SELECT thread_id, checkpoint_id, checkpoint FROM checkpoints ORDER BY checkpoint_id DESC LIMIT 1"
        ).fetchone()
        checkpoint = ormsgpack.unpackb(blob, ext_hook=ormsgpack.Ext, option=ormsgpack.OPT_NON_STR_KEYS)
        checkpoint["channel_values"][channel] = ormsgpack.Ext(0, ormsgpack.packb(("os", "mkdir", str(target))))
        crafted = ormsgpack.packb(checkpoint, option=ormsgpack.OPT_NON_STR_KEYS)
        conn.execute(
            "UPDATE checkpoints SET checkpoint = ? WHERE thread_id = ? AND checkpoint_id = ?",
            (crafted, thread, checkpoint_id),
        )
        conn.commit()


def test_resuming_a_run_whose_checkpoint_names_a_callable_refuses_it_in_one_line_without_calling_it(
    fakes: FakeBackends, library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, planted = tmp_path / "run", tmp_path / "planted"
    fakes.vlm.answers.append(ALIGNED)
    assert main(["generate", "a blue jay", "--index", str(library), "--out", str(out), *FAKE]) == 0
    plant_call(out / "checkpoints.sqlite", "prompt", planted)
    capsys.readouterr()

    code = main(["generate", "--resume", str(out), *FAKE])

    [line] = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not planted.exists()
    assert "names os.mkdir, which imageloop never stores" in line


def test_a_session_whose_checkpoint_names_a_callable_is_refused_in_one_line_without_calling_it(
    fakes: FakeBackends, library: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    planted, sessions = tmp_path / "planted", tmp_path / "sessions.sqlite"
    app = App(fakes.settings, runs_dir=tmp_path / "runs", sessions_db=sessions)
    session = app.start_search(library, "a bird", knobs={"k": 2}).session_id
    app.close()
    plant_call(sessions, "query", planted)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # no feedback typed: only loading the session counts

    code = main(["search", "--resume", session, "--sessions", str(sessions), *FAKE])

    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert code == 2 and not planted.exists()
    assert "names os.mkdir, which imageloop never stores" in line


def test_every_type_the_loops_checkpoint_is_in_the_allowlist(tmp_path: Path) -> None:
    from langgraph.types import Interrupt, Overwrite, Send

    serializer = StrictSerializer(tmp_path / "checkpoints.sqlite")
    state = {"steps": Overwrite([{"node": "prepare"}]), "task": Send("retrieve", {"caption": "a jay"})}
    state["asked"] = Interrupt(value={"ask": "which?"}, id="1")
    state |= {loop: knobs(seed=3, size=(32, 48)) for loop, knobs in LOOPS.items()}  # every graph's knobs in state

    assert serializer.loads_typed(serializer.dumps_typed(state)) == state
