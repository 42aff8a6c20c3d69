"""The application layer: one object every face (CLI, MCP, LangChain tools, LangGraph Server, UI) calls.

It owns what the faces used to wire themselves, and so used to disagree on: settings → backends (built
once per process by `imageloop.backends`, micro-batched across the process's concurrent runs), root
confinement, indexes (opened once, cached, closed on `close`), the indexing rules (which store, when a
captioner is asked), runs and their folders, GenIR sessions (one store for every face), evaluations,
and the limits every argument is checked against (`imageloop.limits`). A face parses its protocol,
calls one method, and renders the answer.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from imageloop import limits
from imageloop.app.jobs import Followers, Job, JobKind, JobRegistry
from imageloop.app.paths import Kind, Roots, default_sessions_db, resolve_path
from imageloop.backends import make_embedder, make_generator, make_vlm
from imageloop.config import Role, Settings, load_settings
from imageloop.errors import ConfigError, ImageloopError, StorageError
from imageloop.files import os_error_message
from imageloop.knobs import Given
from imageloop.protocols import Embedder, ImageGenerator, RetrievedImage, VisionLanguageModel
from imageloop.tools.indexing.options import IndexOptions

if TYPE_CHECKING:
    from imageloop.app.cluster import RayGiven, Workers
    from imageloop.app.results import CIRResult, PastWork, RAGEView, RunState, SearchView
    from imageloop.graphs.steps import OnStep
    from imageloop.progress import OnProgress
    from imageloop.tools.indexing.image_index import ImageIndex, Route
    from imageloop.tools.indexing.indexer import Captioner, Embedded, IndexSummary, NewFile
    from imageloop.tools.indexing.retriever import Retriever, Where

TrainingProgress = Callable[[Any], None]
"""Hears each training step (`imageloop.training.progress`)."""

ROOTS_ENV = "IMAGELOOP_ROOTS"
RUNS_ENV = "IMAGELOOP_RUNS"
DEFAULT_RUNS = Path("runs")


class App:
    """Settings, roots and process-wide resources behind every face; `close()` releases them."""

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        roots: Sequence[Path] | None = None,
        runs_dir: Path | None = None,
        sessions_db: Path | None = None,
    ) -> None:
        """`roots` confine every path argument (None: unconfined, a person's own shell); runs go to `runs_dir`."""
        self.settings = settings if settings is not None else load_settings()
        self.roots = Roots(roots) if roots is not None else None
        self.runs_dir = Path(runs_dir or DEFAULT_RUNS).expanduser().resolve()
        self.sessions_db = Path(sessions_db).expanduser() if sessions_db else default_sessions_db()
        self._indexes: dict[Path, ImageIndex] = {}
        self._retrievers: dict[tuple[Path, str], Retriever] = {}
        # Handles replaced after their folder was indexed, which a search begun before may still hold: weakly,
        # so one nobody uses is freed (its connection and vectors with it) rather than kept until close().
        self._retired: weakref.WeakSet[ImageIndex] = weakref.WeakSet()
        self._lock = threading.RLock()
        self._jobs: JobRegistry | None = None
        self._workers: Workers | None = None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> App:
        """The application a server face runs: settings from `IMAGELOOP_*`, confined to `IMAGELOOP_ROOTS`.

        `IMAGELOOP_ROOTS` lists folders (os.pathsep-separated; default the working directory); runs and
        images go to `IMAGELOOP_RUNS` (default `runs/` under the first root).
        """
        environ = os.environ if environ is None else environ
        roots = [Path(p) for p in environ.get(ROOTS_ENV, "").split(os.pathsep) if p.strip()] or [Path.cwd()]
        runs = environ.get(RUNS_ENV)
        return cls(load_settings(environ=environ), roots=roots, runs_dir=Path(runs) if runs else roots[0] / "runs")

    @classmethod
    def serving(cls, settings: Settings, index: Path, roots: Sequence[Path] = (), **options: Any) -> App:
        """The application of a face that serves one index to a browser (the UI): confined to the index and `roots`."""
        return cls(settings, roots=[Path(index), *roots], **options)

    # Settings and backends.

    # Every backend the application hands out is its process-wide micro-batcher: calls made at the same
    # time by any run, job or evaluation target of this process are merged into batched model calls (one
    # diffusers pipeline call, one left-padded VLM generate, one embedding call), each caller getting the
    # answer its call gets alone. A lone call is a batch of one; remote models are called directly.

    def vlm(self, settings: Settings | None = None, role: Role = "vlm") -> VisionLanguageModel:
        """The configured VLM for `role` (critic and rewriter, or the captioner), micro-batched process-wide."""
        return make_vlm(settings or self.settings, role, batched=True)

    def generator(self, settings: Settings | None = None) -> ImageGenerator:
        """The configured image generator, micro-batched process-wide."""
        return make_generator(settings or self.settings, batched=True)

    def embedder(self, settings: Settings | None = None) -> Embedder:
        """The configured retrieval embedder, micro-batched process-wide."""
        return make_embedder(settings or self.settings, batched=True)

    # Paths.

    def path(self, text: str | Path, what: str, kind: Kind | None = None) -> Path:
        """A path argument resolved, and refused outside the roots when this application is confined.

        Run outputs (under `runs_dir`) may be passed back, e.g. a drawn image as an image query. `kind`:
        "file" or "dir" must exist as such, "out" is an output folder that may not exist yet.
        """
        return resolve_path(text, what, self.roots, extra=(self.runs_dir,), kind=kind)

    def file_path(self, text: str | Path, what: str) -> Path:
        """An existing file a graph input names (a CIR reference, a GenIR target), confined like any path
        argument: the `PathResolver` every graph this application builds or deploys is given."""
        return self.path(text, what, kind="file")

    def may_read(self, path: Path) -> bool:
        """Whether a face may show the file at `path` (inside the roots or the runs, when confined)."""
        resolved = path.resolve()
        return self.roots is None or self.roots.contains(resolved) or resolved.is_relative_to(self.runs_dir)

    # Indexes.

    def index(self, folder: str | Path) -> ImageIndex:
        """The index of `folder`, opened once and shared until `close()` (or a re-index) retires it."""
        from imageloop.tools.indexing.image_index import open_index

        root = self.path(folder, "index")  # open_index says what to do when there is no index there
        settings = self.settings
        with self._lock:
            if root not in self._indexes:
                self._indexes[root] = open_index(
                    root, weaviate_api_key=settings.weaviate_api_key,
                    request_timeout=settings.timeout_for("store"), max_retries=settings.max_retries,
                )  # fmt: skip
            return self._indexes[root]

    def retriever(self, folder: str | Path) -> Retriever:
        """A retriever over `folder`'s index with the configured embedder (refuses a mismatched or empty index)."""
        from imageloop.tools.indexing.retriever import Retriever

        index = self.index(folder)
        embedder = self.embedder()
        with self._lock:
            key = (index.root, embedder.model_id)
            if key not in self._retrievers:
                self._retrievers[key] = Retriever(index, embedder)
            return self._retrievers[key]

    def index_folder(
        self,
        folder: str | Path | Sequence[str | Path],
        *,
        options: Given = None,
        progress: bool = False,
        on_progress: Callable[[int, int], None] | None = None,
        ray: RayGiven = None,
    ) -> IndexSummary:
        """Add the new images of `folder` to its index (created in the configured store); prune vanished ones.

        `folder` may also be a parquet table of image paths and captions, or WebDataset shards (tar files,
        brace patterns such as `data/{00000..00099}.tar` expanded): the index goes to the folder holding
        them (`imageloop.tools.indexing.sources`).

        `options` are `IndexOptions` (a mapping or the model; unset: their defaults): the batch size, and
        how the embedded store builds its approximate search index (`ann`, recorded in the index; `threads`).
        `progress` draws a bar on stderr; `on_progress(done, total)` hears the files handled so far. With
        `ray`, the new images are read, captioned and embedded by that cluster's workers, a batch at a time,
        and written here (see `imageloop.app.cluster`). Captions follow `index_captioner`, wherever they are made.
        """
        from imageloop.app.cluster import ray_options, runner
        from imageloop.tools.indexing.image_index import route_of
        from imageloop.tools.indexing.indexer import index_folder
        from imageloop.tools.indexing.sources import Source, resolve_source

        given = [folder] if isinstance(folder, str | Path) else list(folder)
        if len(given) == 1 and Path(given[0]).suffix not in (".tar", ".parquet") and "{" not in str(given[0]):
            source = Source(self.path(given[0], "folder", kind="dir"), "folder")
        else:
            source = resolve_source([self.path(name, "source") for name in given])
        root = source.root
        resolved = IndexOptions().overridden(options)
        cluster = ray_options(ray, confined=self.roots is not None)
        remote = None
        if cluster is not None:
            in_flight = batches_in_flight(cluster.cpus_per_worker)
            embedder = self.embedder()
            new_files = IndexBatches(root, route_of(embedder), embedder.dim)
            remote = runner(self, new_files, concurrency=in_flight, ray=cluster)
        settings = self.settings
        try:
            return index_folder(
                source, self.embedder(), self.index_captioner() if remote is None else None,
                batch_size=resolved.batch_size, progress=progress,
                on_progress=on_progress, remote=remote,
                store=settings.store, weaviate_url=settings.weaviate_url,
                weaviate_api_key=settings.weaviate_api_key, weaviate_grpc_port=settings.weaviate_grpc_port,
                request_timeout=settings.timeout_for("store"), max_retries=settings.max_retries,
                ann=resolved.ann, threads=resolved.threads,
            )  # fmt: skip
        except OSError as e:  # the folder or the disk under the index: full, read-only, a file in the way
            raise StorageError(os_error_message(e, f"writing the index of {root}")) from e
        finally:
            self.retire_index(root)

    def index_captioner(self) -> Captioner | None:
        """The one captioning rule of indexing, wherever the images are read: the caption route (a text embedder)
        needs a caption per image (a sidecar `NAME.txt`, else the captioner VLM); the image route asks a VLM only
        when a captioner is configured explicitly, since captioning a whole folder costs a model call per image.
        """
        from imageloop.agents.captioner import VLMCaptioner

        if self.embedder().embeds_images and self.settings.captioner is None:
            return None
        captioner: VLMCaptioner | None = None
        captioner_lock = threading.Lock()

        def caption(path: Path) -> str:
            # Built on first use (a folder whose images all have sidecars needs no VLM), once, though the
            # indexer captions from several threads.
            nonlocal captioner
            with captioner_lock:
                if captioner is None:
                    captioner = VLMCaptioner(self.vlm(role="captioner"))
            return captioner(path)

        return caption

    def retire_index(self, folder: Path) -> None:
        """Drop `folder`'s cached index after it changed. A search may still use the old handle: it is closed when
        the last one lets it go (a server indexing every minute kept each one: RSS +27% in a 30-minute soak), or
        at `close()` if still held."""
        with self._lock:
            index = self._indexes.pop(folder, None)
            if index is not None:
                self._retired.add(index)
            for key in [key for key in self._retrievers if key[0] == folder]:
                del self._retrievers[key]

    def index_info(self, folder: str | Path) -> dict[str, Any]:
        """What an index holds and what built it: `{count, embedder, dim, store, route, root, ann}` (+ url, collection).

        The store is checked first, so a damaged index is reported as damaged, never by a stale count.
        """
        index = self.index(folder)
        index.check()
        info = {"count": index.count(), "embedder": index.embedder_id, "dim": index.dim, **index.location.to_json()}
        return {**info, "route": index.route, "root": str(index.root), "ann": index.search_engine()}

    def retrieve(
        self,
        index: str | Path,
        *,
        query: str | None = None,
        image: str | Path | None = None,
        k: int | None = None,
        similarity_threshold: float | None = None,
        where: Where | None = None,
    ) -> list[RetrievedImage]:
        """The best matches in `index` for a text query or an example image (exactly one), best first."""
        if (query is None) == (image is None):
            raise ConfigError("give exactly one of a text query or an image")
        k = int(k if k is not None else limits.default("k") or 10)
        limits.check("k", k)
        limits.check("similarity_threshold", similarity_threshold)
        retriever = self.retriever(index)
        if image is not None:
            return retriever.search_image(self.path(image, "image", kind="file"), k, similarity_threshold, where)
        return retriever.search(limits.check_text("query", str(query)), k, similarity_threshold, where)

    # Loops: ImageRAG runs, GenIR and RAGE sessions, evaluations (each in its own module of this package). Each
    # takes the knobs a run asks for (the loop's model in `imageloop.knobs`, or a mapping of them; unset: the
    # settings') and answers a typed result or the run's record.

    def generate(
        self,
        prompt: str | None,
        index: str | Path | None,
        *,
        knobs: Given = None,
        out_dir: str | Path | None = None,
        where: Where | None = None,
        resume: bool = False,
        on_step: OnStep | None = None,
        on_progress: OnProgress | None = None,
    ) -> dict[str, Any]:
        """Run ImageRAG and write its run directory, hearing Ctrl-C and SIGTERM at once; returns its record. See
        `imageloop.app.runs.run_in_terminal` and `run_imagerag`."""
        from imageloop.app.runs import run_in_terminal

        return run_in_terminal(
            self, prompt, index, knobs=knobs, out_dir=out_dir, where=where, resume=resume, on_step=on_step,
            on_progress=on_progress,
        )  # fmt: skip

    def start_generate(self, prompt: str, index: str | Path, knobs: Given = None) -> Job:
        """ImageRAG as a background run (poll it with `run_state`); see `imageloop.app.runs.start_generate`."""
        from imageloop.app.runs import start_generate

        return start_generate(self, prompt, index, knobs)

    def run_state(self, run_id: str) -> RunState:
        """A background run's state, live or from its folder."""
        from imageloop.app.jobs import job_state, stored_state

        job = self.jobs.get(run_id)
        return job_state(job) if job is not None else stored_state(self.runs_dir, run_id)

    def read_run(self, run: str) -> dict[str, Any]:
        """A run's record, by id (under the runs folder) or folder."""
        from imageloop.app.runs import read_run

        return read_run(self, run)

    def run_file(self, relative: str) -> tuple[Path, str]:
        """A file a run wrote, by its path under the runs folder, and its media type; see `app.runs.run_file`."""
        from imageloop.app.runs import run_file

        return run_file(self, relative)

    def history(self, limit: int = 50) -> list[PastWork]:
        """The runs and sessions any face left in the runs folder, newest first; see `imageloop.app.history`."""
        from imageloop.app.history import past_work

        return past_work(self, limit)

    def stop_run(self, run_id: str, reason: str) -> bool:
        """Ask a background run to stop at its next step boundary (recorded as cancelled, `reason` its error);
        False when no such run is going."""
        job = self.jobs.get(run_id)
        if job is None or job.done.is_set():
            return False
        job.stop(reason)
        return True

    def run_relative(self, path: str | Path) -> str | None:
        """How a remote client names a run output: its path under the runs folder (None if elsewhere)."""
        from imageloop.app.runs import run_relative

        return run_relative(self, path)

    def start_search(
        self,
        index: str | Path,
        query: str,
        *,
        knobs: Given = None,
        out_dir: str | Path | None = None,
        on_step: OnStep | None = None,
        on_progress: OnProgress | None = None,
    ) -> SearchView:
        """Start a GenIR search and play its first round; see `imageloop.app.search.start_search`."""
        from imageloop.app.search import start_search

        return start_search(self, index, query, knobs=knobs, out_dir=out_dir, on_step=on_step, on_progress=on_progress)

    def continue_search(
        self,
        session_id: str,
        answer: str | None,
        *,
        knobs: Given = None,
        on_step: OnStep | None = None,
        on_progress: OnProgress | None = None,
    ) -> SearchView:
        """Answer a search's round and play the next; see `imageloop.app.search.continue_search`."""
        from imageloop.app.search import continue_search

        return continue_search(self, session_id, answer, knobs=knobs, on_step=on_step, on_progress=on_progress)

    def show_search(self, session_id: str, *, knobs: Given = None) -> SearchView:
        """A search as it stands; see `imageloop.app.search.show_search`."""
        from imageloop.app.search import show_search

        return show_search(self, session_id, knobs=knobs)

    def start_rage(
        self,
        prompt: str,
        index: str | Path,
        *,
        knobs: Given = None,
        where: Where | None = None,
        out_dir: str | Path | None = None,
        on_step: OnStep | None = None,
        on_progress: OnProgress | None = None,
    ) -> RAGEView:
        """Start a RAGE session: retrieve candidates to pick from; see `imageloop.app.rage.start_rage`."""
        from imageloop.app.rage import start_rage

        return start_rage(
            self, prompt, index, knobs=knobs, where=where, out_dir=out_dir, on_step=on_step, on_progress=on_progress
        )

    def continue_rage(
        self,
        session_id: str,
        answer: Any,
        *,
        knobs: Given = None,
        on_step: OnStep | None = None,
        on_progress: OnProgress | None = None,
    ) -> RAGEView:
        """Answer a RAGE session's picks or review and play on; see `imageloop.app.rage.continue_rage`."""
        from imageloop.app.rage import continue_rage

        return continue_rage(self, session_id, answer, knobs=knobs, on_step=on_step, on_progress=on_progress)

    def check_rage_answer(self, session_id: str, answer: Any) -> dict[str, Any]:
        """Refuse a RAGE answer that its pending question cannot take; see `imageloop.app.rage.check_rage_answer`."""
        from imageloop.app.rage import check_rage_answer

        return check_rage_answer(self, session_id, answer)

    def show_rage(self, session_id: str) -> RAGEView:
        """A RAGE session as it stands; see `imageloop.app.rage.show_rage`."""
        from imageloop.app.rage import show_rage

        return show_rage(self, session_id)

    def eval_genir(
        self,
        index: str | Path,
        targets: str | Path | None,
        out_dir: str | Path,
        *,
        benchmark: str | None = None,
        images: str | Path | None = None,
        annotations: str | Path | None = None,
        sample: int | None = None,
        knobs: Given = None,
        concurrency: int = 1,
        ray: RayGiven = None,
        on_target: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """Simulated-user GenIR evaluation, here or on a Ray cluster; see `imageloop.app.evals.run_genir_eval`."""
        from imageloop.app.evals import run_genir_eval

        return run_genir_eval(
            self, index, targets, out_dir, benchmark=benchmark, images=images, annotations=annotations,
            sample=sample, knobs=knobs, concurrency=concurrency, ray=ray, on_target=on_target,
        )  # fmt: skip

    # Composed image retrieval and DAIG (`app/cir.py`, `app/triplets.py`, `app/training.py`).

    def compose_retrieve(
        self,
        index: str | Path,
        reference: str | Path,
        change: str,
        *,
        knobs: Given = None,
        on_step: OnStep | None = None,
        on_progress: OnProgress | None = None,
    ) -> CIRResult:
        """The images of `index` that show `reference` changed as `change` says; see `imageloop.app.cir`."""
        from imageloop.app.cir import compose_retrieve

        return compose_retrieve(self, index, reference, change, knobs=knobs, on_step=on_step, on_progress=on_progress)

    def eval_cir(
        self,
        index: str | Path,
        annotations: str | Path,
        fmt: str,
        out_dir: str | Path,
        *,
        split: str | None = None,
        images: str | Path | None = None,
        knobs: Given = None,
        concurrency: int = 1,
        ray: RayGiven = None,
        on_query: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """CIRR or FashionIQ through the CIR graph, here or on a Ray cluster; see `imageloop.app.cir.run_cir_eval`."""
        from imageloop.app.cir import run_cir_eval

        return run_cir_eval(
            self, index, annotations, fmt, out_dir, split=split, images=images, knobs=knobs,
            concurrency=concurrency, ray=ray, on_query=on_query,
        )  # fmt: skip

    def synthesize_triplets(
        self,
        objects: str | Path,
        edits: Sequence[str] | str,
        n: int,
        out_dir: str | Path,
        *,
        examples: str | Path | None = None,
        lora: str | Path | None = None,
        knobs: Given = None,
        ray: RayGiven = None,
        on_step: OnStep | None = None,
    ) -> dict[str, Any]:
        """DAIG's triplet synthesis into a dataset folder, here or on Ray; see `imageloop.app.triplets`."""
        from imageloop.app.triplets import synthesize_triplets

        return synthesize_triplets(
            self, objects, edits, n, out_dir, examples=examples, lora=lora, knobs=knobs, ray=ray, on_step=on_step
        )

    def train_cir(
        self,
        triplets: str | Path,
        out_dir: str | Path,
        *,
        real: str | Path | None = None,
        images: str | Path | None = None,
        options: Given = None,
        progress: TrainingProgress | None = None,
    ) -> dict[str, Any]:
        """Train a composed-query model (DRSP, then FRA); `options` are `CIRTrainingOptions`; see `app.training`."""
        from imageloop.app.training import train_cir

        return train_cir(self, triplets, out_dir, real=real, images=images, options=options, progress=progress)

    def cir_data(
        self,
        annotations: str | Path,
        fmt: str,
        out: str | Path,
        *,
        images: str | Path | None = None,
        shots: int | None = None,
        fraction: float | None = None,
        seed: int = 0,
    ) -> dict[str, Any]:
        """A benchmark's train split as real triplets (K-shot, fraction or all); see `app.training.real_triplets`."""
        from imageloop.app.training import real_triplets

        return real_triplets(self, annotations, fmt, out, images=images, shots=shots, fraction=fraction, seed=seed)

    def train_cir_lora(
        self,
        triplets: str | Path,
        out_dir: str | Path,
        *,
        images: str | Path | None = None,
        options: Given = None,
        progress: TrainingProgress | None = None,
    ) -> dict[str, Any]:
        """Train a CIR-LoRA on FLUX; `options` are `CIRLoRAOptions`; see `imageloop.app.training`."""
        from imageloop.app.training import train_cir_lora

        return train_cir_lora(self, triplets, out_dir, images=images, options=options, progress=progress)

    def rescore_genir(
        self, out_dir: str | Path, index: str | Path | None = None, *, ray: RayGiven = None
    ) -> dict[str, Any]:
        """Re-score a GenIR evaluation's saved queries by text alone; see `imageloop.app.evals.rescore_genir_text`."""
        from imageloop.app.evals import rescore_genir_text

        return rescore_genir_text(self, out_dir, index, ray=ray)

    def eval_imagerag(
        self,
        prompts: str | Path,
        index: str | Path,
        out_dir: str | Path,
        *,
        real_images: str | Path | None = None,
        metrics: str | Sequence[str] | None = None,
        knobs: Given = None,
        concurrency: int = 1,
        ray: RayGiven = None,
        on_prompt: Callable[[int, int], None] | None = None,
    ) -> dict[str, Any]:
        """ImageRAG evaluation, draft vs final, here or on Ray; see `imageloop.app.evals.run_imagerag_eval`."""
        from imageloop.app.evals import run_imagerag_eval

        return run_imagerag_eval(
            self, prompts, index, out_dir, real_images=real_images, metrics=metrics, knobs=knobs,
            concurrency=concurrency, ray=ray, on_prompt=on_prompt,
        )  # fmt: skip

    @property
    def workers(self) -> Workers:
        """The Ray workers this application's jobs run on (`ray`): kept with their models for the next job, as the
        backends are, and ended by `close()`; see `imageloop.app.cluster`."""
        from imageloop.app.cluster import Workers

        with self._lock:
            if self._workers is None:
                self._workers = Workers()
            return self._workers

    # Background runs.

    def in_background(self, kind: JobKind, play: Callable[[Followers], BaseModel], session: str | None = None) -> Job:
        """Play a loop call as a background run (`jobs`): `play` gets the callbacks that report each step and stop
        the run at a step boundary when asked; the run's result is its answer as JSON. A `session` is played by one
        run at a time."""
        from imageloop.app.jobs import report_to

        def work(job: Job) -> dict[str, Any]:
            return play(report_to(job)).model_dump(mode="json")

        return self.jobs.submit(kind, work, session=session)

    @property
    def jobs(self) -> JobRegistry:
        """The background runs of agent-facing faces (created on first use)."""
        with self._lock:
            if self._jobs is None:
                self._jobs = JobRegistry()
            return self._jobs

    def close(self, grace_s: float = 1.0) -> int:
        """Finish (or cancel at a step boundary) background runs, end its Ray workers, close every index it opened.

        Returns how many runs were still inside a step: recorded as interrupted, their threads running on.
        """
        stuck = self._jobs.shutdown(grace_s) if self._jobs is not None else 0
        if self._workers is not None:
            self._workers.end()
        with self._lock:
            for index in [*self._indexes.values(), *self._retired]:
                index.close()
            self._indexes.clear()
            self._retired.clear()
            self._retrievers.clear()
        return stuck

    def open_indexes(self) -> int:
        """How many index handles are open (the face contract checks `close` leaves none)."""
        with self._lock:
            return len(self._indexes) + len(self._retired)


def batches_in_flight(cpus_per_worker: float) -> int:
    """Batches of new images a Ray worker reads and embeds at once: one per CPU it holds (decoding is CPU work),
    two at least (one read while one is embedded)."""
    return max(2, int(cpus_per_worker))


@dataclass(frozen=True)
class IndexBatches:
    """Indexing's per-batch work as a Ray cluster's worker binds it: new files under `root`, read, captioned (the
    one captioning rule) and embedded with the worker's models for an index of that `route` and `dim`. Workers
    never open the index: the driver alone reads and writes it, whatever its store."""

    root: Path
    route: Route
    dim: int

    def bind(self, app: App) -> Callable[[list[NewFile]], Embedded]:
        """`embed_new_files` with the worker's embedder and captioner."""
        from imageloop.tools.indexing.indexer import embed_new_files

        return partial(embed_new_files, self.root, self.route, self.dim, app.embedder(), app.index_captioner())


def parse_where(items: Sequence[str]) -> dict[str, Any] | None:
    """`KEY=VALUE` filters (repeatable; a repeated key accepts any of its values), e.g. `folder=birds`."""
    where: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ImageloopError(f"`where` {item!r}: expected KEY=VALUE, e.g. folder=birds")
        key = key.strip()
        if key in where:
            previous = where[key]
            where[key] = [*(previous if isinstance(previous, list) else [previous]), value]
        else:
            where[key] = value
    return where or None
