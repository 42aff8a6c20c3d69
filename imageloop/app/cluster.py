"""Beyond one machine: a job's items run on the workers of a Ray cluster (`pip install 'imageloop[ray]'`).

A job (an evaluation's targets, prompts or queries, DAIG's triplet slots, batches of new images to index)
is described by a `Work`: a small picklable value that says what each item needs and, bound to a
process's `App` (`Work.bind`), gives the one function that does an item. In this process `runner` runs
that function in threads, `concurrency` at a time. With `ray`, every worker is a Ray actor holding one
`App` (its models loaded once, its micro-batchers merging the calls of the items it runs at once, again
`concurrency` of them) and Ray's `ActorPool` hands out the items. Either way each result comes back to
this process, which alone writes the journal or the index, so every resume rule holds with or without
the cluster: a re-run, here or on any cluster, skips what is done. An application keeps its workers, and
their models, for its next job (`App.workers`), as it keeps its backends; `App.close` ends them.

Faults are Ray's to handle, never retried here: a worker that dies is restarted by Ray (on any node with
room, up to `RESTARTS` times) and its item run again there; the result is journaled once. When workers
cannot come back (the cluster is gone), the job stops with one line saying how to run it again.

Workers read the job's inputs and write its pictures (a GenIR drawing, an ImageRAG run folder) at the
paths this process gave them, so on more than one machine those folders must be on a filesystem every
node mounts. Each worker sees the environment of the node it runs on and this process's settings and roots
(a confined application's workers are confined alike).
Ray is imported only here, and only when a job asks for it: `import imageloop` never imports it.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sized
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeVar

from pydantic import ValidationError

from imageloop.config import Settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.eval import Run, in_threads
from imageloop.knobs import RayOptions, one_line

if TYPE_CHECKING:
    from imageloop.app.core import App

T = TypeVar("T")
R = TypeVar("R")
T_contra = TypeVar("T_contra", contravariant=True)
R_co = TypeVar("R_co", covariant=True)

RESTARTS = 3
"""How often Ray restarts a worker that died (running its item again each time) before the job gives up."""
INSTALL = "pip install 'imageloop[ray]'"


RayGiven: TypeAlias = RayOptions | str | Mapping[str, Any] | None
"""Where a job runs as asked: the options, a cluster's address alone, or a mapping of the options; None: here."""


def ray_options(given: RayGiven, *, confined: bool = False) -> RayOptions | None:
    """The options asked for, checked; None when the job runs in this process (no `ray`).

    A confined application (a server whose agents pass the arguments) runs only on its own cluster:
    `local`, or `auto` (the RAY_ADDRESS of the environment it was started in), never an address an agent names.
    """
    asked = asked_options(given)
    if asked.get("ray") is None:
        if asked:
            raise ConfigError(f"`{sorted(asked)[0]}` goes with `ray`: local, auto or ray://HOST:PORT")
        return None
    try:
        options = RayOptions.model_validate(asked)
    except ValidationError as e:
        if e.errors()[0]["type"] == "string_pattern_mismatch":
            raise ConfigError(f"`ray` {asked['ray']!r}: expected local, auto or ray://HOST:PORT") from None
        raise one_line(e, "option") from None
    if confined and options.ray not in ("local", "auto"):
        raise ConfigError(f"`ray` {options.ray}: this server runs jobs on its own cluster only (local or auto)")
    return options


def asked_options(given: RayGiven) -> dict[str, Any]:
    """The Ray options `given` sets, by name; empty when it asks for none."""
    if isinstance(given, RayOptions):
        return given.model_dump(exclude_unset=True)
    if isinstance(given, str):
        return {"ray": given}
    return {name: value for name, value in (given or {}).items() if value is not None}


class Work(Protocol[T_contra, R_co]):
    """A job's per-item work, picklable: what each item needs, bound once per process to its application."""

    def bind(self, app: App) -> Callable[[T_contra], R_co]:
        """The function that does one item, with `app`'s models (built once, micro-batched)."""
        ...


def runner(app: App, work: Work[T, R], *, concurrency: int = 1, ray: RayOptions | None = None) -> Run[T, R]:
    """How a job's items run: `concurrency` at a time in this process, or with `ray` on that cluster's workers,
    `concurrency` at a time on each. Here the work is bound now; a cluster is connected to now."""
    if ray is None:
        return in_threads(work.bind(app), concurrency)
    shape = worker_shape(ray, connect(ray))
    return partial(_on_cluster, ray, shape, app, work, concurrency)


_connecting = threading.Lock()


def connect(options: RayOptions) -> dict[str, float]:
    """Join (or start) the cluster `options` name, once per process, and say what it holds (CPU, GPU, ...).

    A process already on Ray (a program that called `ray.init` itself) stays on its cluster.
    """
    try:
        import ray
    except ImportError:
        raise ConfigError(f"`ray` needs Ray: {INSTALL}") from None
    with _connecting:
        if not ray.is_initialized():
            try:
                ray.init(address=options.ray)
            except (ConnectionError, TimeoutError, SystemExit) as e:  # SystemExit: Ray gave up on an unreachable GCS
                raise ImageloopError(
                    f"no Ray cluster at `ray` {options.ray} ({_first_line(e)}): start one (ray start --head) and "
                    f"set RAY_ADDRESS, or use local"
                ) from None
    resources = ray.cluster_resources()  # type: ignore[no-untyped-call]  # unannotated in ray
    return {name: float(amount) for name, amount in resources.items()}


def worker_shape(options: RayOptions, resources: Mapping[str, float]) -> tuple[int, float, float]:
    """How many workers, and the GPUs and CPUs each holds, on a cluster with these total `resources`.

    Unset: one GPU a worker on a cluster with GPUs, else none; one worker per GPU-worth, else per CPU-worth.
    A demand past what the cluster has would leave workers waiting forever: refused.
    """
    gpus_total, cpus_total = float(resources.get("GPU", 0.0)), float(resources.get("CPU", 0.0))
    gpus = options.gpus_per_worker if options.gpus_per_worker is not None else (1.0 if gpus_total else 0.0)
    cpus = options.cpus_per_worker
    count = options.workers or max(1, int(gpus_total // gpus) if gpus else int(cpus_total // cpus))
    for what, each, total in (("GPU", gpus, gpus_total), ("CPU", cpus, cpus_total)):
        if count * each > total + 1e-9:
            raise ConfigError(
                f"{count} workers of {each:g} {what} each need {count * each:g} {what}s; the Ray cluster has "
                f"{total:g}: ask for fewer `workers` or less per worker"
            )
    return count, gpus, cpus


BOUND_JOBS = 4
"""Jobs whose bound work a worker keeps (an application may run a few at once on the same workers)."""


class ImageloopWorker:
    """One Ray actor: an `App` (its models loaded once, in this worker) and the work of each job bound to it once."""

    def __init__(self, settings: Settings, runs_dir: Path, roots: tuple[Path, ...] | None) -> None:
        """The driver resolved and confined the job's paths; the worker's application has the driver's `roots`
        too, so what the job's graphs resolve themselves (a GenIR target, a CIR reference) is confined alike."""
        from imageloop.app.core import App

        # Ray forwards a worker's output to the driver: all of it to stderr, since the driver's stdout carries
        # its answer (`--json`, an MCP server's stdio protocol).
        os.dup2(2, 1)
        self._app = App(settings, roots=roots, runs_dir=runs_dir)
        self._bound: OrderedDict[str, Callable[[Any], Any]] = OrderedDict()
        self._binding = threading.Lock()

    def run(self, job: list[Any], item: Any) -> Any:
        """Do one item of the job whose `Work` is `job`'s one object reference (fetched and bound on its first item,
        once, though items arrive `concurrency` at a time)."""
        import ray

        (work,) = job
        with self._binding:
            bound = self._bound.get(work.hex())
            if bound is None:
                bound = self._bound[work.hex()] = ray.get(work).bind(self._app)
                while len(self._bound) > BOUND_JOBS:
                    self._bound.popitem(last=False)
        return bound(item)


class Workers:
    """An application's Ray workers: started on a job's first use, grown when a job needs more, kept with their
    models for its next job of the same kind (settings, roots, resources each, `concurrency`), replaced by a job of
    another kind, ended by `end` (`App.close`)."""

    def __init__(self) -> None:
        self._kind: tuple[Any, ...] | None = None
        self._handles: list[Any] = []
        self._lock = threading.Lock()

    def take(self, count: int, gpus: float, cpus: float, concurrency: int, app: App) -> list[Any]:
        """`count` workers for a job of `app`'s: those kept, and new ones (with its settings, runs folder and
        roots; Ray restarts one that dies and runs its item again)."""
        import ray

        settings, runs_dir = app.settings, app.runs_dir
        roots = app.roots.folders if app.roots is not None else None
        kind = (gpus, cpus, concurrency, settings.model_dump_json(), str(runs_dir), roots)
        with self._lock:
            if kind != self._kind:
                self._end()
                self._kind = kind
            remote: Any = ray.remote(ImageloopWorker).options(
                num_cpus=cpus, num_gpus=gpus, max_concurrency=concurrency, max_restarts=RESTARTS,
                max_task_retries=RESTARTS,
            )  # fmt: skip
            self._handles += [remote.remote(settings, runs_dir, roots) for _ in range(count - len(self._handles))]
            return self._handles[:count]

    def end(self) -> None:
        """End every worker (they free their CPUs, GPUs and models); a later job starts new ones."""
        with self._lock:
            self._end()

    def _end(self) -> None:
        if not self._handles:
            return
        import ray

        for worker in self._handles:
            with contextlib.suppress(ray.exceptions.RayError, ConnectionError):  # one gone already needs nothing
                ray.kill(worker)
        self._handles, self._kind = [], None


def _on_cluster(
    options: RayOptions,
    shape: tuple[int, float, float],
    app: App,
    work: Work[T, R],
    concurrency: int,
    items: Iterable[T],
) -> Iterator[R]:
    """The items through an `ActorPool` of the application's workers, handed out as they come (a list, or a walk
    still going on), each result yielded as it arrives."""
    import ray
    from ray.util.actor_pool import ActorPool

    count, gpus, cpus = shape
    if isinstance(items, Sized):
        count = min(count, -(-len(items) // concurrency))  # a worker with nothing to do would only load models
    job: list[Any] = []
    pool: Any = None  # an ActorPool, made with the first item
    try:
        for item in items:
            if pool is None:  # the first item starts (or wakes) the workers: a job with none needs none
                workers = app.workers.take(count, gpus, cpus, concurrency, app)
                job.append(ray.put(work))  # sent once; each worker fetches it with its first item of this job
                # Each worker is in the pool once per item it may run at once: `concurrency` going on each.
                pool = ActorPool([worker for worker in workers for _ in range(concurrency)])
            pool.submit(lambda worker, value: worker.run.remote(job, value), item)
            yield from _arrived(pool)
        while pool is not None and pool.has_next():
            yield pool.get_next_unordered()
    except ray.exceptions.RayTaskError as e:
        # The item's own error (an ImageloopError, a backend's failure): raised as this process would raise it.
        raise (e.cause if isinstance(e.cause, Exception) else e) from None
    except ray.exceptions.RayError as e:
        app.workers.end()
        raise ImageloopError(
            f"the Ray cluster ({options.ray}) lost its workers ({_first_line(e)}); what finished is kept: run the "
            f"same command again, with `ray` or without it to run here"
        ) from None


def _arrived(pool: Any) -> Iterator[Any]:
    """The results in already, without waiting for the others (the next items are still being handed out)."""
    while pool.has_next():
        try:
            result = pool.get_next_unordered(timeout=0)
        except TimeoutError:
            return
        yield result


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
