"""ImageRAG runs: a run directory per run, checkpointed as it goes, its record written whatever happens.

A run directory holds `final.png`, `draft.png` (draft-first mode), `artifacts/` (every image, by
sha256), `checkpoints.sqlite` (the graph's checkpoints, so an interrupted run resumes where it stopped),
`run.json`, written atomically, and `report.html`. A run that fails part-way, for any reason, still
writes its record with the steps taken so far and the error, so nothing already paid for is lost.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver

from imageloop import __version__, limits
from imageloop.app.checkpoints import sqlite_checkpointer
from imageloop.app.jobs import Job, RunCancelledError, report_to, run_in_foreground
from imageloop.app.paths import make_out_dir
from imageloop.app.threads import carry_knobs, unfinished
from imageloop.config import Settings
from imageloop.errors import ConfigError, ImageloopError, StorageError
from imageloop.files import AGAIN, disk_error, write_json_atomic
from imageloop.graphs.imagerag import ImageRAGGraph, build_imagerag_graph
from imageloop.graphs.steps import OnStep, Step, follow_steps_and_progress
from imageloop.knobs import Given, ImageRAGKnobs, KnobContext
from imageloop.progress import OnProgress, ProgressEvent
from imageloop.protocols import ImageRetriever
from imageloop.report import RECORD_FILE, read_record, write_report
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.retriever import FilteredRetriever, Where

if TYPE_CHECKING:
    from imageloop.app.core import App

RUN_RECORD = RECORD_FILE
CHECKPOINTS = "checkpoints.sqlite"
STOP_GRACE_S = 2.0
"""How long an interrupted terminal run may take to reach its next step before it is recorded as stopped."""
THREAD_ID = "run"
THREAD: RunnableConfig = {"configurable": {"thread_id": THREAD_ID}}
RUN_ID = r"^[0-9a-f]{12}$"
RecordWriter = Callable[[str | None], dict[str, Any]]
RunStatus = Literal["running", "finished", "error", "cancelled"]
FINISHED: RunStatus = "finished"
T = TypeVar("T")


def new_run_id() -> str:
    """A run's id and folder name: 12 hex digits."""
    return uuid.uuid4().hex[:12]


def export_image(artifacts: ArtifactStore, artifact_id: str | None, target: Path) -> str | None:
    """Copy an artifact to `target` (e.g. the run's final.png); returns the copy's path, None for no image."""
    if artifact_id is None:
        return None
    shutil.copyfile(artifacts.path(artifact_id), target)
    return str(target.resolve())


def imagerag_record(
    state: Mapping[str, Any],
    settings: Settings,
    run_dir: Path,
    artifacts: ArtifactStore,
    index_root: Path,
    seconds: float,
    error: str | None = None,
    planned: ImageRAGKnobs | None = None,
    cancelled: bool = False,
) -> dict[str, Any]:
    """run.json from the final (or last known) state, exporting final.png and draft.png.

    The knobs recorded are those the run resolved (state), whichever face started it; `planned` stands in
    for a run that failed before resolving them. A run someone stopped (`cancelled`) stops for that reason,
    its `error` saying who.
    """
    knobs: ImageRAGKnobs | None = state.get("knobs") or planned
    draft = export_image(artifacts, state.get("draft_image"), run_dir / "draft.png")
    final_id = state.get("final_image") or state.get("current_image")
    final = export_image(artifacts, final_id, run_dir / "final.png")
    # The references of the image returned (which may be an earlier one than the last generated).
    returned = next((image for image in reversed(state.get("images", [])) if image["artifact"] == final_id), None)
    used = set(returned.get("references", [])) if returned else set()
    hits = {h["path"]: h for h in state.get("hits") or [] if h["path"] in used}
    return {
        "run_id": run_dir.name,
        "prompt": state.get("prompt"),
        "mode": knobs.mode if knobs is not None else None,
        "aligned": bool(state.get("aligned", False)),
        "iterations": int(state.get("iteration", 0)),
        "draft_image": draft,
        "final_image": final,
        "references": [
            {
                "path": h["path"],
                "caption": h["caption"],
                "score": h["score"],
                "concept": h["concept"],
                "query": h["query"],
            }
            for h in hits.values()
        ],
        "missing_concepts": state.get("missing_concepts", []),
        "retrieval_captions": state.get("retrieval_captions", []),
        "images": [
            {**image, "path": str(artifacts.path(image["artifact"]).resolve())} for image in state.get("images", [])
        ],
        "steps": state.get("steps", []),
        "stop_reason": "cancelled" if cancelled else "error" if error else state.get("stop_reason"),
        "error": error,
        "models": {role: str(settings.role_spec(role)) for role in ("vlm", "generator", "embedder")},
        "settings": knobs.record() if knobs is not None else None,
        "index": str(index_root),
        "seconds": round(seconds, 3),
        "imageloop_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def error_text(error: BaseException) -> str:
    """How a failure is recorded: a user error's own line, anything else with its type."""
    if isinstance(error, ImageloopError):
        return str(error)
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    return f"{type(error).__name__}: {error}"


@contextmanager
def _checkpointed(run_dir: Path) -> Iterator[SqliteSaver]:
    connection = _on_disk(run_dir, lambda: sqlite3.connect(run_dir / CHECKPOINTS, check_same_thread=False))
    with closing(connection) as conn:
        yield sqlite_checkpointer(conn, run_dir / CHECKPOINTS)


def can_resume(run_dir: str | Path) -> bool:
    """Whether `run_dir` holds a run that `--resume` can continue: its record and its checkpoints."""
    folder = Path(run_dir)
    return (folder / RUN_RECORD).is_file() and (folder / CHECKPOINTS).is_file()


def run_imagerag(
    app: App,
    prompt: str | None,
    index: str | Path | None,
    *,
    out_dir: str | Path | None = None,
    knobs: Given = None,
    where: Where | None = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
    resume: bool = False,
    on_started: Callable[[RecordWriter], None] | None = None,
) -> dict[str, Any]:
    """Run ImageRAG for `prompt` against `index`; returns the record written to `run.json`.

    `knobs` are ImageRAG's (`ImageRAGKnobs`; unset: the settings'). `out_dir` defaults to a new folder
    under the app's runs; `where` restricts retrieval to images whose metadata matches (e.g.
    `{"folder": "birds"}`). `on_step` sees each node's decisions as it finishes, `on_progress` the
    progress inside a node (a generator's denoising steps). With `resume`, `out_dir` is an interrupted
    run's folder: the run continues from its last checkpoint with the knobs it started with (asking for
    others is refused), reusing every finished node; a finished run is left as it is. `on_started`
    receives, once the run folder exists, a function that writes the record as the run stands with a
    given error: a server that stops before the run does records it with that (see `app.jobs`).

    The record is written before the first step (`status: running`) and again after every step, so a run
    killed at any point (kill -9, a power cut) leaves a record that `--resume` continues from.
    """
    given = ImageRAGKnobs.given(knobs)
    planned = ImageRAGKnobs.from_settings(app.settings).overridden(given)
    previous: dict[str, Any] | None = None
    if resume:
        if out_dir is None:
            raise ImageloopError("resuming needs the run's folder")
        run_dir = app.path(out_dir, "run", kind="dir")
        previous = read_record(run_dir)
        prompt, index = str(previous["prompt"]), str(previous["index"])
        if not (run_dir / CHECKPOINTS).is_file():
            raise ImageloopError(f"{run_dir} has no checkpoints to resume from: start a new run")
    else:
        prompt = limits.check_text("prompt", prompt or "")
        run_dir = app.path(out_dir, "run folder", kind="out") if out_dir is not None else app.runs_dir / new_run_id()
    retriever = app.retriever(str(index))
    searched: ImageRetriever = FilteredRetriever(retriever, where) if where else retriever
    make_out_dir(run_dir, "run folder")
    artifacts = ArtifactStore(run_dir / "artifacts")
    started = time.perf_counter()
    with _checkpointed(run_dir) as checkpointer:
        graph = build_imagerag_graph(app.vlm(), app.generator(), searched, artifacts, checkpointer, defaults=planned)
        snapshot = _on_disk(run_dir, lambda: graph.get_state(THREAD))
        if not resume and snapshot.values:
            raise ImageloopError(f"{run_dir} already holds a run: use another `out` folder, or resume {run_dir}")
        if previous is not None:
            planned = _started_with(graph, previous, snapshot.values)
            _refuse_changes(run_dir, planned, given)
            if previous.get("status") == FINISHED and not unfinished(snapshot):
                return previous  # a finished run resumed again: nothing to do, nothing rewritten
        reused = len(snapshot.values.get("steps", []))

        def write_record(error: str | None, status: RunStatus) -> dict[str, Any]:
            state = {"prompt": prompt, **graph.get_state(THREAD).values}
            seconds = time.perf_counter() - started
            root = retriever.index.root
            # A stopped run (a person, Ctrl-C, a shutdown) stops for that reason; its error says who stopped it.
            cancelled = status == "cancelled"
            record = imagerag_record(state, app.settings, run_dir, artifacts, root, seconds, error, planned, cancelled)
            record["status"] = status
            if resume:
                record["resumed"] = {"reused_steps": reused}
            write_json_atomic(run_dir / RUN_RECORD, record)
            write_report(run_dir, record)
            return record

        def recorded(step: Step) -> None:
            _on_disk(run_dir, lambda: write_record(None, "running"))
            if on_step is not None:
                on_step(step)

        _on_disk(run_dir, lambda: write_record(None, "running"))
        if on_started is not None:
            on_started(lambda error: write_record(error, "cancelled"))
        error: str | None = None
        status: RunStatus = FINISHED
        try:
            if unfinished(snapshot) or not snapshot.values:
                # A run killed before its first checkpoint starts from its prompt, with the knobs it planned.
                context = ImageRAGKnobs.given(planned.model_dump())
                _play(graph, None if snapshot.values else {"prompt": prompt}, context, recorded, on_progress)
        except BaseException as e:
            # The disk's failures (full, read-only) are recorded and shown as the same line that says what to do.
            disk = _disk_failure(e, run_dir)
            error = str(disk) if disk is not None else error_text(e)
            status = "cancelled" if isinstance(e, KeyboardInterrupt | RunCancelledError) else "error"
            if disk is not None:
                raise disk from e
            raise
        finally:
            record = _on_disk(run_dir, lambda: write_record(error, status))
    return record


def _started_with(graph: ImageRAGGraph, previous: Mapping[str, Any], held: Mapping[str, Any]) -> ImageRAGKnobs:
    """The knobs an interrupted run resolved: its checkpoint's, else its record's (a run killed before its first
    checkpoint, or recorded before knobs were one model in state, which its checkpoint then carries)."""
    knobs = held.get("knobs")
    if isinstance(knobs, ImageRAGKnobs):
        return knobs
    settings = {**(previous.get("settings") or {}), "mode": previous.get("mode")}
    recorded = {name: value for name, value in settings.items() if value is not None}
    knobs = ImageRAGKnobs().overridden(recorded)
    carry_knobs(graph, THREAD_ID, knobs)
    return knobs


def _refuse_changes(run_dir: Path, knobs: ImageRAGKnobs, given: KnobContext) -> None:
    """The one resume policy: a run goes on with the knobs it started with; asking for others is refused."""
    changed = knobs.changed_by(given)
    if changed:
        differs = "; ".join(f"{name} {old!r}, not {new!r}" for name, (old, new) in changed.items())
        raise ConfigError(f"the run in {run_dir} was started with {differs}: resume it without those, or start anew")


def run_in_terminal(
    app: App,
    prompt: str | None,
    index: str | Path | None,
    *,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """`run_imagerag` waited for in a thread of its own (`jobs.run_in_foreground`): Ctrl-C or SIGTERM stops
    the run at its next step with its record whole, or, inside a model call that does not end within
    `STOP_GRACE_S`, records it as stopped there and raises `LeftRunning`, so a terminal is never held."""

    def work(job: Job) -> dict[str, Any]:
        def step(shown: Step) -> None:
            if on_step is not None:
                on_step(shown)
            job.check_cancelled()

        def progress(event: ProgressEvent) -> None:
            if on_progress is not None:
                on_progress(event)
            job.check_cancelled()

        return run_imagerag(
            app, prompt, index, on_step=step, on_progress=progress, on_started=job.record_with, **options
        )

    return run_in_foreground("generate", work, STOP_GRACE_S)


def _on_disk(run_dir: Path, write: Callable[[], T]) -> T:
    """`write()`, with the disk's failures (full, read-only) as the one-line error that says what to do."""
    try:
        return write()
    except (OSError, sqlite3.Error) as e:
        disk = _disk_failure(e, run_dir)
        if disk is None:
            raise
        raise disk from e


def _disk_failure(error: BaseException, run_dir: Path) -> StorageError | None:
    """The disk's failure during a run as one line; once the run has a record, it says how to continue it."""
    again = f"continue with: imageloop generate --resume {run_dir}" if can_resume(run_dir) else AGAIN
    return disk_error(error, f"writing the run in {run_dir}", again)


def _play(
    graph: ImageRAGGraph,
    inputs: Mapping[str, Any] | None,
    context: KnobContext,
    on_step: OnStep | None,
    on_progress: OnProgress | None,
) -> None:
    """Run (or continue) the graph, handing each node's steps to `on_step` as the node finishes, and its
    in-node progress (denoising steps) to `on_progress` as it happens."""
    # Every checkpoint is on disk before the next node starts: a run killed during a node never draws again
    # what an earlier node drew.
    chunks = graph.stream(  # type: ignore[call-overload]
        inputs, THREAD, stream_mode=["updates", "custom"], context=context, durability="sync"
    )
    follow_steps_and_progress(chunks, on_step, on_progress)


RUN_FILE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
RUN_FILE_TYPES |= {".json": "application/json", ".html": "text/html"}


def run_file(app: App, relative: str) -> tuple[Path, str]:
    """A file a run wrote (an image, run.json, report.html) by its path under the runs folder, with its media
    type; the one rule every face that hands run outputs to a remote client applies (LangGraph Server's route,
    MCP resources). Anything else, or anything resolving outside the runs folder, is "no such run file"."""
    runs = app.runs_dir.resolve()
    missing = ImageloopError(f"no such run file {relative!r} under the runs folder")
    try:
        path = (runs / relative).resolve()
    except (ValueError, OSError, RuntimeError):  # a NUL byte (`%00` in a URL), a loop
        raise missing from None
    media_type = RUN_FILE_TYPES.get(path.suffix.lower())
    if media_type is None or not path.is_relative_to(runs) or not path.is_file():
        raise missing
    return path, media_type


def run_relative(app: App, path: str | Path) -> str | None:
    """`path` relative to the runs folder (how remote clients name it), or None when it lies elsewhere."""
    resolved = Path(path).resolve()
    runs = app.runs_dir.resolve()
    return resolved.relative_to(runs).as_posix() if resolved.is_relative_to(runs) else None


def start_generate(app: App, prompt: str, index: str | Path, knobs: Given = None) -> Job:
    """ImageRAG as a background run of `app.jobs`, its folder `<runs>/<run id>`; an unknown or bad knob, a
    missing or mismatched index or a misconfigured model fails this call, not the run."""
    knobs = ImageRAGKnobs.given(knobs)
    limits.check_text("prompt", prompt)
    app.retriever(index)
    app.vlm(), app.generator()

    def work(job: Job) -> dict[str, Any]:
        return run_imagerag(
            app, prompt, index, out_dir=job.run_dir, knobs=knobs, on_started=job.record_with, **report_to(job)
        )

    return app.jobs.submit("generate", work, run_root=app.runs_dir)


def read_run(app: App, run: str) -> dict[str, Any]:
    """A finished (or failed) run's record, by run id under the app's runs or by folder."""
    folder = app.runs_dir / run if len(run) == 12 and run.isalnum() else app.path(run, "run", kind="dir")
    if not folder.is_dir():
        raise ImageloopError(f"no run {run!r} in {app.runs_dir}")
    return read_record(folder)
