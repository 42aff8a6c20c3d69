"""GenIR search sessions: one model, one store, for every face.

A session is a person's search, played round by round: each call plays until the next question (or the
end) and returns what to show; the answer comes in a later call, from any face (the terminal, an MCP
client, a LangChain agent, the browser). The graph is checkpointed in one SQLite database
(`App.sessions_db`) after every node, so a process that dies loses nothing: a round cut off mid-way shows
as "incomplete" and is played on (never drawn twice) by `continue_search(..., None)`. The session's
index, folder and knobs are recorded with it, so resuming needs only the session id.
"""

from __future__ import annotations

import html
import json
import shutil
import sqlite3
import uuid
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langgraph.types import Command, StateSnapshot

from imageloop import limits
from imageloop.app.paths import make_out_dir
from imageloop.app.threads import OnStep, checkpointed_thread, pending_interrupt, play, thread_config, unfinished
from imageloop.config import FEEDBACK_KINDS, FeedbackKind, Settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.files import write_json_atomic
from imageloop.graphs.genir import GenIRContext, GenIRGraph, GenIRKnobs, build_genir_graph, resolve_found
from imageloop.progress import OnProgress
from imageloop.tools.artifacts import ArtifactStore

if TYPE_CHECKING:
    from imageloop.app.core import App

SESSIONS_TABLE = "imageloop_search_sessions"
SESSION_FILE = "session.json"


def genir_knobs(settings: Settings) -> GenIRKnobs:
    """The graph's knobs from the settings (a person's search; evaluations name their target)."""
    return GenIRKnobs(
        user="person",
        target_id=None,
        target_path=None,
        feedback=settings.feedback,
        max_rounds=settings.rounds,
        k=settings.k,
        rank_depth=settings.rank_depth,
        hybrid_threshold=settings.hybrid_threshold,
        simulated_user=settings.simulated_user,
        user_temperature=settings.user_temperature,
        user_top_p=settings.user_top_p,
        user_repetition_penalty=settings.user_repetition_penalty,
        seed=settings.seed,
        size=settings.size,
        steps_per_image=settings.steps,
    )


@dataclass(frozen=True)
class SearchSession:
    """What a session id stands for: the index searched, where its rounds go, and the knobs it plays with."""

    thread_id: str
    index: Path
    out_dir: Path
    feedback: FeedbackKind
    rounds: int
    k: int

    def knobs(self) -> dict[str, Any]:
        """The session's settings that a resume may not change."""
        return {"feedback": self.feedback, "rounds": self.rounds, "k": self.k}


def start_search(
    app: App,
    index: str | Path,
    query: str,
    *,
    knobs: Mapping[str, Any] | None = None,
    out_dir: str | Path | None = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Start a person's search and play its first round; returns the round to show (see `show_search`).

    `knobs` may set feedback, rounds, k and the drawing knobs; round images and pages go to `out_dir`,
    by default `<runs>/search-<session id>`.
    """
    query = limits.check_text("query", query)
    settings = app.with_knobs(**(knobs or {}))
    app.retriever(index, settings)  # refuses a missing, empty or mismatched index before anything is stored
    thread_id = uuid.uuid4().hex[:12]
    folder = (
        app.path(out_dir, "search folder", kind="out") if out_dir is not None else app.runs_dir / f"search-{thread_id}"
    )
    session = SearchSession(thread_id, app.index(index).root, folder, settings.feedback, settings.rounds, settings.k)
    make_out_dir(folder, "search folder")  # before the session is recorded: a session needs its folder
    _register(app.sessions_db, session)
    with _session_graph(app, session) as graph:
        return _play(graph, session, {"query": query}, on_step, on_progress)


def continue_search(
    app: App,
    thread_id: str,
    answer: str | None,
    *,
    given: Mapping[str, Any] | None = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Answer the pending round of a session and play the next one.

    `answer` says what differs from the wanted image, or `found: N` (a listed position, an id or its
    prefix; one that names no shown result is refused). A round cut off mid-way is played on and shown
    instead, since the answer cannot be about a round nobody saw; `answer=None` does only that. `given`
    are settings the caller asked for explicitly: they must match the session's.
    """
    if answer is not None:
        answer = limits.check_text("feedback", answer)
    session = load_search_session(app, thread_id)
    _refuse_other_settings(session, given or {})
    with _session_graph(app, session) as graph:
        snapshot = graph.get_state(thread_config(thread_id))
        pending = pending_interrupt(snapshot)
        if pending is None and unfinished(snapshot):
            return _play(graph, session, None, on_step, on_progress)
        if answer is None or pending is None:
            return _shown(session, snapshot)
        resolve_found(answer, pending["retrieved"])  # a bad "found:" is the caller's one-line error
        return _play(graph, session, Command(resume=answer), on_step, on_progress)


def show_search(app: App, thread_id: str, *, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A session as it stands, without playing anything: its pending round, how it ended, or "incomplete".

    Every answer has `thread_id`, `status`, `stop_reason`, `found_id`, `rounds_played`, `last_query` and
    `out_dir`. Status "awaiting_feedback" adds the round to show (`round`, `query`, `feedback_kind`,
    `synthetic_image`, `retrieved`, `page`, `ask`); "finished" adds `found_path` and `last_round`;
    "incomplete" (a round cut off mid-way) is continued by `continue_search(app, thread_id, None)`.
    """
    session = load_search_session(app, thread_id)
    _refuse_other_settings(session, given or {})
    with _session_graph(app, session) as graph:
        return _shown(session, graph.get_state(thread_config(thread_id)))


def load_search_session(app: App, thread_id: str) -> SearchSession:
    """The session registered under `thread_id` (its index must still be one this app may use)."""
    db = app.sessions_db
    row = None
    if db.is_file():
        with closing(sqlite3.connect(db)) as conn:
            _create_sessions_table(conn)
            row = conn.execute(
                f"SELECT index_path, out_dir, feedback, knobs FROM {SESSIONS_TABLE} WHERE thread_id = ?",
                (thread_id,),
            ).fetchone()
    if row is None:
        raise ImageloopError(f"no search session {thread_id!r} in {db}: start one first")
    knobs = json.loads(row[3] or "{}")
    index = app.path(row[0], "the session's index", kind="dir")
    feedback: FeedbackKind = next((kind for kind in FEEDBACK_KINDS if kind == row[2]), "visual")
    rounds, k = knobs.get("rounds", limits.default("rounds")), knobs.get("k", limits.default("k"))
    return SearchSession(thread_id, index, Path(row[1]), feedback, int(rounds), int(k))


def _refuse_other_settings(session: SearchSession, given: Mapping[str, Any]) -> None:
    """A resume asking for other settings than the session's says which, instead of silently ignoring them."""
    recorded = session.knobs()
    differs = [f"{name} {recorded[name]!r}, not {value!r}" for name, value in given.items()
               if value is not None and name in recorded and recorded[name] != value]  # fmt: skip
    if differs:
        raise ConfigError(
            f"session {session.thread_id} was started with {'; '.join(differs)}: resume it without those options"
        )


def _register(db: Path, session: SearchSession) -> None:
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, timeout=30.0)) as conn, conn:
        _create_sessions_table(conn)
        conn.execute(
            f"INSERT INTO {SESSIONS_TABLE} (thread_id, index_path, out_dir, feedback, knobs, created_at) "
            "VALUES (?, ?, ?, ?, ?, datetime('now'))",
            (
                session.thread_id, str(session.index), str(session.out_dir), session.feedback,
                json.dumps({"rounds": session.rounds, "k": session.k}),
            ),
        )  # fmt: skip


def _create_sessions_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {SESSIONS_TABLE} (thread_id TEXT PRIMARY KEY, index_path TEXT NOT NULL, "
        "out_dir TEXT NOT NULL, feedback TEXT NOT NULL, created_at TEXT NOT NULL)"
    )
    columns = {row[1] for row in conn.execute(f"PRAGMA table_info({SESSIONS_TABLE})")}
    if "knobs" not in columns:  # sessions recorded before knobs were kept read as the defaults
        conn.execute(f"ALTER TABLE {SESSIONS_TABLE} ADD COLUMN knobs TEXT")


def _context(session: SearchSession) -> GenIRContext:
    return GenIRContext(user="person", feedback=session.feedback, max_rounds=session.rounds, k=session.k)


@contextmanager
def _session_graph(app: App, session: SearchSession) -> Iterator[GenIRGraph]:
    """The session's graph over its index, checkpointed in the sessions database; one call per session at a time."""
    settings = app.settings
    retriever = app.retriever(session.index, settings)
    generator = app.generator(settings) if session.feedback in ("visual", "hybrid") else None
    make_out_dir(session.out_dir, "search folder")
    artifacts = ArtifactStore(session.out_dir / "artifacts")
    with checkpointed_thread(app.sessions_db, session.thread_id) as checkpointer:
        yield build_genir_graph(
            app.vlm(settings), generator, retriever, artifacts, checkpointer, defaults=genir_knobs(settings)
        )


def _play(
    graph: GenIRGraph,
    session: SearchSession,
    command: Mapping[str, Any] | Command[Any] | None,
    on_step: OnStep | None,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Play to the next question or the end (see `imageloop.app.threads.play`), in-node progress (drawing the
    synthetic image) to `on_progress`; a stopped round shows "incomplete"."""
    return _shown(session, play(graph, command, session.thread_id, _context(session), on_step, on_progress))


def _summary(thread_id: str, state: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "thread_id": thread_id,
        "stop_reason": state.get("stop_reason"),
        "found_id": state.get("found_id"),
        "rounds_played": len(state.get("rounds", [])),
        "last_query": state.get("query"),
    }


def _shown(session: SearchSession, snapshot: StateSnapshot) -> dict[str, Any]:
    state = dict(snapshot.values)
    base = {**_summary(session.thread_id, state), "out_dir": str(session.out_dir), "settings": session.knobs()}
    payload = pending_interrupt(snapshot)
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
    if unfinished(snapshot):
        return {**base, "status": "incomplete"}
    rounds = state.get("rounds", [])
    write_json_atomic(session.out_dir / SESSION_FILE, {**base, "index": str(session.index), "rounds": rounds})
    shown = [r for round_ in rounds for r in round_["retrieved"]]
    found_path = next((r["path"] for r in shown if r["id"] == base["found_id"]), None)
    return {**base, "status": "finished", "found_path": found_path, "last_round": rounds[-1] if rounds else None}


def publish_round(payload: Mapping[str, Any], out_dir: Path) -> tuple[Path | None, Path]:
    """Copy a round's synthetic image into `out_dir` and write the round's page; returns both paths."""
    synthetic = None
    if payload.get("synthetic_image"):
        synthetic = out_dir / f"round_{payload['round']}.png"
        shutil.copyfile(payload["synthetic_image"], synthetic)
    page = out_dir / f"round_{payload['round']}.html"
    _render_round_page(payload, synthetic, page)
    return synthetic, page


def _render_round_page(payload: Mapping[str, Any], synthetic: Path | None, page: Path) -> None:
    """An offline HTML page of one round: the query, the synthetic image and the top results."""
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
