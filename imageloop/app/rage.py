"""RAGE sessions: retrieve from a catalogue, a person picks, generate with the picks, from any face.

A session is one RAGE run (`imageloop.graphs.rage`) played call by call: `start_rage` retrieves and
stops at the question "which images?" (unless the top N are picked automatically); `continue_rage`
answers it (checked first: a pick that names no candidate is refused before anything is generated)
and plays to the next question (a person's review) or the end. It is checkpointed in the sessions
database shared by every face (`App.sessions_db`) and registered with its index, folder and knobs, so
the session id is all a later call needs, from the terminal, an MCP client or a LangChain agent.

Every call writes the session's folder: `run.json` (atomic; the prompt, the candidates, the picks,
each image, the final image, the stop reason, the steps), `report.html` (the candidates with
thumbnails, which is also the page a person picks from, the picks and each generation), `artifacts/`
and, once finished, `final.png`. A call that fails still writes the record with its error; the
session shows as "incomplete" and `continue_rage(app, id, None)` plays on from the last finished node.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langgraph.types import Command, StateSnapshot

from imageloop import __version__, limits
from imageloop.app.runs import error_text, export_image
from imageloop.app.threads import OnStep, checkpointed_thread, pending_interrupt, play, thread_config, unfinished
from imageloop.config import Role, Settings
from imageloop.errors import ImageloopError
from imageloop.files import write_json_atomic
from imageloop.graphs.rage import (
    RAGEContext,
    RAGEGraph,
    RAGEKnobs,
    build_rage_graph,
    resolve_knobs,
    resolve_review,
    resolve_selection,
)
from imageloop.progress import OnProgress
from imageloop.report import RECORD_FILE, REPORT_FILE, write_report
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.retriever import Where

if TYPE_CHECKING:
    from imageloop.app.core import App

RAGE_TABLE = "imageloop_rage_sessions"
FINAL_IMAGE = "final.png"
LOOP = "rage"


def rage_knobs(settings: Settings) -> RAGEKnobs:
    """The graph's knobs from the settings (a person picks unless a run asks for automatic picks)."""
    return RAGEKnobs(
        k=settings.k,
        similarity_threshold=settings.similarity_threshold,
        where=None,
        auto_select=0,
        review=settings.review,
        max_generations=settings.max_generations,
        seed=settings.seed,
        size=settings.size,
        steps_per_image=settings.steps,
    )


@dataclass(frozen=True)
class RAGESession:
    """What a session id stands for: the index searched, the folder written, the knobs resolved at its start."""

    thread_id: str
    index: Path
    out_dir: Path
    knobs: RAGEKnobs


def start_rage(
    app: App,
    prompt: str,
    index: str | Path,
    *,
    knobs: Mapping[str, Any] | None = None,
    where: Where | None = None,
    out_dir: str | Path | None = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Start a session: retrieve the candidates for `prompt` and stop at the selection (see `show_rage`).

    `knobs` are `RAGEContext` fields (k, similarity_threshold, auto_select, review, max_generations,
    seed, size, steps; None keeps the setting); `where` filters the catalogue's metadata, e.g.
    `{"tags": "sneaker"}`. With `auto_select = N` the top N are picked and generated at once. The
    session's folder is `out_dir`, by default `<runs>/rage-<session id>`.
    """
    prompt = limits.check_text("prompt", prompt)
    given = {name: value for name, value in (knobs or {}).items() if value is not None}
    unknown = sorted(set(given) - {f.name for f in fields(RAGEContext) if f.name != "where"})  # `where` comes alone
    if unknown:
        raise ImageloopError(f"unknown RAGE knob {unknown[0]!r}")
    resolved = resolve_knobs(rage_knobs(app.settings), RAGEContext(**given, where=dict(where) if where else None))
    app.retriever(index)  # refuses a missing, empty or mismatched index before anything is stored
    thread_id = uuid.uuid4().hex[:12]
    folder = app.path(out_dir, "out", kind="out") if out_dir is not None else app.runs_dir / f"{LOOP}-{thread_id}"
    if (folder / RECORD_FILE).is_file():
        raise ImageloopError(f"{folder} already holds a run: use another folder")
    session = RAGESession(thread_id, app.index(index).root, folder, resolved)
    _register(app.sessions_db, session)
    with _session_graph(app, session) as graph:
        return _play(app, graph, session, {"prompt": prompt}, on_step, on_progress)


def continue_rage(
    app: App, thread_id: str, answer: Any, *, on_step: OnStep | None = None, on_progress: OnProgress | None = None
) -> dict[str, Any]:
    """Answer the session's pending question and play to the next one or the end.

    To "which images?": `{"selected": ITEMS, "prompt": optional new prompt}` or ITEMS alone (positions
    as shown, ids or unique id prefixes, file names; see `imageloop.graphs.rage.resolve_picks`); nothing
    picked with a prompt searches again, nothing at all ends. To a review: accept, regenerate or
    reselect, or `{"action": "regenerate", "prompt": ...}`. An answer is checked before anything is
    played. A session cut off mid-way is played on and shown instead; `answer=None` does only that.
    """
    session = load_rage_session(app, thread_id)
    with _session_graph(app, session) as graph:
        snapshot = graph.get_state(thread_config(thread_id))
        pending = pending_interrupt(snapshot)
        if pending is None and unfinished(snapshot):
            return _play(app, graph, session, None, on_step, on_progress)
        if answer is None:
            return _publish(app, session, snapshot)
        if pending is None:
            raise ImageloopError(
                f"session {thread_id} has finished ({snapshot.values.get('stop_reason')}): start another"
            )
        return _play(app, graph, session, Command(resume=resume_value(pending, answer)), on_step, on_progress)


def check_rage_answer(app: App, thread_id: str, answer: Any) -> dict[str, Any]:
    """The answer as the session's pending question takes it, or the one-line error a face shows first."""
    shown = show_rage(app, thread_id)
    if shown["status"] not in ("awaiting_selection", "awaiting_review"):
        reason = shown["stop_reason"] or "no question pending"
        raise ImageloopError(f"session {thread_id} is {shown['status']} ({reason}): start another")
    return resume_value(shown["question"], answer)


def resume_value(question: Mapping[str, Any], answer: Any) -> dict[str, Any]:
    """What resumes the graph for `answer` to `question` (a select or review interrupt's payload), checked."""
    if question["kind"] == "select":
        selection = resolve_selection(answer, question["candidates"])
        return {"selected": [c["id"] for c in selection.picks], "prompt": selection.prompt}
    review = resolve_review(answer)
    return {"action": review.action, "prompt": review.prompt}


def show_rage(app: App, thread_id: str) -> dict[str, Any]:
    """A session as it stands, without playing anything; its record and report are written afresh.

    Every answer is the session's record (see `rage_record`) plus `session_id`, `status`, `out_dir`,
    `report` and `record` (their paths). Status "awaiting_selection" adds `question` (its `candidates`)
    and `ask`; "awaiting_review" adds `question` (the `image` to judge, `choices`) and `ask`;
    "finished" has `final_image`; "incomplete" (cut off mid-way) is played on by `continue_rage(..., None)`.
    """
    session = load_rage_session(app, thread_id)
    with _session_graph(app, session) as graph:
        return _publish(app, session, graph.get_state(thread_config(thread_id)))


def load_rage_session(app: App, thread_id: str) -> RAGESession:
    """The session registered under `thread_id` (its index must still be one this app may use)."""
    db = app.sessions_db
    row = None
    if db.is_file():
        with closing(sqlite3.connect(db)) as conn:
            _create_table(conn)
            row = conn.execute(
                f"SELECT index_path, out_dir, knobs FROM {RAGE_TABLE} WHERE thread_id = ?", (thread_id,)
            ).fetchone()
    if row is None:
        raise ImageloopError(f"no RAGE session {thread_id!r} in {db}: start one first")
    knobs: RAGEKnobs = json.loads(row[2])
    knobs["size"] = limits.check_size(knobs["size"]) if knobs.get("size") else None  # JSON made the pair a list
    index = app.path(row[0], "the session's index", kind="dir")
    return RAGESession(thread_id, index, Path(row[1]), knobs)


def rage_record(
    state: Mapping[str, Any],
    *,
    run_id: str,
    out_dir: Path,
    artifacts: ArtifactStore,
    index: Path,
    settings: Settings,
    status: str,
    error: str | None = None,
) -> dict[str, Any]:
    """run.json for a RAGE run from its (last known) state, exporting final.png once there is a final image."""
    images = [
        {**image, "path": str(artifacts.path(image["artifact"]).resolve())} for image in state.get("images") or []
    ]
    knobs = {f.name: state.get(f.name) for f in fields(RAGEContext) if f.name not in ("steps", "where")}
    roles: list[Role] = ["embedder", "generator"]
    if state.get("review") == "critic":
        roles.append("vlm")
    return {
        "run_id": run_id,
        "loop": LOOP,
        "status": status,
        "prompt": state.get("prompt"),
        "index": str(index),
        "where": state.get("where"),
        "candidates": state.get("candidates") or [],
        "selected": state.get("selected") or [],
        "images": images,
        "final_image": export_image(artifacts, state.get("final_image"), out_dir / FINAL_IMAGE),
        "stop_reason": "error" if error else state.get("stop_reason"),
        "error": error,
        "steps": state.get("steps") or [],
        "settings": {**knobs, "steps": state.get("steps_per_image")},
        "models": {role: str(settings.role_spec(role)) for role in roles},
        "seconds": round(sum(float(s["seconds"]) for s in state.get("steps") or []), 3),
        "imageloop_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _register(db: Path, session: RAGESession) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, timeout=30.0)) as conn, conn:
        _create_table(conn)
        conn.execute(
            f"INSERT INTO {RAGE_TABLE} (thread_id, index_path, out_dir, knobs, created_at) "
            "VALUES (?, ?, ?, ?, datetime('now'))",
            (session.thread_id, str(session.index), str(session.out_dir), json.dumps(session.knobs)),
        )


def _create_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {RAGE_TABLE} (thread_id TEXT PRIMARY KEY, index_path TEXT NOT NULL, "
        "out_dir TEXT NOT NULL, knobs TEXT NOT NULL, created_at TEXT NOT NULL)"
    )


@contextmanager
def _session_graph(app: App, session: RAGESession) -> Iterator[RAGEGraph]:
    """The session's graph over its index, with its knobs as the defaults; one call per session at a time."""
    retriever = app.retriever(session.index)
    generator = app.generator()  # a misconfigured generator fails this call, before anything is picked
    vlm = app.vlm() if session.knobs["review"] == "critic" else None
    session.out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = ArtifactStore(session.out_dir / "artifacts")
    with checkpointed_thread(app.sessions_db, session.thread_id) as checkpointer:
        yield build_rage_graph(vlm, generator, retriever, artifacts, checkpointer, defaults=session.knobs)


def _play(
    app: App,
    graph: RAGEGraph,
    session: RAGESession,
    command: Mapping[str, Any] | Command[Any] | None,
    on_step: OnStep | None,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Play to the next question or the end (in-node progress to `on_progress`); the record is written
    whatever happens."""
    try:
        snapshot = play(graph, command, session.thread_id, None, on_step, on_progress)
    except BaseException as e:
        _publish(app, session, graph.get_state(thread_config(session.thread_id)), error_text(e))
        raise
    return _publish(app, session, snapshot)


def _status(snapshot: StateSnapshot, question: Mapping[str, Any] | None) -> str:
    if question is not None:
        return "awaiting_selection" if question["kind"] == "select" else "awaiting_review"
    return "incomplete" if unfinished(snapshot) else "finished"


def _publish(app: App, session: RAGESession, snapshot: StateSnapshot, error: str | None = None) -> dict[str, Any]:
    """Write the session's run.json and report.html (and final.png once finished); returns what to show."""
    question = pending_interrupt(snapshot)
    status = _status(snapshot, question)
    record = rage_record(
        snapshot.values, run_id=session.thread_id, out_dir=session.out_dir,
        artifacts=ArtifactStore(session.out_dir / "artifacts"), index=session.index, settings=app.settings,
        status=status, error=error,
    )  # fmt: skip
    write_json_atomic(session.out_dir / RECORD_FILE, record)
    write_report(session.out_dir, record)
    shown = {
        **record,
        "session_id": session.thread_id,
        "out_dir": str(session.out_dir),
        "report": str(session.out_dir / REPORT_FILE),
        "record": str(session.out_dir / RECORD_FILE),
    }
    if question is not None:
        shown |= {"question": question, "ask": question["ask"]}
    return shown
