"""imageloop as an MCP server: indexing, retrieval, ImageRAG and GenIR as tools an agent can call.

Built on the official SDK's 1.x line (`mcp.server.fastmcp.FastMCP`), not 2.x (`MCPServer`):
langchain-mcp-adapters, the usual way a LangGraph agent loads MCP tools, still pins `mcp<2`, and a
server that shares an environment with its LangGraph clients must resolve with them.

What the server promises its clients:
- Path arguments are resolved (symlinks included) and must lie inside the `--root` folders; `..` is
  refused outright. Paths this server returns (retrieved images, run outputs) may be passed back.
- Every argument is bounded (k, iterations, steps, sizes, text lengths, waits); a bad one is refused
  with an error naming the field.
- Images come back as PNG `ImageContent`, downscaled so one result's images stay under about 1 MiB,
  next to their file paths; structured output carries paths, never base64.
- Models load once per process (the backend cache), not per session or request.
- Long work (indexing, ImageRAG, GenIR rounds) runs as a background run: the call waits up to
  `wait_seconds` (reporting each step as progress) and otherwise returns a run id for `get_run`, so
  no call outlives a client's ~60 s timeout silently. A client that disconnects leaves the run to
  finish; at shutdown unfinished runs are cancelled at a step boundary, and run records are always
  written whole (atomically).
- Runs that use the same model take turns (one queue per model, nothing dropped).
"""

from __future__ import annotations

import base64
import functools
import hmac
import io
import ipaddress
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, BinaryIO, Literal

import anyio
import anyio.to_thread
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from PIL import Image
from pydantic import BaseModel, Field, ValidationError

from imageloop import __version__
from imageloop.agents.captioner import VLMCaptioner
from imageloop.backends import make_embedder, make_generator, make_vlm
from imageloop.config import Settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.files import write_json_atomic
from imageloop.graphs.genir import FeedbackKind
from imageloop.graphs.steps import Step
from imageloop.runs import RUN_RECORD, run_imagerag
from imageloop.search_session import (
    OnStep,
    SearchSession,
    continue_search,
    load_search_session,
    show_search,
    start_search,
)
from imageloop.tools.images import open_image, png_bytes
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever

logger = logging.getLogger("imageloop.mcp")

# Bounds on every argument a client controls.
MAX_K = 50
MAX_ITERATIONS = 5
MAX_STEPS = 100
MIN_SIDE, MAX_SIDE = 64, 2048
MAX_TOP_K = 8
MAX_ROUNDS = 10
MAX_BATCH = 256
MAX_PROMPT_CHARS = 2000
MAX_PATH_CHARS = 4096
MAX_WAIT_S = 50.0
DEFAULT_WAIT_S = 40.0
# Images per result and their budget: base64 bytes of all images in one result (Claude Desktop caps
# a whole result near 1 MiB; the JSON text beside the images needs a little room too).
MAX_IMAGES = 16
RESULT_IMAGE_BUDGET = 960_000
THUMBNAIL_SIDE = 512
THUMBNAIL_CACHE_BYTES = 64 * 2**20
# Runs: worker threads, how many may be queued or running at once, how many finished ones stay in memory.
WORKERS = 4
MAX_ACTIVE_RUNS = 8
KEPT_RUNS = 256
PROGRESS_KEPT = 500
HEARTBEAT_S = 10.0

RUN_ID = r"^[0-9a-f]{12}$"
STATUS_FILE = "status.json"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")
SCHEMES = ("http", "https")

JobKind = Literal["generate", "index", "genir"]
JobStatus = Literal["queued", "running", "done", "error", "cancelled", "interrupted"]
FINISHED: frozenset[str] = frozenset({"done", "error", "cancelled", "interrupted"})


class PathNotAllowedError(ImageloopError):
    """A path argument outside the server's roots, or written with `..`."""


class ServerBusyError(ImageloopError):
    """Too many runs are queued or running, or the server is shutting down."""


class RunCancelledError(ImageloopError):
    """A run stopped at a step boundary because the server is shutting down."""


# Paths.


class Roots:
    """The folders path arguments may reach; relative paths are taken from the first one."""

    def __init__(self, folders: Sequence[Path]) -> None:
        resolved: list[Path] = []
        for folder in folders:
            try:
                path = Path(folder).resolve(strict=True)
            except (OSError, RuntimeError):
                raise ConfigError(f"--root {folder}: no such folder") from None
            if not path.is_dir():
                raise ConfigError(f"--root {folder}: not a folder")
            resolved.append(path)
        if not resolved:
            raise ConfigError("the server needs at least one --root folder")
        self.folders: tuple[Path, ...] = tuple(dict.fromkeys(resolved))

    def with_folder(self, folder: Path) -> Roots:
        """These roots plus `folder` (run outputs stay readable)."""
        return Roots([*self.folders, folder])

    def contains(self, path: Path) -> bool:
        """Whether an already resolved path lies inside a root."""
        return any(path.is_relative_to(root) for root in self.folders)

    def resolve(self, text: str, what: str, kind: Literal["file", "dir"] | None = None) -> Path:
        """The resolved, existing path `text` names, refused unless it lies inside a root."""
        if not text.strip():
            raise PathNotAllowedError(f"{what}: the path is empty")
        if "\x00" in text:
            raise PathNotAllowedError(f"{what}: the path contains a NUL character")
        given = Path(text)
        if ".." in given.parts:
            raise PathNotAllowedError(f"{what} {text!r}: '..' is not allowed in paths")
        candidate = given if given.is_absolute() else self.folders[0] / given
        try:
            # Symlinks are resolved first, so a link inside a root that points outside is refused;
            # the check comes before any existence test, so nothing outside the roots can be probed.
            resolved = candidate.resolve()
        except (OSError, RuntimeError) as e:
            raise PathNotAllowedError(f"{what} {text!r}: cannot resolve ({e})") from None
        if not self.contains(resolved):
            allowed = ", ".join(str(root) for root in self.folders)
            raise PathNotAllowedError(
                f"{what} {text!r} is outside the folders this server may read ({allowed}); "
                "the server's --root options set them"
            )
        if not resolved.exists():
            raise ImageloopError(f"{what} {text!r}: no such file or folder")
        if kind == "dir" and not resolved.is_dir():
            raise ImageloopError(f"{what} {text!r} is not a folder")
        if kind == "file" and not resolved.is_file():
            raise ImageloopError(f"{what} {text!r} is not a file")
        return resolved


# Images.


def image_budgets(count: int, total: int = RESULT_IMAGE_BUDGET) -> int:
    """The base64 budget of each of `count` images sharing one result."""
    return total // max(count, 1)


class _EncodedCache:
    """Recently encoded thumbnails, bounded by their total size (repeat queries skip the PNG encoder)."""

    def __init__(self, max_bytes: int) -> None:
        self._items: OrderedDict[Hashable, str | None] = OrderedDict()
        self._bytes = 0
        self._max_bytes = max_bytes
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> tuple[bool, str | None]:
        with self._lock:
            if key not in self._items:
                return False, None
            self._items.move_to_end(key)
            return True, self._items[key]

    def put(self, key: Hashable, value: str | None) -> None:
        with self._lock:
            if key in self._items:
                return
            self._items[key] = value
            self._bytes += len(value or "")
            while self._bytes > self._max_bytes and self._items:
                _, dropped = self._items.popitem(last=False)
                self._bytes -= len(dropped or "")


_encoded = _EncodedCache(THUMBNAIL_CACHE_BYTES)


def encode_png_under(path: Path, budget: int, max_side: int = THUMBNAIL_SIDE) -> str | None:
    """`path` as base64 PNG no longer than `budget` characters, downscaled as needed; None if it won't fit."""
    stat = path.stat()
    # Keyed by mtime and size as well as path, so a rewritten file is encoded afresh.
    key = (str(path), stat.st_mtime_ns, stat.st_size, budget, max_side)
    hit, data = _encoded.get(key)
    if not hit:
        data = _encode_png(path, budget, max_side)
        _encoded.put(key, data)
    return data


def _encode_png(path: Path, budget: int, max_side: int) -> str | None:
    image = open_image(path)
    # First guess from the budget: photos compress to roughly 1.5 bytes a pixel as PNG.
    side = int(((budget * 3 / 4) / 1.5) ** 0.5)
    image.thumbnail((max(16, min(max_side, side)), max(16, min(max_side, side))))
    for _ in range(8):
        data = png_bytes(image)
        encoded = 4 * ((len(data) + 2) // 3)
        if encoded <= budget:
            return base64.b64encode(data).decode("ascii")
        scale = min(0.9, 0.95 * (budget / encoded) ** 0.5)
        if image.width * scale < 8 or image.height * scale < 8:
            return None
        image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    return None


# Runs.


@dataclass
class Job:
    """One background run: its progress messages, then its result or error."""

    id: str
    kind: JobKind
    run_dir: Path | None = None
    status: JobStatus = "queued"
    progress: list[str] = field(default_factory=list)
    reported: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    done: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    future: Future[None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def report(self, message: str) -> None:
        """Add a progress message (what the waiting call forwards to the client)."""
        with self.lock:
            self.progress.append(message)
            self.reported += 1
            if len(self.progress) > PROGRESS_KEPT:
                del self.progress[: len(self.progress) - PROGRESS_KEPT]

    def check_cancelled(self) -> None:
        """Stop here if the server is shutting down."""
        if self.cancel.is_set():
            raise RunCancelledError("cancelled: the server shut down before the run finished")

    def messages_since(self, count: int) -> tuple[int, list[str]]:
        """The total reported so far and the messages after the first `count`."""
        with self.lock:
            new = self.reported - count
            return self.reported, self.progress[-new:] if new > 0 else []

    def persist(self) -> None:
        """Write the run's status next to its record, so get_run can answer after a restart."""
        if self.run_dir is not None:
            write_json_atomic(
                self.run_dir / STATUS_FILE,
                {"run_id": self.id, "kind": self.kind, "status": self.status, "error": self.error},
            )


class ModelGate:
    """One lock per model: runs that use the same model take turns, in arrival order, none dropped."""

    def __init__(self) -> None:
        self._locks: dict[Hashable, threading.Lock] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: Hashable, job: Job, what: str) -> Iterator[None]:
        """Hold `key`'s lock for the block, reporting a wait and giving up if the job is cancelled."""
        with self._lock:
            lock = self._locks.setdefault(key, threading.Lock())
        if not lock.acquire(blocking=False):
            job.report(f"waiting: another run is using the {what}")
            while not lock.acquire(timeout=0.25):
                job.check_cancelled()
        try:
            yield
        finally:
            lock.release()


class JobRegistry:
    """Background runs on a small thread pool; bounded, and cancelled cleanly at shutdown."""

    def __init__(self, workers: int = WORKERS, max_active: int = MAX_ACTIVE_RUNS, kept: int = KEPT_RUNS) -> None:
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="imageloop-run")
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._max_active = max_active
        self._kept = kept
        self._closed = False

    def submit(self, kind: JobKind, work: Callable[[Job], dict[str, Any]], run_root: Path | None = None) -> Job:
        """Queue `work` (with its own folder RUN_ROOT/<run_id> if given); refused when shutting down or full."""
        with self._lock:
            if self._closed:
                raise ServerBusyError("the server is shutting down; no new runs")
            active = sum(not job.done.is_set() for job in self._jobs.values())
            if active >= self._max_active:
                raise ServerBusyError(
                    f"{active} runs are queued or running (at most {self._max_active}); poll get_run and retry"
                )
            job_id = uuid.uuid4().hex[:12]
            job = Job(id=job_id, kind=kind, run_dir=run_root / job_id if run_root is not None else None)
            self._jobs[job.id] = job
            finished = [key for key, old in self._jobs.items() if old.done.is_set()]
            for key in finished[: max(0, len(self._jobs) - self._kept)]:
                del self._jobs[key]
        job.persist()
        job.future = self._executor.submit(self._run, job, work)
        return job

    def get(self, job_id: str) -> Job | None:
        """The run with this id, if this process still remembers it."""
        with self._lock:
            return self._jobs.get(job_id)

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
                job.status, job.error = "cancelled", "cancelled: the server shut down before the run started"
                job.persist()
                job.done.set()

    def shutdown(self, grace_s: float) -> None:
        """Let running work finish for `grace_s`, then cancel the rest at their next step boundary."""
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
        self._executor.shutdown(wait=False, cancel_futures=True)


# Structured output of the tools.


class Hit(BaseModel):
    """One retrieved image."""

    rank: int
    id: str
    path: str
    caption: str
    score: float


class Retrieval(BaseModel):
    """What retrieve_images returns (image content follows in the same order, for the top results)."""

    index: str
    query: str | None
    image: str | None
    results: list[Hit]
    images_shown: int


class RunView(BaseModel):
    """A run's state: queued or running (poll get_run with run_id), or finished with a result or error."""

    run_id: str
    kind: JobKind
    status: JobStatus
    progress: list[str] = Field(description="the latest progress messages, oldest first")
    error: str | None = None
    result: dict[str, Any] | None = None
    poll: str | None = Field(default=None, description="what to call next while the run is not finished")


# The server's state and the tools' work, independent of the transport.


class ImageloopMCP:
    """Process-wide state behind the tools: roots, settings, cached indexes, runs and sessions."""

    def __init__(self, settings: Settings, roots: Roots, runs_dir: Path, workers: int = WORKERS) -> None:
        self.settings = settings
        self.roots = roots
        runs_dir.mkdir(parents=True, exist_ok=True)
        self.runs_dir = runs_dir.resolve()
        # Run outputs may be passed back (e.g. a generated image as an image query).
        self.readable = roots.with_folder(self.runs_dir)
        self.jobs = JobRegistry(workers=workers)
        self.gate = ModelGate()
        self._retrievers: dict[tuple[Path, str], Retriever] = {}
        self._lock = threading.Lock()
        self.sessions_db = self.runs_dir / "sessions.sqlite"
        self._session_runs: dict[str, str] = {}

    # Backends and indexes, built once per process.

    def retriever(self, folder: Path) -> Retriever:
        """The retriever over `folder`'s index, opened once and shared by every call."""
        with self._lock:
            embedder = make_embedder(self.settings)
            key = (folder, embedder.model_id)
            cached = self._retrievers.get(key)
            if cached is not None:
                return cached
            index = open_index(folder)
            try:
                retriever = Retriever(index, embedder)
            except ImageloopError:
                index.close()
                raise
            self._retrievers[key] = retriever
            return retriever

    def forget_index(self, folder: Path) -> None:
        """Drop cached retrievers of `folder` after re-indexing it; the next call reopens the index.

        Not closed here: a retrieval running in another thread may still hold one (its connection
        closes when the last reference goes)."""
        with self._lock:
            for key in [key for key in self._retrievers if key[0] == folder]:
                del self._retrievers[key]

    def close(self, grace_s: float = 1.0) -> None:
        """Finish or cancel runs, then release the indexes."""
        self.jobs.shutdown(grace_s)
        with self._lock:
            for retriever in self._retrievers.values():
                retriever.index.close()
            self._retrievers.clear()

    # retrieve_images

    def retrieve(
        self,
        index: str,
        query: str | None,
        image: str | None,
        k: int,
        similarity_threshold: float | None,
        max_images: int,
    ) -> CallToolResult:
        """Search `index` by text or by an image; results as JSON, then thumbnails of the top ones."""
        if (query is None or not query.strip()) == (image is None):
            raise ImageloopError("pass exactly one of query (text) or image (a path)")
        folder = self.roots.resolve(index, "index", kind="dir")
        retriever = self.retriever(folder)
        if image is not None:
            image_path = self.readable.resolve(image, "image", kind="file")
            hits = retriever.search_image(image_path, k, similarity_threshold)
        else:
            hits = retriever.search(str(query), k, similarity_threshold)
        results = [
            Hit(rank=rank, id=hit.id, path=str(hit.path), caption=hit.caption, score=round(float(hit.score), 6))
            for rank, hit in enumerate(hits)
        ]
        shown = [(f"#{hit.rank} {hit.path}", hit.path) for hit in results[:max_images]]
        content, count = self._image_blocks(shown)
        output = Retrieval(index=str(folder), query=query, image=image, results=results, images_shown=count)
        return _result(output.model_dump(mode="json"), content)

    def _image_blocks(
        self, shown: Sequence[tuple[str, str]], budget: int = RESULT_IMAGE_BUDGET
    ) -> tuple[list[ContentBlock], int]:
        """A label and a downscaled PNG per (label, path); paths outside the roots are named, not read."""
        blocks: list[ContentBlock] = []
        count = 0
        each = image_budgets(len(shown), budget)
        for label, text in shown:
            path = Path(text).resolve()
            note = ""
            data: str | None = None
            if not self.readable.contains(path):
                note = " (outside the server's roots: not shown)"
            else:
                try:
                    data = encode_png_under(path, each)
                except (ImageloopError, OSError) as e:
                    note = f" (not shown: {e})"
                if data is None and not note:
                    note = " (not shown: too large for the result size cap)"
            blocks.append(TextContent(type="text", text=label + note))
            if data is not None:
                blocks.append(ImageContent(type="image", data=data, mimeType="image/png"))
                count += 1
        return blocks, count

    # Runs: index_images, generate_with_references, GenIR.

    def start_index(self, folder_text: str, batch_size: int) -> Job:
        """Index a folder in the background (new images only; the index lives in FOLDER/.imageloop)."""
        folder = self.roots.resolve(folder_text, "folder", kind="dir")
        embedder = make_embedder(self.settings)
        settings = self.settings

        def work(job: Job) -> dict[str, Any]:
            captioner: VLMCaptioner | None = None

            def caption(path: Path) -> str:
                nonlocal captioner
                job.check_cancelled()
                if captioner is None:
                    captioner = VLMCaptioner(make_vlm(settings, "captioner"))
                job.report(f"captioning {path.relative_to(folder).as_posix()}")
                return captioner(path)

            with self.gate.hold(("index", folder), job, "index of this folder"):
                job.report(f"indexing {folder}")
                summary = index_folder(folder, embedder, caption, batch_size=batch_size, progress=False)
            self.forget_index(folder)
            job.report(f"indexed {summary.indexed}, skipped {summary.skipped}, failed {summary.failed}")
            return {"folder": str(folder), **summary.to_json()}

        return self.jobs.submit("index", work)

    def start_generate(self, prompt: str, index: str, overrides: dict[str, Any]) -> Job:
        """Run ImageRAG in the background; its record and images go to RUNS/<run_id>/."""
        if not prompt.strip():
            raise ImageloopError("prompt: the prompt is empty")
        folder = self.roots.resolve(index, "index", kind="dir")
        settings = Settings.model_validate({**self.settings.model_dump(), **overrides})
        # Built (once per process) here, so a misconfigured role fails this call rather than the run.
        generator = make_generator(settings)
        make_vlm(settings)
        make_embedder(settings)

        def work(job: Job) -> dict[str, Any]:
            assert job.run_dir is not None

            def on_step(step: Step) -> None:
                job.report(f"[{step['node']}] {step['decision']}")
                job.check_cancelled()

            with self.gate.hold(("generator", id(generator)), job, "generator"):
                job.check_cancelled()
                return run_imagerag(prompt, settings, folder, job.run_dir, on_step=on_step)

        return self.jobs.submit("generate", work, run_root=self.runs_dir)

    # GenIR sessions: the library's search sessions (imageloop.search_session), kept in RUNS/sessions.sqlite
    # with their files in RUNS/search-<id>/; each round plays as a background run.

    def _session(self, session_id: str) -> SearchSession:
        """The session, refused if it is busy with a run or its index is no longer inside the roots."""
        session = load_search_session(session_id, self.sessions_db)
        self.roots.resolve(str(session.index), "index", kind="dir")
        with self._lock:
            self._refuse_busy(session_id)
        return session

    def _refuse_busy(self, session_id: str) -> None:
        busy = self._session_runs.get(session_id)
        running = self.jobs.get(busy) if busy else None
        if running is not None and not running.done.is_set():
            raise ServerBusyError(f"session {session_id} is busy with run {running.id}: poll get_run first")

    def _genir_job(
        self, session_id: str | None, feedback: FeedbackKind, play: Callable[[OnStep], dict[str, Any]]
    ) -> Job:
        """Run `play` (a library call reporting its steps) as a background run on the model it draws with."""

        def work(job: Job) -> dict[str, Any]:
            def on_step(step: Step) -> None:
                job.report(f"[{step['node']}] {step['decision']}")
                job.check_cancelled()

            key = "generator" if feedback in ("visual", "hybrid") else "vlm"
            model = make_generator(self.settings) if key == "generator" else make_vlm(self.settings)
            with self.gate.hold((key, id(model)), job, key):
                job.check_cancelled()
                return _genir_view(play(on_step))

        with self._lock:
            if session_id is not None:
                self._refuse_busy(session_id)
            job = self.jobs.submit("genir", work)
            if session_id is not None:
                self._session_runs[session_id] = job.id
            return job

    def start_genir(self, index: str, query: str, feedback: FeedbackKind, k: int, max_rounds: int) -> Job:
        """A new person-in-the-loop GenIR session, run up to its first question."""
        if not query.strip():
            raise ImageloopError("query: a search starts from a description of the image")
        folder = self.roots.resolve(index, "index", kind="dir")
        self.retriever(folder)  # refuses a missing, empty or mismatched index now, not in the run

        def start(on_step: OnStep) -> dict[str, Any]:
            return start_search(
                folder, self.settings, query=query, rounds=max_rounds, k=k, feedback=feedback,
                runs_dir=self.runs_dir, sessions_db=self.sessions_db, on_step=on_step,
            )  # fmt: skip

        return self._genir_job(None, feedback, start)

    def genir_show(self, session_id: str) -> dict[str, Any] | Job:
        """A session's current round; an interrupted session is continued in the background."""
        session = self._session(session_id)
        shown = show_search(session_id, self.settings, sessions_db=self.sessions_db)
        if shown["status"] == "incomplete":
            return self._genir_job(session_id, session.feedback, functools.partial(self._continue, session_id, None))
        return _genir_view(shown)

    def genir_feedback(self, session_id: str, feedback: str) -> Job:
        """Answer the session's pending question and run to the next one (or the end)."""
        if not feedback.strip():
            raise ImageloopError("feedback: describe what differs from the image you want, or 'found: <rank>'")
        session = self._session(session_id)
        shown = show_search(session_id, self.settings, sessions_db=self.sessions_db)
        if shown["status"] != "awaiting_feedback":
            raise ImageloopError(
                f"session {session_id} is {shown['status']} ({shown['stop_reason'] or 'no question pending'}); "
                "start another with genir_round"
            )
        return self._genir_job(session_id, session.feedback, functools.partial(self._continue, session_id, feedback))

    def _continue(self, session_id: str, answer: str | None, on_step: OnStep) -> dict[str, Any]:
        return continue_search(session_id, answer, self.settings, sessions_db=self.sessions_db, on_step=on_step)

    # get_run

    def run_view(self, run_id: str) -> RunView:
        """A run's state from memory, or from its folder on disk after a restart."""
        job = self.jobs.get(run_id)
        if job is not None:
            return self._view(job)
        run_dir = self.runs_dir / run_id
        status_path = run_dir / STATUS_FILE
        if not status_path.is_file():
            raise ImageloopError(f"no run {run_id!r} (runs are kept in {self.runs_dir})")
        status = json.loads(status_path.read_text(encoding="utf-8"))
        record = _read_record(run_dir)
        state: JobStatus = status["status"]
        error = status.get("error")
        if state not in FINISHED:
            state, error = "interrupted", "the server stopped before the run finished"
        return RunView(run_id=run_id, kind=status["kind"], status=state, progress=[], error=error, result=record)

    def _view(self, job: Job, last: int = 20) -> RunView:
        with job.lock:
            progress = job.progress[-last:]
        result = job.result
        if result is None and job.run_dir is not None and job.done.is_set():
            result = _read_record(job.run_dir)  # a failed or cancelled run still wrote its record
        poll = None if job.done.is_set() else f"call get_run with run_id={job.id!r} (and wait_seconds) for the result"
        return RunView(
            run_id=job.id,
            kind=job.kind,
            status=job.status,
            progress=progress,
            error=job.error,
            result=result,
            poll=poll,
        )

    def render_run(self, view: RunView) -> CallToolResult:
        """A run's view as a tool result: JSON text, plus the images a finished run produced."""
        shown: list[tuple[str, str]] = []
        result = view.result or {}
        if view.kind == "generate":
            for key in ("final_image", "draft_image"):
                if result.get(key):
                    shown.append((f"{key}: {result[key]}", result[key]))
        elif view.kind == "genir" and result.get("state") == "awaiting_feedback":
            if result.get("synthetic_image"):
                shown.append((f"synthetic image: {result['synthetic_image']}", result["synthetic_image"]))
            shown += [(f"#{hit['rank']} {hit['path']}", hit["path"]) for hit in result["retrieved"][:MAX_IMAGES]]
        content, _ = self._image_blocks(shown)
        return _result(view.model_dump(mode="json"), content, is_error=view.status == "error")


def _genir_view(session: dict[str, Any]) -> dict[str, Any]:
    """A library search session as genir_round/genir_feedback show it: ranked results, the ask naming the tool."""
    view = {
        "session_id": session["thread_id"],
        "rounds_played": session["rounds_played"],
        "found_id": session["found_id"],
        "stop_reason": session["stop_reason"],
        "state": session["status"],
        "query": session.get("query", session["last_query"]),
    }
    if session["status"] == "awaiting_feedback":
        view |= {
            "round": session["round"],
            "feedback_kind": session["feedback_kind"],
            "synthetic_image": session["synthetic_image"],
            "retrieved": [{"rank": rank, **hit} for rank, hit in enumerate(session["retrieved"])],
            "ask": session["ask"] + " (genir_feedback; 'found: <rank>' also works)",
        }
    return view


def _read_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return None
    record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return record


def _result(structured: dict[str, Any], images: list[ContentBlock], is_error: bool = False) -> CallToolResult:
    """JSON text first (for clients that ignore structured output), then labelled images."""
    text = TextContent(type="text", text=json.dumps(structured, ensure_ascii=False))
    return CallToolResult(content=[text, *images], structuredContent=structured, isError=is_error)


# The FastMCP server.


class _Server(FastMCP[Any]):
    """FastMCP with one-line errors: the field that failed validation, or the imageloop error as is."""

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Sequence[ContentBlock] | dict[str, Any]:
        tool = self._tool_manager.get_tool(name)
        if tool is not None:
            known = set(tool.parameters.get("properties", {}))
            unknown = sorted(set(arguments) - known)
            if unknown:
                raise ToolError(f"{name}: unknown argument {unknown[0]!r}; expected some of {', '.join(sorted(known))}")
        try:
            return await super().call_tool(name, arguments)
        except ToolError as e:
            cause = e.__cause__
            if isinstance(cause, ValidationError):
                raise ToolError(f"{name}: {_validation_message(cause)}") from None
            if isinstance(cause, ImageloopError):
                raise ToolError(f"{name}: {cause}") from None
            raise


def _validation_message(error: ValidationError) -> str:
    parts = []
    for detail in error.errors():
        where = ".".join(str(part) for part in detail["loc"]) or "arguments"
        parts.append(f"invalid {where}: {detail['msg']}")
    return "; ".join(parts)


WaitSeconds = Annotated[
    float,
    Field(
        ge=0,
        le=MAX_WAIT_S,
        description="how long this call waits for the run before returning its run_id to poll with get_run",
    ),
]
PathArg = Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS)]
RunId = Annotated[str, Field(pattern=RUN_ID, description="the run_id a previous call returned")]
SessionId = Annotated[str, Field(pattern=RUN_ID, description="the session_id genir_round returned")]
McpContext = Context[Any, Any, Any]


async def _follow(job: Job, wait_s: float, ctx: McpContext) -> None:
    """Wait up to `wait_s` for `job`, forwarding its progress (and a heartbeat) to the client."""
    deadline = anyio.current_time() + wait_s
    sent, last_sent = 0, anyio.current_time()
    delay = 0.002
    while True:
        total, messages = job.messages_since(sent)
        now = anyio.current_time()
        if not messages and now - last_sent >= HEARTBEAT_S:
            messages = [f"still {job.status}"]  # a heartbeat, for clients that extend timeouts on progress
        try:
            for offset, message in enumerate(messages, start=total - len(messages) + 1):
                await ctx.report_progress(max(offset, 1), None, message)
                last_sent = now
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the client went away: the run carries on, its result waits for get_run
        sent = total
        if job.done.is_set() or now >= deadline:
            return
        await anyio.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 2, 0.1)


def build_server(app: ImageloopMCP, security: TransportSecuritySettings | None = None) -> FastMCP[Any]:
    """The MCP server exposing `app`'s tools."""
    server = _Server(
        "imageloop",
        instructions=(
            "Retrieval over indexed image folders, retrieval-augmented generation (ImageRAG) and "
            "interactive generative retrieval (GenIR). Paths must lie inside the server's roots. Long "
            "calls return a run_id: poll get_run until status is done."
        ),
        log_level="WARNING",
        transport_security=security,
    )
    server._mcp_server.version = __version__

    async def run_result(job: Job, wait_seconds: float, ctx: McpContext) -> CallToolResult:
        await _follow(job, wait_seconds, ctx)
        return app.render_run(app._view(job))

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    async def retrieve_images(
        index: Annotated[str, Field(min_length=1, max_length=MAX_PATH_CHARS, description="an indexed image folder")],
        query: Annotated[
            str | None, Field(max_length=MAX_PROMPT_CHARS, description="text describing the images")
        ] = None,
        image: Annotated[
            str | None, Field(max_length=MAX_PATH_CHARS, description="or: a path of an image to find similar ones")
        ] = None,
        k: Annotated[int, Field(ge=1, le=MAX_K, description="how many results")] = 10,
        similarity_threshold: Annotated[float | None, Field(ge=-1.0, le=1.0, description="drop results below")] = None,
        max_images: Annotated[int, Field(ge=0, le=MAX_IMAGES, description="thumbnails for the top results")] = 10,
    ) -> CallToolResult:
        """Find images in an indexed folder by a text query or by an example image, best first.

        Returns JSON {index, query, image, results: [{rank, id, path, caption, score}], images_shown},
        then a label and a PNG thumbnail for each of the top max_images results."""
        # No declared outputSchema on this, the hot path: the 1.x SDK re-checks a declared schema
        # against the JSON Schema metaschema on every call, on both ends (~10 ms each); the shape is
        # the Retrieval model, stated above.
        return await anyio.to_thread.run_sync(
            functools.partial(app.retrieve, index, query, image, k, similarity_threshold, max_images)
        )

    @server.tool(annotations=ToolAnnotations(idempotentHint=True, openWorldHint=False))
    async def index_images(
        folder: PathArg,
        ctx: McpContext,
        batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH, description="images embedded per batch")] = 32,
        wait_seconds: WaitSeconds = DEFAULT_WAIT_S,
    ) -> Annotated[CallToolResult, RunView]:
        """Index (or update the index of) an image folder so retrieve_images and the loops can search it."""
        job = await anyio.to_thread.run_sync(app.start_index, folder, batch_size)
        return await run_result(job, wait_seconds, ctx)

    @server.tool(annotations=ToolAnnotations(openWorldHint=True))
    async def generate_with_references(
        prompt: Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)],
        index: PathArg,
        ctx: McpContext,
        # Knobs left null take the server's settings (its profile, IMAGELOOP_* variables, defaults).
        mode: Annotated[
            Literal["draft_first", "generation"] | None, Field(description="draft_first critiques a draft first")
        ] = None,
        max_iterations: Annotated[int | None, Field(ge=1, le=MAX_ITERATIONS, description="regenerations")] = None,
        top_k: Annotated[int | None, Field(ge=1, le=MAX_TOP_K, description="references per missing concept")] = None,
        similarity_threshold: Annotated[float | None, Field(ge=-1.0, le=1.0, description="drop refs below")] = None,
        seed: Annotated[int | None, Field(ge=0, le=2**32 - 1, description="generator seed")] = None,
        width: Annotated[int | None, Field(ge=MIN_SIDE, le=MAX_SIDE, description="pixels (height if omitted)")] = None,
        height: Annotated[int | None, Field(ge=MIN_SIDE, le=MAX_SIDE, description="pixels (width if omitted)")] = None,
        steps: Annotated[int | None, Field(ge=1, le=MAX_STEPS, description="denoising steps (diffusion)")] = None,
        wait_seconds: WaitSeconds = DEFAULT_WAIT_S,
    ) -> Annotated[CallToolResult, RunView]:
        """Generate an image for a prompt, retrieving reference images from an index for concepts the
        generator gets wrong (ImageRAG). Returns the final image and the run record, or a run_id to poll."""
        size = None
        if width is not None or height is not None:
            size = (width or height, height or width)
        overrides = {
            "mode": mode, "max_iterations": max_iterations, "top_k": top_k,
            "similarity_threshold": similarity_threshold, "seed": seed, "size": size, "steps": steps,
        }  # fmt: skip
        overrides = {key: value for key, value in overrides.items() if value is not None}
        job = await anyio.to_thread.run_sync(app.start_generate, prompt, index, overrides)
        return await run_result(job, wait_seconds, ctx)

    @server.tool(annotations=ToolAnnotations(openWorldHint=True))
    async def genir_round(
        ctx: McpContext,
        index: Annotated[str | None, Field(max_length=MAX_PATH_CHARS, description="folder to search (new)")] = None,
        query: Annotated[
            str | None, Field(max_length=MAX_PROMPT_CHARS, description="the image you have in mind (new)")
        ] = None,
        feedback: Annotated[FeedbackKind, Field(description="what each round shows")] = "visual",
        k: Annotated[int, Field(ge=1, le=MAX_K, description="results per round")] = 10,
        max_rounds: Annotated[int, Field(ge=1, le=MAX_ROUNDS)] = 5,
        session_id: Annotated[
            str | None, Field(pattern=RUN_ID, description="show (or continue) an existing session instead")
        ] = None,
        wait_seconds: WaitSeconds = DEFAULT_WAIT_S,
    ) -> Annotated[CallToolResult, RunView]:
        """Start a GenIR search for an image someone has in mind (index + query), or show a session's
        current round (session_id). Each round shows results; answer with genir_feedback."""
        if session_id is not None:
            shown = await anyio.to_thread.run_sync(app.genir_show, session_id)
            if isinstance(shown, Job):
                return await run_result(shown, wait_seconds, ctx)
            view = RunView(run_id=session_id, kind="genir", status="done", progress=[], result=shown)
            return app.render_run(view)
        if index is None or query is None:
            raise ImageloopError("a new session needs index and query (or pass session_id)")
        job = await anyio.to_thread.run_sync(app.start_genir, index, query, feedback, k, max_rounds)
        return await run_result(job, wait_seconds, ctx)

    @server.tool(annotations=ToolAnnotations(openWorldHint=True))
    async def genir_feedback(
        session_id: SessionId,
        feedback: Annotated[
            str,
            Field(min_length=1, max_length=MAX_PROMPT_CHARS, description="what differs, or 'found: <rank or id>'"),
        ],
        ctx: McpContext,
        wait_seconds: WaitSeconds = DEFAULT_WAIT_S,
    ) -> Annotated[CallToolResult, RunView]:
        """Answer a GenIR round: say what differs from the image you want (the query is refined and
        searched again), or 'found: <rank>' to finish."""
        job = await anyio.to_thread.run_sync(app.genir_feedback, session_id, feedback)
        return await run_result(job, wait_seconds, ctx)

    @server.tool(annotations=ToolAnnotations(readOnlyHint=True, openWorldHint=False))
    async def get_run(
        run_id: RunId,
        ctx: McpContext,
        wait_seconds: Annotated[float, Field(ge=0, le=MAX_WAIT_S, description="wait this long for it to finish")] = 0,
    ) -> Annotated[CallToolResult, RunView]:
        """A run's status, progress and, once finished, its result (record, images)."""
        job = app.jobs.get(run_id)
        if job is not None:
            return await run_result(job, wait_seconds, ctx)
        view = await anyio.to_thread.run_sync(app.run_view, run_id)
        return await anyio.to_thread.run_sync(app.render_run, view)

    return server


# Transports.


def parse_http(text: str) -> tuple[str, int]:
    """`HOST:PORT` (IPv6 as `[::1]:PORT`) for --http; a bare `PORT` or `:PORT` binds 127.0.0.1."""
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"--http {text!r}: expected HOST:PORT such as 127.0.0.1:8765")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps the server on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_pattern(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def transport_security(host: str, allow_hosts: Sequence[str] = ()) -> TransportSecuritySettings:
    """Host/Origin checks (the SDK's DNS-rebinding protection): loopback names, the bound host, and extras."""
    names = list(LOOPBACK_HOSTS)
    if not is_loopback(host):
        if host in ("0.0.0.0", "::"):
            names.append(socket.gethostname())
        else:
            names.append(_host_pattern(host))
    names += [_host_pattern(name) for name in allow_hosts]
    names = list(dict.fromkeys(names))
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True,
        allowed_hosts=[*names, *(f"{name}:*" for name in names)],
        allowed_origins=[f"{scheme}://{name}{port}" for name in names for scheme in SCHEMES for port in ("", ":*")],
    )


class BearerTokenMiddleware:
    """Refuses HTTP requests without `Authorization: Bearer <token>` (compared in constant time)."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                body = b'{"error": "missing or wrong bearer token"}'
                await send({
                    "type": "http.response.start",
                    "status": 401,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode()),
                        (b"www-authenticate", b'Bearer realm="imageloop"'),
                    ],
                })  # fmt: skip
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


async def _serve_stdio(server: FastMCP[Any], protocol_out: BinaryIO) -> None:
    stdout = anyio.wrap_file(io.TextIOWrapper(protocol_out, encoding="utf-8"))
    async with stdio_server(stdout=stdout) as (read_stream, write_stream):
        # FastMCP.run_stdio_async minus its choice of stdout: ours is a private copy of fd 1.
        lowlevel = server._mcp_server
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())


def _protect_stdout() -> BinaryIO:
    """A private handle on the real stdout for the protocol; fd 1 then points at stderr, so a stray
    print from any library (or C code) lands in the log instead of corrupting the JSON-RPC stream."""
    sys.stdout.flush()
    protocol = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    return protocol


async def _serve_http(server: FastMCP[Any], host: str, port: int, token: str | None) -> None:
    import uvicorn

    app: Any = server.streamable_http_app()
    if token:
        app = BearerTokenMiddleware(app, token)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)  # before the address is announced: early clients wait in the backlog, not refused
    bound_port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    print(f"imageloop mcp: serving http://{_host_pattern(host)}:{bound_port}/mcp", file=sys.stderr, flush=True)
    await uvicorn.Server(config).serve(sockets=[sock])


def serve(
    settings: Settings,
    roots: Sequence[Path],
    runs_dir: Path | None = None,
    *,
    http: str | None = None,
    token: str | None = None,
    allow_hosts: Sequence[str] = (),
) -> None:
    """Run the server until stdin closes (stdio) or it is interrupted (HTTP)."""
    if not roots and Path.cwd() == Path(Path.cwd().anchor):
        raise ConfigError("the current directory is the filesystem root: pass --root DIR for the folders to serve")
    allowed = Roots(roots or [Path.cwd()])
    security: TransportSecuritySettings | None = None
    address: tuple[str, int] | None = None
    if http is not None:
        address = parse_http(http)
        if not is_loopback(address[0]) and not token:
            raise ConfigError(
                f"--http {http} is reachable from other machines: "
                "set a bearer token with --token or IMAGELOOP_MCP_TOKEN"
            )
        if token is not None and len(token) < 16:
            raise ConfigError("the bearer token is too short: use at least 16 characters")
        security = transport_security(address[0], allow_hosts)
    app = ImageloopMCP(settings, allowed, runs_dir or allowed.folders[0] / ".imageloop-runs")
    server = build_server(app, security)
    try:
        if address is None:

            def terminate(signum: int, frame: FrameType | None) -> None:
                # A stdio client sends SIGTERM when the server outlives its shutdown grace: stop the
                # runs at their next step (records stay whole), then unwind like Ctrl-C.
                app.jobs.cancel_all()
                raise KeyboardInterrupt

            protocol = _protect_stdout()
            signal.signal(signal.SIGTERM, terminate)
            anyio.run(_serve_stdio, server, protocol)
        else:
            anyio.run(_serve_http, server, address[0], address[1], token)
    finally:
        # A stdio client allows ~2 s between closing stdin and SIGTERM: runs get one second to finish.
        app.close(grace_s=1.0)
