"""GenIR searches: a person's search for an image they have in mind, played round by round, from any face.

Each call plays until the next question (or the end) and returns what to show (`SearchView`); the answer
comes in a later call, from any face (the terminal, an MCP client, a LangChain agent, the browser). A
session (`imageloop.app.sessions`) keeps its index, folder and the knobs it started with, so a round cut
off mid-way shows as "incomplete" and is played on (never drawn twice) by `continue_search(..., None)`.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langgraph.types import Command, StateSnapshot

from imageloop import limits
from imageloop.app.paths import make_out_dir
from imageloop.app.results import SearchView, shown_list
from imageloop.app.round_page import publish_round
from imageloop.app.sessions import Session, load, register, session_thread
from imageloop.app.threads import OnStep, carry_knobs, pending_interrupt, play, thread_config, unfinished
from imageloop.files import write_json_atomic
from imageloop.graphs.genir import GenIRGraph, build_genir_graph, refuse_caption_route, resolve_found
from imageloop.knobs import GenIRKnobs, Given, SimulatedUserKnobs
from imageloop.progress import OnProgress
from imageloop.tools.artifacts import ArtifactStore

if TYPE_CHECKING:
    from imageloop.app.core import App

SESSION_FILE = "session.json"


def start_search(
    app: App,
    index: str | Path,
    query: str,
    *,
    knobs: Given = None,
    out_dir: str | Path | None = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> SearchView:
    """Start a person's search and play its first round; returns the round to show.

    `knobs` are GenIR's (`GenIRKnobs`: feedback, rounds, k, the drawing knobs; unset: the settings'); the
    session keeps them all. Round images and pages go to `out_dir`, by default `<runs>/search-<session id>`.
    """
    query = limits.check_text("query", query)
    resolved = SimulatedUserKnobs.from_settings(app.settings).overridden(GenIRKnobs.given(knobs))
    retriever = app.retriever(index)  # refuses a missing, empty or mismatched index before anything is stored
    refuse_caption_route(resolved, retriever.route, f"the index at {retriever.index.root}")
    session_id = uuid.uuid4().hex[:12]
    folder = (
        app.path(out_dir, "search folder", kind="out") if out_dir is not None else app.runs_dir / f"search-{session_id}"
    )
    session = Session(session_id, "genir", app.index(index).root, folder, resolved.record())
    make_out_dir(folder, "search folder")  # before the session is recorded: a session needs its folder
    register(app, session)
    with _session_graph(app, session) as graph:
        return _play(graph, session, {"query": query}, on_step, on_progress)


def continue_search(
    app: App,
    session_id: str,
    answer: str | None,
    *,
    knobs: Given = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> SearchView:
    """Answer the pending round of a session and play the next one.

    `answer` says what differs from the wanted image, or `found: N` (a listed position, from 1, or an id;
    one that names no shown result is refused). A round cut off mid-way is played on and shown instead,
    since the answer cannot be about a round nobody saw; `answer=None` does only that. `knobs` asked for
    must be the session's (the one resume policy).
    """
    if answer is not None:
        answer = limits.check_text("feedback", answer)
    session = load_search(app, session_id, knobs)
    with _session_graph(app, session) as graph:
        snapshot = graph.get_state(thread_config(session_id))
        pending = pending_interrupt(snapshot)
        if pending is None and unfinished(snapshot):
            return _play(graph, session, None, on_step, on_progress)
        if answer is None or pending is None:
            return _shown(session, snapshot)
        resolve_found(answer, pending["retrieved"])  # a bad "found:" is the caller's one-line error
        return _play(graph, session, Command(resume=answer), on_step, on_progress)


def show_search(app: App, session_id: str, *, knobs: Given = None) -> SearchView:
    """A session as it stands, without playing anything: its pending round, how it ended, or "incomplete"."""
    session = load_search(app, session_id, knobs)
    with _session_graph(app, session) as graph:
        return _shown(session, graph.get_state(thread_config(session_id)))


def load_search(app: App, session_id: str, knobs: Given = None) -> Session:
    """The search registered as `session_id`; knobs asked for that differ from its own are refused."""
    session = load(app, session_id, "genir", SimulatedUserKnobs)
    session.refuse_changes(SimulatedUserKnobs, GenIRKnobs.given(knobs))
    return session


@contextmanager
def _session_graph(app: App, session: Session) -> Iterator[GenIRGraph]:
    """The session's graph over its index, its knobs the session's; one call per session at a time."""
    knobs = SimulatedUserKnobs.model_validate(session.knobs)
    retriever = app.retriever(session.index)
    generator = app.generator() if knobs.feedback in ("visual", "hybrid") else None
    make_out_dir(session.out_dir, "search folder")
    artifacts = ArtifactStore(session.out_dir / "artifacts")
    with session_thread(app, session.session_id) as checkpointer:
        graph = build_genir_graph(app.vlm(), generator, retriever, artifacts, checkpointer, defaults=knobs)
        carry_knobs(graph, session.session_id, knobs)
        yield graph


def _play(
    graph: GenIRGraph,
    session: Session,
    command: Mapping[str, Any] | Command[Any] | None,
    on_step: OnStep | None,
    on_progress: OnProgress | None = None,
) -> SearchView:
    """Play to the next question or the end (see `imageloop.app.threads.play`), in-node progress (drawing the
    synthetic image) to `on_progress`; a stopped round shows "incomplete"."""
    return _shown(session, play(graph, command, session.session_id, None, on_step, on_progress))


def _shown(session: Session, snapshot: StateSnapshot) -> SearchView:
    state = dict(snapshot.values)
    shown_knobs = {name: session.knobs[name] for name in GenIRKnobs.model_fields}
    base: dict[str, Any] = {
        "session_id": session.session_id,
        "stop_reason": state.get("stop_reason"),
        "found_id": state.get("found_id"),
        "rounds_played": len(state.get("rounds", [])),
        "query": state.get("query"),
        "out_dir": str(session.out_dir),
        "knobs": shown_knobs,
    }
    rounds = state.get("rounds", [])
    payload = pending_interrupt(snapshot)
    if payload is not None:
        earlier = rounds[:-1]  # the round asked about is the last recorded
        synthetic, page = publish_round(payload, session.out_dir, session.session_id, earlier)
        view = SearchView(
            **base,
            status="awaiting_feedback",
            round=payload["round"],
            feedback_kind=payload["feedback_kind"],
            synthetic_image=str(synthetic) if synthetic else None,
            retrieved=shown_list(payload["retrieved"]),
            page=str(page),
            ask=payload["ask"],
        )
    elif unfinished(snapshot):
        view = SearchView(**base, status="incomplete")
    else:
        seen = [r for round_ in rounds for r in round_["retrieved"]]
        found_path = next((r["path"] for r in seen if r["id"] == base["found_id"]), None)
        view = SearchView(**base, status="finished", found_path=found_path, last_round=rounds[-1] if rounds else None)
    # The session as it stands, in its folder, whichever face played it: what lists past searches reads.
    record = {**base, "status": view.status, "found_path": view.found_path, "round": view.round}
    write_json_atomic(session.out_dir / SESSION_FILE, {**record, "index": str(session.index), "rounds": rounds})
    return view
