"""Background runs: long work (indexing, ImageRAG, GenIR rounds) that an agent-facing face starts and polls.

An agent's tool call cannot wait minutes (MCP clients time out near 60 s), so a face submits the work
here, waits a while, and hands back the run id; the run goes on in a small thread pool, reports its
progress as it goes, writes its status next to its record (so a later process can still answer for
it), and stops at its next step boundary when the application closes. A run still inside a step when
the grace period ends (a model call that hangs) is recorded as "interrupted" there and then, with
the record its work registered (`Job.record_with`), so a service stopped by SIGTERM (and killed soon
after) leaves no run that claims to be running. The registry is bounded: too many active runs is a
one-line "busy" error, never a silent queue of unbounded length.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from typing_extensions import TypedDict

from imageloop.app.results import RunState
from imageloop.errors import ImageloopError
from imageloop.files import write_json_atomic

if TYPE_CHECKING:
    from imageloop.graphs.steps import Step
    from imageloop.progress import ProgressEvent

logger = logging.getLogger("imageloop.jobs")

WORKERS = 4
MAX_ACTIVE_RUNS = 8
KEPT_RUNS = 256
PROGRESS_KEPT = 500
STATUS_FILE = "status.json"

JobKind = Literal["generate", "index", "genir", "rage", "cir", "triplets", "eval"]
JobStatus = Literal["queued", "running", "done", "error", "cancelled", "interrupted"]
FINISHED: frozenset[str] = frozenset({"done", "error", "cancelled", "interrupted"})
SHUT_DOWN = "cancelled: the service shut down before the run finished"
T = TypeVar("T")


class ServerBusyError(ImageloopError):
    """Too many runs are queued or running, or the application is shutting down."""


class RunCancelledError(ImageloopError):
    """A run stopped at a step boundary: the application is shutting down, or a person stopped it."""


@dataclass(frozen=True)
class Note:
    """One progress message; `done` of `total` when the message counts something (images indexed, steps)."""

    message: str
    done: int | None = None
    total: int | None = None


@dataclass
class Job:
    """One background run: its progress messages, then its result or error."""

    id: str
    kind: JobKind
    run_dir: Path | None = None
    status: JobStatus = "queued"
    notes: list[Note] = field(default_factory=list)
    reported: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    write_record: Callable[[str | None], object] | None = None
    cancel_reason: str = SHUT_DOWN

    def record_with(self, write_record: Callable[[str | None], object]) -> None:
        """Register how to write this run's record with an error, for when the service cannot wait for it."""
        self.write_record = write_record

    def abandon(self, reason: str) -> None:
        """Record the run as interrupted now (status and, when registered, its record), though its thread runs on."""
        with self.lock:
            if self.done.is_set():
                return
            self.status, self.error = "interrupted", reason
        write_record = self.write_record
        try:
            self.persist()
            if write_record is not None:
                write_record(reason)
        except Exception:
            logger.exception("run %s: could not record its interruption", self.id)

    def report(self, message: str, done: int | None = None, total: int | None = None) -> None:
        """Add a progress message (what the waiting call forwards to the client), counted when it counts."""
        with self.lock:
            self.notes.append(Note(message, done, total))
            self.reported += 1
            if len(self.notes) > PROGRESS_KEPT:
                del self.notes[: len(self.notes) - PROGRESS_KEPT]

    def stop(self, reason: str) -> None:
        """Ask the run to stop at its next step boundary, saying why (recorded as its error)."""
        self.cancel_reason = f"cancelled: {reason}"
        self.cancel.set()

    def check_cancelled(self) -> None:
        """Stop here if the server is shutting down, someone stopped the run, or the terminal's run was
        interrupted."""
        if self.cancel.is_set():
            raise RunCancelledError(self.cancel_reason)

    def notes_since(self, count: int) -> tuple[int, list[Note]]:
        """The total reported so far and the notes after the first `count`."""
        with self.lock:
            new = self.reported - count
            return self.reported, self.notes[-new:] if new > 0 else []

    def persist(self) -> None:
        """Write the run's status next to its record, so get_run can answer after a restart."""
        if self.run_dir is not None:
            write_json_atomic(
                self.run_dir / STATUS_FILE,
                {"run_id": self.id, "kind": self.kind, "status": self.status, "error": self.error},
            )


class JobRegistry:
    """Background runs on a small thread pool; bounded, and cancelled cleanly at shutdown."""

    def __init__(self, workers: int = WORKERS, max_active: int = MAX_ACTIVE_RUNS, kept: int = KEPT_RUNS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imageloop-run")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._sessions: dict[str, str] = {}
        self._lock = threading.Lock()
        self._max_active = max_active
        self._kept = kept
        self._closed = False

    def submit(
        self,
        kind: JobKind,
        work: Callable[[Job], dict[str, Any]],
        run_root: Path | None = None,
        session: str | None = None,
    ) -> Job:
        """Queue `work` (with its own folder RUN_ROOT/<run_id> if given); refused when shutting down or full, and
        for a `session` another run of which is still going (a session is played by one run at a time)."""
        with self._lock:
            if self._closed:
                raise ServerBusyError("shutting down; no new runs")
            self._refuse_busy(session)
            active = sum(not job.done.is_set() for job in self._jobs.values())
            if active >= self._max_active:
                raise ServerBusyError(
                    f"{active} runs are queued or running (at most {self._max_active}); poll get_run and retry"
                )
            job_id = uuid.uuid4().hex[:12]
            job = Job(id=job_id, kind=kind, run_dir=run_root / job_id if run_root is not None else None)
            self._jobs[job.id] = job
            if session is not None:
                self._sessions[session] = job.id
            finished = [key for key, old in self._jobs.items() if old.done.is_set()]
            for key in finished[: max(0, len(self._jobs) - self._kept)]:
                del self._jobs[key]
        job.persist()
        job.future = self._executor.submit(self._run, job, work)
        return job

    def refuse_busy(self, session: str) -> None:
        """Refuse to touch a session another run is still playing (it holds the session until it finishes)."""
        with self._lock:
            self._refuse_busy(session)

    def _refuse_busy(self, session: str | None) -> None:
        playing = self._jobs.get(self._sessions.get(session, "")) if session is not None else None
        if playing is not None and not playing.done.is_set():
            raise ServerBusyError(f"session {session} is busy with run {playing.id}: poll get_run first")

    def get(self, job_id: str) -> Job | None:
        """The run with this id, if this process still remembers it."""
        with self._lock:
            return self._jobs.get(job_id)

    def playing(self, session: str) -> Job | None:
        """The run playing `session` now, if one is (a page reloaded mid-round finds it here)."""
        with self._lock:
            job = self._jobs.get(self._sessions.get(session, ""))
        return job if job is not None and not job.done.is_set() else None

    def _run(self, job: Job, work: Callable[[Job], dict[str, Any]]) -> None:
        try:
            job.check_cancelled()
            job.status = "running"
            job.persist()
            job.result = work(job)
            job.status = "done"
        except RunCancelledError as e:
            job.status, job.error = "cancelled", str(e)
        except ImageloopError as e:
            job.status, job.error = "error", str(e)
        except Exception as e:
            logger.exception("run %s failed", job.id)
            job.status, job.error = "error", f"{type(e).__name__}: {e}"
        finally:
            # The record writer closes over the run's graph and checkpointer: a finished run keeps only its
            # status and result (a server keeps the last KEPT_RUNS runs; their graphs would stay with them).
            job.write_record = None
            with self._lock:  # the session table holds running sessions only
                for session in [s for s, job_id in self._sessions.items() if job_id == job.id]:
                    del self._sessions[session]
            try:
                job.persist()
            finally:
                job.done.set()

    def cancel_all(self) -> None:
        """Ask every unfinished run to stop at its next step boundary; queued ones never start."""
        with self._lock:
            self._closed = True
            pending = [job for job in self._jobs.values() if not job.done.is_set()]
        for job in pending:
            job.cancel.set()
            if job.future is not None and job.future.cancel():
                # Never started: record the cancellation here, since _run will not.
                job.status, job.error = "cancelled", "cancelled: the service shut down before the run started"
                job.persist()
                job.done.set()

    def shutdown(self, grace_s: float) -> int:
        """Let running work finish for `grace_s`, then cancel the rest at their next step boundary.

        Runs still inside a step after a second `grace_s` are recorded as interrupted (`Job.abandon`);
        returns how many, whose threads are still running.
        """
        with self._lock:
            self._closed = True
            pending = [job for job in self._jobs.values() if not job.done.is_set()]
        deadline = time.monotonic() + grace_s
        try:
            for job in pending:
                job.done.wait(max(0.0, deadline - time.monotonic()))
        finally:
            # Even when a second signal cuts the grace short: the runs then stop at their next step.
            self.cancel_all()
        deadline = time.monotonic() + grace_s
        for job in pending:
            job.done.wait(max(0.0, deadline - time.monotonic()))
        stuck = [job for job in pending if not job.done.is_set()]
        for job in stuck:
            job.abandon("interrupted: the service stopped during a step of this run; its record holds the steps before")
        self._executor.shutdown(wait=False, cancel_futures=True)
        return len(stuck)


class LeftRunning(KeyboardInterrupt):
    """Ctrl-C or SIGTERM (`stop`) while a foreground run was inside a model call: its record says where it
    stopped, and the process may leave without waiting for the call."""

    def __init__(self, stop: KeyboardInterrupt) -> None:
        super().__init__(str(stop))
        self.stop = stop


def run_in_foreground(kind: JobKind, work: Callable[[Job], T], grace_s: float) -> T:
    """What `work` returns (or raises), run in a thread of its own and waited for here, so that Ctrl-C and
    SIGTERM reach this thread at once even while the run waits on a model call.

    An interrupt asks the run to stop at its next step (`work` reports through `report_to(job)` or calls
    `job.check_cancelled`), where its record is written whole; a run still inside a step after `grace_s` is
    recorded there and then (`Job.abandon`) and `LeftRunning` is raised, for the process to leave without
    waiting for the call (a hung endpoint would otherwise hold it for minutes).
    """
    job = Job(id=uuid.uuid4().hex[:12], kind=kind, cancel_reason="cancelled: interrupted before the run finished")
    if threading.current_thread() is not threading.main_thread():
        return work(job)  # no signal is delivered here: nothing to hear
    outcome: list[T] = []
    failure: list[BaseException] = []

    def target() -> None:
        try:
            outcome.append(work(job))
        except BaseException as e:  # handed to the waiting thread, traceback and all
            failure.append(e)
        finally:
            job.done.set()

    threading.Thread(target=target, name=f"imageloop-{kind}", daemon=True).start()
    try:
        while not job.done.wait(0.1):
            pass
    except KeyboardInterrupt as stop:
        job.cancel.set()
        if not job.done.wait(grace_s):
            job.abandon("interrupted during a step; the record holds the steps before")
            raise LeftRunning(stop) from stop
        raise
    if failure:
        raise failure[0]
    return outcome[0]


class Followers(TypedDict):
    """The callbacks a loop run takes to be followed (`run_imagerag`, `start_search`, ... accept both)."""

    on_step: Callable[[Step], None]
    on_progress: Callable[[ProgressEvent], None]


def report_to(job: Job) -> Followers:
    """`on_step` and `on_progress` for a loop run as `job`: each step and in-node progress (counted) becomes a
    progress note, and the run stops at its next step (or denoising step) once the application shuts down."""
    from imageloop.progress import describe

    def on_step(step: Step) -> None:
        job.report(f"[{step['node']}] {step['decision']}")
        job.check_cancelled()

    def on_progress(event: ProgressEvent) -> None:
        job.report(describe(event), event["done"], event["total"])
        job.check_cancelled()

    return Followers(on_step=on_step, on_progress=on_progress)


def _record(run_dir: Path) -> dict[str, Any] | None:
    from imageloop.report import RECORD_FILE, read_record

    return read_record(run_dir) if (run_dir / RECORD_FILE).is_file() else None


def job_state(job: Job, last: int = 20) -> RunState:
    """A live run's state (the latest progress messages); a failed or cancelled run's result is the record it wrote."""
    with job.lock:
        progress = [note.message for note in job.notes[-last:]]
    result = job.result
    if result is None and job.run_dir is not None and job.done.is_set():
        result = _record(job.run_dir)
    poll = None if job.done.is_set() else f"call get_run with run_id={job.id!r} (and wait_seconds) for the result"
    return RunState(
        run_id=job.id, kind=job.kind, status=job.status, progress=progress, error=job.error, result=result, poll=poll
    )


def stored_state(runs_dir: Path, run_id: str) -> RunState:
    """A run's state from its folder, for a process that no longer (or never) held it in memory; a run that
    was still going when its server stopped reads "interrupted"."""
    run_dir = runs_dir / run_id
    status_path = run_dir / STATUS_FILE
    if not status_path.is_file():
        record = _record(run_dir)
        if record is None:
            raise ImageloopError(f"no run {run_id!r} (runs are kept in {runs_dir})")
        # A run no server held (the CLI's, another program's): its record is all there is, and says how it ended.
        stop_reason = record.get("stop_reason")
        status = stop_reason if stop_reason in ("error", "cancelled") else "done"
        return RunState(
            run_id=run_id, kind="generate", status=status, progress=[], error=record.get("error"), result=record
        )
    status = json.loads(status_path.read_text(encoding="utf-8"))
    state, error = status["status"], status.get("error")
    if state not in FINISHED:
        state, error = "interrupted", "the server stopped before the run finished"
    return RunState(run_id=run_id, kind=status["kind"], status=state, progress=[], error=error, result=_record(run_dir))
