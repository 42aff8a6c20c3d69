"""An interactive GenIR search: a person in a terminal gives the feedback, one round at a time.

Sessions are checkpointed in SQLite after every node, keyed by a thread id, so Ctrl-C (or closing the
terminal) loses nothing: `imageloop search --index DIR --resume THREAD_ID` continues at the question
that was pending, without drawing that round's image again. Each round's synthetic image and an HTML
page of the round are written to the session's output folder.
"""

from __future__ import annotations

import html
import os
import shutil
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, StateSnapshot

from imageloop.backends import make_embedder, make_generator, make_vlm
from imageloop.config import Settings
from imageloop.errors import ImageloopError
from imageloop.files import write_json_atomic
from imageloop.graphs.genir import (
    FOUND_PREFIX,
    FeedbackKind,
    GenIRState,
    build_genir_graph,
    drawing_knobs,
    parse_found,
)
from imageloop.graphs.steps import Step
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.retriever import Retriever

Ask = Callable[[dict[str, Any]], str]
Show = Callable[[str], None]
OnStep = Callable[[Step], None]


def default_sessions_db() -> Path:
    """`$XDG_STATE_HOME/imageloop/sessions.sqlite` (default `~/.local/state/...`)."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "imageloop" / "sessions.sqlite"


def render_round_page(payload: dict[str, Any], synthetic: Path | None, page: Path) -> None:
    """Write an offline HTML page of one round: the query, the synthetic image and the top results."""
    rows = "\n".join(
        f'<figure><a href="{Path(r["path"]).resolve().as_uri()}"><img src="{Path(r["path"]).resolve().as_uri()}" '
        f'alt="{html.escape(r["caption"])}"></a><figcaption>{i}. {html.escape(r["id"][:12])} '
        f"({r['score']:.3f})<br>{html.escape(r['caption'])}</figcaption></figure>"
        for i, r in enumerate(payload["retrieved"])
    )
    drawn = f'<h2>What the system understood</h2><img class="synthetic" src="{synthetic.name}">' if synthetic else ""
    page.write_text(
        f"""<!doctype html><meta charset="utf-8"><title>Round {payload["round"]}</title>
<style>body{{font-family:sans-serif;margin:2em}} figure{{display:inline-block;width:180px;vertical-align:top}}
figure img{{width:170px}} img.synthetic{{max-width:320px}}</style>
<h1>Round {payload["round"]}: {html.escape(payload["query"])}</h1>{drawn}
<h2>Top results</h2>{rows}
""",
        encoding="utf-8",
    )


def run_search_session(
    index_path: Path,
    settings: Settings,
    out_dir: Path | None,
    *,
    query: str | None,
    rounds: int,
    k: int,
    feedback: FeedbackKind,
    resume: str | None,
    ask: Ask,
    show: Show,
    sessions_db: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) one search until found or out of rounds; returns the final state's summary."""
    if resume is None and not (query or "").strip():
        raise ImageloopError("a search starts from a query: pass --query or type one")
    index = open_index(index_path)
    retriever = Retriever(index, make_embedder(settings))
    generator = make_generator(settings) if feedback in ("visual", "hybrid") else None
    thread_id = resume or uuid.uuid4().hex[:12]
    out_dir = out_dir or Path("runs") / f"search-{thread_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = ArtifactStore(out_dir / "artifacts")
    db = sessions_db or default_sessions_db()
    db.parent.mkdir(parents=True, exist_ok=True)
    config = _config(thread_id)
    with sqlite3.connect(db, check_same_thread=False) as conn:
        graph = build_genir_graph(make_vlm(settings), generator, retriever, artifacts, SqliteSaver(conn))
        if resume is not None:
            snapshot = graph.get_state(config)
            if not snapshot.values:
                raise ImageloopError(f"no search session {resume!r} in {db}")
            pending = [i.value for task in snapshot.tasks for i in task.interrupts]
            if not pending:
                show(f"session {thread_id} already finished: {snapshot.values.get('stop_reason')}")
                return _summary(thread_id, snapshot.values)
            command: Any = Command(resume=_ask_round(pending[0], artifacts, out_dir, ask, show))
        else:
            inputs: GenIRState = {
                "query": str(query), "max_rounds": rounds, "k": k, "feedback": feedback, **drawing_knobs(settings)
            }  # fmt: skip
            command = inputs
            show(f"session {thread_id} (resume with --resume {thread_id})")
        while True:
            result = graph.invoke(command, config, version="v2")
            if not result.interrupts:
                state = result.value
                summary = _summary(thread_id, state)
                write_json_atomic(out_dir / "session.json", {**summary, "rounds": state.get("rounds", [])})
                return summary
            command = Command(resume=_ask_round(result.interrupts[0].value, artifacts, out_dir, ask, show))


def publish_round(payload: dict[str, Any], out_dir: Path) -> tuple[Path | None, Path]:
    """Copy a round's synthetic image into `out_dir` and write the round's page; returns both paths."""
    synthetic = None
    if payload.get("synthetic_image"):
        synthetic = out_dir / f"round_{payload['round']}.png"
        shutil.copyfile(payload["synthetic_image"], synthetic)
    page = out_dir / f"round_{payload['round']}.html"
    render_round_page(payload, synthetic, page)
    return synthetic, page


def _ask_round(payload: dict[str, Any], artifacts: ArtifactStore, out_dir: Path, ask: Ask, show: Show) -> str:
    synthetic, page = publish_round(payload, out_dir)
    show(f"\nround {payload['round']}: {payload['query']}")
    if synthetic:
        show(f"  synthetic image: {synthetic}")
    for i, r in enumerate(payload["retrieved"]):
        show(f"  {i}. {r['path']}  ({r['score']:.3f})  id {r['id'][:12]}")
    show(f"  page: {page}")
    return resolve_found(ask(payload), payload["retrieved"])


def resolve_found(answer: str, retrieved: list[dict[str, Any]]) -> str:
    """Let a person say "found: 2" (a listed position) or a short id prefix; other answers pass through."""
    found = parse_found(answer)
    if found is None:
        return answer
    if found.isdigit() and int(found) < len(retrieved):
        return f"{FOUND_PREFIX} {retrieved[int(found)]['id']}"
    matches = [r["id"] for r in retrieved if r["id"].startswith(found)]
    return f"{FOUND_PREFIX} {matches[0]}" if len(matches) == 1 else answer


def _summary(thread_id: str, state: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "thread_id": thread_id,
        "stop_reason": state.get("stop_reason"),
        "found_id": state.get("found_id"),
        "rounds_played": len(state.get("rounds", [])),
        "last_query": state.get("query"),
    }


# A session across calls: start a search, then give feedback by session id alone (the LangChain tools and
# the MCP server). Each call plays until the next question or the end; the checkpointer keeps the rest.

SESSIONS_TABLE = "imageloop_search_sessions"
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


@dataclass(frozen=True)
class SearchSession:
    """What a session id stands for: the index searched, where its rounds go, and its feedback kind."""

    thread_id: str
    index: Path
    out_dir: Path
    feedback: FeedbackKind


def start_search(
    index_path: Path,
    settings: Settings,
    *,
    query: str,
    rounds: int = 10,
    k: int = 10,
    feedback: FeedbackKind = "visual",
    out_dir: Path | None = None,
    runs_dir: Path = Path("runs"),
    sessions_db: Path | None = None,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Start a person's search and play its first round; returns the round to show (see `continue_search`).

    Round images and pages go to `out_dir`, by default `runs_dir/search-<session id>`.
    """
    if not query.strip():
        raise ImageloopError("a search starts from a query")
    if rounds < 1 or k < 1:
        raise ImageloopError(f"rounds and k must be at least 1, got rounds={rounds}, k={k}")
    thread_id = uuid.uuid4().hex[:12]
    session = SearchSession(
        thread_id, Path(index_path).resolve(), (out_dir or runs_dir / f"search-{thread_id}").resolve(), feedback
    )
    inputs: GenIRState = {
        "query": query, "max_rounds": rounds, "k": k, "feedback": feedback, **drawing_knobs(settings)
    }  # fmt: skip
    with _session_graph(session, settings, sessions_db, new=True) as graph:
        return _play(graph, session, inputs, on_step)


def continue_search(
    thread_id: str,
    answer: str | None,
    settings: Settings,
    *,
    sessions_db: Path | None = None,
    on_step: OnStep | None = None,
) -> dict[str, Any]:
    """Answer the pending round of a session and play the next one.

    `answer` says what differs from the wanted image, or `found: N` (a listed position or an id prefix).
    A round cut off mid-way (status "incomplete": the process died, or `on_step` raised) is played on
    and shown instead, since the answer cannot be about a round nobody saw; `answer=None` does only that.
    Returns what `show_search` returns after the play; a finished session is shown as is.
    """
    if answer is not None and not answer.strip():
        raise ImageloopError("empty feedback: say what differs from the image you want, or 'found: N'")
    session = load_search_session(thread_id, sessions_db)
    with _session_graph(session, settings, sessions_db, new=False) as graph:
        snapshot = graph.get_state(_config(thread_id))
        pending = _pending(snapshot)
        if pending is None and snapshot.next:
            return _play(graph, session, None, on_step)
        if answer is None or pending is None:
            return _shown(session, snapshot)
        return _play(graph, session, Command(resume=resolve_found(answer, pending["retrieved"])), on_step)


def show_search(thread_id: str, settings: Settings, *, sessions_db: Path | None = None) -> dict[str, Any]:
    """A session as it stands, without playing anything: its pending round, how it ended, or "incomplete".

    Every answer has `thread_id`, `status`, `stop_reason`, `found_id`, `rounds_played`, `last_query` and
    `out_dir`. Status "awaiting_feedback" adds the round to show (`round`, `query`, `feedback_kind`,
    `synthetic_image`, `retrieved`, `page`, `ask`); "finished" adds `found_path` and `last_round`;
    "incomplete" (a round cut off mid-way) is continued by `continue_search(thread_id, None, ...)`.
    """
    session = load_search_session(thread_id, sessions_db)
    with _session_graph(session, settings, sessions_db, new=False) as graph:
        return _shown(session, graph.get_state(_config(thread_id)))


def load_search_session(thread_id: str, sessions_db: Path | None = None) -> SearchSession:
    """The session a `start_search` call registered under `thread_id`, or an ImageloopError."""
    db = sessions_db or default_sessions_db()
    row = None
    if db.is_file():
        with closing(sqlite3.connect(db)) as conn:
            _create_sessions_table(conn)
            row = conn.execute(
                f"SELECT index_path, out_dir, feedback FROM {SESSIONS_TABLE} WHERE thread_id = ?", (thread_id,)
            ).fetchone()
    if row is None:
        raise ImageloopError(f"no search session {thread_id!r} in {db}: start one first")
    return SearchSession(thread_id, Path(row[0]), Path(row[1]), row[2])


def _create_sessions_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {SESSIONS_TABLE} (thread_id TEXT PRIMARY KEY, index_path TEXT NOT NULL, "
        "out_dir TEXT NOT NULL, feedback TEXT NOT NULL, created_at TEXT NOT NULL)"
    )


def _config(thread_id: str) -> RunnableConfig:
    return {"configurable": {"thread_id": thread_id}}


@contextmanager
def _session_graph(
    session: SearchSession, settings: Settings, sessions_db: Path | None, *, new: bool
) -> Iterator[CompiledStateGraph[GenIRState, None, GenIRState, GenIRState]]:
    """The session's graph over its index, checkpointed in the sessions database; one call per session at a time."""
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(session.thread_id, threading.Lock())
    db = sessions_db or default_sessions_db()
    db.parent.mkdir(parents=True, exist_ok=True)
    index = open_index(session.index)
    try:
        retriever = Retriever(index, make_embedder(settings))
        generator = make_generator(settings) if session.feedback in ("visual", "hybrid") else None
        vlm = make_vlm(settings)
        session.out_dir.mkdir(parents=True, exist_ok=True)
        artifacts = ArtifactStore(session.out_dir / "artifacts")
        # A generous busy timeout: a server plays several sessions at once against one database.
        with lock, closing(sqlite3.connect(db, timeout=30.0, check_same_thread=False)) as conn:
            if new:
                _create_sessions_table(conn)
                with conn:
                    conn.execute(
                        f"INSERT INTO {SESSIONS_TABLE} VALUES (?, ?, ?, ?, datetime('now'))",
                        (session.thread_id, str(session.index), str(session.out_dir), session.feedback),
                    )
            yield build_genir_graph(vlm, generator, retriever, artifacts, SqliteSaver(conn))
    finally:
        index.close()


def _play(
    graph: CompiledStateGraph[GenIRState, None, GenIRState, GenIRState],
    session: SearchSession,
    command: GenIRState | Command[Any] | None,
    on_step: OnStep | None,
) -> dict[str, Any]:
    """Play to the next question or the end, handing each node's steps to `on_step` as the node finishes.

    `on_step` may raise to stop the play there (a server's cancel): the checkpoint keeps every finished
    node, and the session shows as "incomplete" until `continue_search(thread_id, None, ...)`.
    """
    config = _config(session.thread_id)
    for chunk in graph.stream(command, config, stream_mode="updates"):
        for update in chunk.values():
            if on_step is not None and isinstance(update, dict):  # an interrupt's update is a tuple
                for step in update.get("steps", []):
                    on_step(step)
    return _shown(session, graph.get_state(config))


def _pending(snapshot: StateSnapshot) -> dict[str, Any] | None:
    """The question the session waits on (the feedback node's interrupt payload), if any."""
    pending: list[dict[str, Any]] = [i.value for task in snapshot.tasks for i in task.interrupts]
    return pending[0] if pending else None


def _shown(session: SearchSession, snapshot: StateSnapshot) -> dict[str, Any]:
    state = dict(snapshot.values)
    base = {**_summary(session.thread_id, state), "out_dir": str(session.out_dir)}
    payload = _pending(snapshot)
    if payload is not None:
        synthetic, page = publish_round(payload, session.out_dir)
        return {
            **base,
            "status": "awaiting_feedback",
            "round": payload["round"],
            "query": payload["query"],
            "feedback_kind": payload["feedback_kind"],
            "synthetic_image": str(synthetic) if synthetic else None,
            "retrieved": payload["retrieved"],
            "page": str(page),
            "ask": payload["ask"],
        }
    if snapshot.next:
        return {**base, "status": "incomplete"}
    rounds = state.get("rounds", [])
    write_json_atomic(session.out_dir / "session.json", {**base, "rounds": rounds})
    shown = [r for round_ in rounds for r in round_["retrieved"]]
    found_path = next((r["path"] for r in shown if r["id"] == base["found_id"]), None)
    return {**base, "status": "finished", "found_path": found_path, "last_round": rounds[-1] if rounds else None}
