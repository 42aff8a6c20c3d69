"""RAGE sessions: retrieve from a catalogue, a person picks, generate with the picks, from any face.

A session is one RAGE run (`imageloop.graphs.rage`) played call by call: `start_rage` retrieves and
stops at the question "which images?" (unless the top N are picked automatically); `continue_rage`
answers it (checked first: a pick that names no candidate is refused before anything is generated)
and plays to the next question (a person's review) or the end. It is a session of the sessions database
(`imageloop.app.sessions`: the same registry and resume policy as GenIR searches), so the session id is
all a later call needs, from the terminal, an MCP client or a LangChain agent.

Every call writes the session's folder: `run.json` (atomic; the prompt, the candidates, the picks,
each image, the final image, the stop reason, the steps, the knobs it ran with), `report.html` (the
candidates with thumbnails, which is also the page a person picks from, the picks and each generation),
`artifacts/` and, once finished, `final.png`. A call that fails still writes the record with its error;
the session shows as "incomplete" and `continue_rage(app, id, None)` plays on from the last finished node.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from langgraph.types import Command, StateSnapshot

from imageloop import __version__, limits
from imageloop.app.results import RAGEStatus, RAGEView, shown_list
from imageloop.app.runs import error_text, export_image
from imageloop.app.sessions import Session, load, register, session_thread
from imageloop.app.threads import OnStep, carry_knobs, pending_interrupt, play, thread_config, unfinished
from imageloop.config import Role, Settings
from imageloop.errors import ImageloopError
from imageloop.files import write_json_atomic
from imageloop.graphs.rage import (
    RAGEContext,
    RAGEGraph,
    build_rage_graph,
    check_where,
    resolve_review,
    resolve_selection,
)
from imageloop.knobs import Given, KnobContext, RAGEKnobs
from imageloop.progress import OnProgress
from imageloop.report import RECORD_FILE, REPORT_FILE, write_report
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.retriever import Where

if TYPE_CHECKING:
    from imageloop.app.core import App

FINAL_IMAGE = "final.png"
LOOP = "rage"


def start_rage(
    app: App,
    prompt: str,
    index: str | Path,
    *,
    knobs: Given = None,
    where: Where | None = None,
    out_dir: str | Path | None = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> RAGEView:
    """Start a session: retrieve the candidates for `prompt` and stop at the selection (see `show_rage`).

    `knobs` are RAGE's (`RAGEKnobs`; unset: the settings'); `where` filters the catalogue's metadata, e.g.
    `{"tags": "sneaker"}`. With `auto_select = N` the top N are picked and generated at once. The
    session's folder is `out_dir`, by default `<runs>/rage-<session id>`.
    """
    prompt = limits.check_text("prompt", prompt)
    resolved = RAGEKnobs.from_settings(app.settings).overridden(knobs)
    where = check_where(where)
    app.retriever(index)  # refuses a missing, empty or mismatched index before anything is stored
    session_id = uuid.uuid4().hex[:12]
    folder = app.path(out_dir, "out", kind="out") if out_dir is not None else app.runs_dir / f"{LOOP}-{session_id}"
    if (folder / RECORD_FILE).is_file():
        raise ImageloopError(f"{folder} already holds a run: use another folder")
    session = Session(session_id, "rage", app.index(index).root, folder, resolved.record())
    register(app, session)
    with _session_graph(app, session) as graph:
        return _play(app, graph, session, {"prompt": prompt}, on_step, on_progress, RAGEContext(where=where))


def continue_rage(
    app: App,
    session_id: str,
    answer: Any,
    *,
    knobs: Given = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> RAGEView:
    """Answer the session's pending question and play to the next one or the end.

    To "which images?": `{"selected": ITEMS, "prompt": optional new prompt}` or ITEMS alone (positions
    as shown, from 1, ids or unique id prefixes, file names; see `imageloop.graphs.rage.resolve_picks`);
    nothing picked with a prompt searches again, nothing at all ends. To a review: accept, regenerate or
    reselect, or `{"action": "regenerate", "prompt": ...}`. An answer is checked before anything is
    played. A session cut off mid-way is played on and shown instead; `answer=None` does only that.
    `knobs` asked for must be the session's (the one resume policy).
    """
    session = load_rage(app, session_id, knobs)
    with _session_graph(app, session) as graph:
        snapshot = graph.get_state(thread_config(session_id))
        pending = pending_interrupt(snapshot)
        if pending is None and unfinished(snapshot):
            return _play(app, graph, session, None, on_step, on_progress)
        if answer is None:
            return _publish(app, session, snapshot)
        if pending is None:
            raise ImageloopError(
                f"session {session_id} has finished ({snapshot.values.get('stop_reason')}): start another"
            )
        return _play(app, graph, session, Command(resume=resume_value(pending, answer)), on_step, on_progress)


def check_rage_answer(app: App, session_id: str, answer: Any) -> dict[str, Any]:
    """The answer as the session's pending question takes it, or the one-line error a face shows first."""
    shown = show_rage(app, session_id)
    if shown.question is None:
        reason = shown.stop_reason or "no question pending"
        raise ImageloopError(f"session {session_id} is {shown.status} ({reason}): start another")
    return resume_value(shown.question, answer)


def resume_value(question: Mapping[str, Any], answer: Any) -> dict[str, Any]:
    """What resumes the graph for `answer` to `question` (a select or review interrupt's payload), checked."""
    if question["kind"] == "select":
        selection = resolve_selection(answer, question["candidates"])
        return {"selected": [c["id"] for c in selection.picks], "prompt": selection.prompt}
    review = resolve_review(answer)
    return {"action": review.action, "prompt": review.prompt}


def show_rage(app: App, session_id: str) -> RAGEView:
    """A session as it stands, without playing anything; its record and report are written afresh."""
    session = load_rage(app, session_id)
    with _session_graph(app, session) as graph:
        return _publish(app, session, graph.get_state(thread_config(session_id)))


def load_rage(app: App, session_id: str, knobs: Given = None) -> Session:
    """The RAGE session registered as `session_id`; knobs asked for that differ from its own are refused."""
    session = load(app, session_id, "rage", RAGEKnobs)
    session.refuse_changes(RAGEKnobs, knobs)
    return session


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
    knobs = state.get("knobs")
    roles: list[Role] = ["embedder", "generator"]
    if knobs is not None and knobs.review == "critic":
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
        "settings": knobs.record() if knobs is not None else None,
        "models": {role: str(settings.role_spec(role)) for role in roles},
        "seconds": round(sum(float(s["seconds"]) for s in state.get("steps") or []), 3),
        "imageloop_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@contextmanager
def _session_graph(app: App, session: Session) -> Iterator[RAGEGraph]:
    """The session's graph over its index, its knobs the session's; one call per session at a time."""
    knobs = RAGEKnobs.model_validate(session.knobs)
    retriever = app.retriever(session.index)
    generator = app.generator()  # a misconfigured generator fails this call, before anything is picked
    vlm = app.vlm() if knobs.review == "critic" else None
    session.out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = ArtifactStore(session.out_dir / "artifacts")
    with session_thread(app, session.session_id) as checkpointer:
        graph = build_rage_graph(vlm, generator, retriever, artifacts, checkpointer, defaults=knobs)
        carry_knobs(graph, session.session_id, knobs)
        yield graph


def _play(
    app: App,
    graph: RAGEGraph,
    session: Session,
    command: Mapping[str, Any] | Command[Any] | None,
    on_step: OnStep | None,
    on_progress: OnProgress | None = None,
    context: KnobContext | None = None,
) -> RAGEView:
    """Play to the next question or the end (in-node progress to `on_progress`); the record is written
    whatever happens."""
    try:
        snapshot = play(graph, command, session.session_id, context, on_step, on_progress)
    except BaseException as e:
        _publish(app, session, graph.get_state(thread_config(session.session_id)), error_text(e))
        raise
    return _publish(app, session, snapshot)


def _status(snapshot: StateSnapshot, question: Mapping[str, Any] | None) -> RAGEStatus:
    if question is not None:
        return "awaiting_selection" if question["kind"] == "select" else "awaiting_review"
    return "incomplete" if unfinished(snapshot) else "finished"


def _publish(app: App, session: Session, snapshot: StateSnapshot, error: str | None = None) -> RAGEView:
    """Write the session's run.json and report.html (and final.png once finished); returns what to show."""
    question = pending_interrupt(snapshot)
    status = _status(snapshot, question)
    record = rage_record(
        snapshot.values, run_id=session.session_id, out_dir=session.out_dir,
        artifacts=ArtifactStore(session.out_dir / "artifacts"), index=session.index, settings=app.settings,
        status=status, error=error,
    )  # fmt: skip
    write_json_atomic(session.out_dir / RECORD_FILE, record)
    write_report(session.out_dir, record)
    return RAGEView(
        session_id=session.session_id,
        status=status,
        prompt=record["prompt"],
        where=record["where"],
        candidates=shown_list(record["candidates"]),
        selected=shown_list(record["selected"]),
        images=record["images"],
        final_image=record["final_image"],
        stop_reason=record["stop_reason"],
        error=error,
        question=question,
        ask=question["ask"] if question is not None else None,
        knobs=session.knobs,
        out_dir=str(session.out_dir),
        report=str(session.out_dir / REPORT_FILE),
        record=str(session.out_dir / RECORD_FILE),
    )
