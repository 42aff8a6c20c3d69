"""Where local models run, and the process-wide cache that loads each of them once.

Device and dtype are chosen lazily (torch is imported only when a local backend is built): CUDA
with fp16 (bf16 where supported), Apple MPS with fp16, else CPU with fp32; both can be overridden.
Every local backend loads through `load_cached`, keyed by what it loads and where, so repeated
iterations, runs and server sessions in one process share one copy. GPU work is serialised through
`device_lock`, because LangGraph runs sync nodes in a thread pool and two pipelines on one GPU at
once only thrash memory; concurrent callers share the device by batching instead
(`imageloop.batching`), and `BatchMemory` says how large a batch still fits.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import TYPE_CHECKING, Any, TypeVar

from imageloop.errors import ConfigError, ImageloopError, OutOfMemoryError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

_cache: dict[Hashable, Any] = {}
_cache_lock = threading.Lock()
_key_locks: dict[Hashable, threading.Lock] = {}
_diffusers_lock = threading.Lock()


class DeviceLock:
    """A re-entrant lock held around every forward pass of a local model, counting how long it was held.

    The held time is the device's busy time: a benchmark divides it by wall time to see how much of a
    run the device spent in model calls.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._depth = 0  # changed only by the thread holding the lock
        self._since = 0.0
        self._busy_s = 0.0

    def __enter__(self) -> DeviceLock:
        self._lock.acquire()
        self._depth += 1
        if self._depth == 1:
            self._since = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._busy_s += time.perf_counter() - self._since
        self._lock.release()

    def busy_s(self) -> float:
        """Seconds the lock has been held so far, the current hold included."""
        ongoing = time.perf_counter() - self._since if self._depth else 0.0
        return self._busy_s + ongoing


device_lock = DeviceLock()
"""Held around every forward pass of a local model."""

DTYPES = ("float32", "float16", "bfloat16")


def pick_device(requested: str | None = None) -> str:
    """`requested` if given (validated), else cuda, then mps, then cpu."""
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"`device` {requested}: CUDA is not available in this torch build or machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("`device` mps: Apple MPS is not available on this machine")
        return requested
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def pick_dtype(device: str, requested: str | None = None) -> torch.dtype:
    """`requested` if given, else bf16 on CUDA that supports it, fp16 on other GPUs, fp32 on CPU."""
    import torch

    if requested:
        if requested not in DTYPES:
            raise ConfigError(f"`dtype` {requested!r}: expected one of {', '.join(DTYPES)}")
        return getattr(torch, requested)  # type: ignore[no-any-return]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


_loading_bars = True
LOADING_LIBRARIES = ("transformers", "diffusers")
"""Libraries that draw a bar while loading a checkpoint (`Loading weights`, `Loading pipeline components`)."""


def hide_loading_bars() -> None:
    """Draw no bar while models load or download from now on (the CLI's `--quiet`)."""
    global _loading_bars
    _loading_bars = False
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"


def _silence_loading_bars() -> None:
    """Turn off the loading libraries' own bars; each is imported only if installed (a model is loading anyway)."""
    import importlib
    import importlib.util

    for library in LOADING_LIBRARIES:
        if importlib.util.find_spec(library) is not None:
            importlib.import_module(f"{library}.utils.logging").disable_progress_bar()


def load_cached(key: Hashable, load: Callable[[], T]) -> T:
    """Return the object cached under `key`, loading it once even when threads race for it."""
    with _cache_lock:
        if key in _cache:
            return _cache[key]  # type: ignore[no-any-return]
        key_lock = _key_locks.setdefault(key, threading.Lock())
    with key_lock:
        with _cache_lock:
            if key in _cache:
                return _cache[key]  # type: ignore[no-any-return]
        if not _loading_bars:
            _silence_loading_bars()
        value = load()
        with _cache_lock:
            _cache[key] = value
        return value


def diffusers_class(name: str) -> Any:
    """diffusers' class (or function) `name`, or None where this diffusers has none by that name.

    diffusers resolves its names lazily, and threads asking for names at once can see its modules half
    imported ("module 'diffusers' has no attribute 'OmniGenPipeline'", e.g. four server runs loading their
    generator at once): every lookup goes through here, one thread at a time.
    """
    with _diffusers_lock:
        import diffusers

        return getattr(diffusers, name, None)


def cached_keys() -> list[Hashable]:
    """What is loaded now (for tests and diagnostics)."""
    with _cache_lock:
        return list(_cache)


def clear_cache() -> None:
    """Forget every loaded model (tests; freeing memory between unrelated jobs)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()


MALLOC_ARENAS = 2
"""glibc malloc arenas a long-running server keeps (see `limit_malloc_arenas`)."""


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> None:
    """Cap glibc's malloc arenas, as `MALLOC_ARENA_MAX` would, in a process that serves for hours.

    Every run starts threads (LangGraph's executor, the jobs' pool, batch leaders); glibc gives threads
    up to eight arenas a core, and the freed memory of large allocations (pictures, tensors) stays
    fragmented across them: 100 concurrent runs in one process grew RSS 12% with no Python object kept,
    and stayed flat with two arenas. Only arenas made after the call are capped, so a server calls it
    before its first thread. A `MALLOC_ARENA_MAX` the user set wins; elsewhere than glibc this does nothing.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(_M_ARENA_MAX, arenas)
    except (OSError, AttributeError):  # not glibc (musl has no mallopt arenas)
        return


_M_ARENA_MAX = -8  # glibc's malloc.h


def hub_offline() -> bool:
    """Whether the Hugging Face hub must not be contacted (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(
        os.environ.get(v, "").lower() in {"1", "true", "yes"} for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def explain_load_failure(model: str, error: Exception) -> ImageloopError:
    """Turn a failed `from_pretrained`/weights lookup into a one-line error that says how to get the model."""
    if os.path.isdir(model) or os.path.isfile(model):
        return ConfigError(f"cannot load {model}: {str(error).splitlines()[0][:300]}")
    how = (
        "HF_HUB_OFFLINE is set, so nothing is downloaded: fetch it on a connected machine with "
        f"`hf download {model}` (or pass a local directory) and copy the cache over"
        if hub_offline()
        else "check the id, your network, and `hf auth login` for gated models, or pass a local directory"
    )
    return ConfigError(f"model {model!r} is not available: {how}")


def is_out_of_memory(error: BaseException) -> bool:
    """Whether `error` is a device out-of-memory error (torch's own, or a backend's RuntimeError saying so)."""
    if isinstance(error, OutOfMemoryError):
        return True
    import torch

    return isinstance(error, torch.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error).lower()
    )


class BatchMemory:
    """How many requests of one kind fit on a CUDA device at once, learned from the batches that ran.

    Each measured batch records the device memory one request of its kind added at peak (the batch's
    peak over what was allocated before, divided by its size); the capacity is what is free now, with
    a margin, over that. A batch that ran out of memory caps its kind below its size. Nothing is
    estimated off CUDA (CPU memory is not the limit there) or before a kind's first batch.
    """

    def __init__(self, device: str, headroom: float = 0.85) -> None:
        self.device = device
        self.headroom = headroom
        self.per_request: dict[Hashable, float] = {}
        self.ceiling: dict[Hashable, int] = {}

    def capacity(self, kind: Hashable) -> int | None:
        """At most this many requests of `kind` in one batch now; None when nothing is known."""
        if not self.device.startswith("cuda"):
            return None
        import torch

        limits = [self.ceiling[kind]] if kind in self.ceiling else []
        if self.per_request.get(kind):
            free, _ = torch.cuda.mem_get_info(self.device)
            # Memory the caching allocator holds but no tensor uses is free for the next batch too.
            cached = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
            limits.append(int((free + cached) * self.headroom / self.per_request[kind]))
        return max(1, min(limits)) if limits else None

    @contextmanager
    def measure(self, kind: Hashable, size: int) -> Iterator[None]:
        """Run one batch of `size` requests of `kind`, learning its memory per request (or its ceiling)."""
        if not self.device.startswith("cuda"):
            yield
            return
        import torch

        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        try:
            yield
        except BaseException as e:
            if is_out_of_memory(e):
                self.ceiling[kind] = min(self.ceiling.get(kind, size), max(1, size - 1))
            raise
        peak = torch.cuda.max_memory_allocated(self.device) - before
        self.per_request[kind] = max(self.per_request.get(kind, 0.0), peak / size)


# Steps cost time, not memory; a 16-bit dtype halves float32's weights and activations.
DIFFUSION_MEMORY_KNOBS = "lower `size`, set `dtype` bfloat16 or float16 (not float32), or CPU offload (`offload`)"


def explain_out_of_memory(what: str, knobs: str = DIFFUSION_MEMORY_KNOBS) -> OutOfMemoryError:
    """The one-line error for a CUDA/MPS out-of-memory error, naming the knobs that help `what`."""
    return OutOfMemoryError(f"out of GPU memory while {what}: {knobs}")


@contextmanager
def translated_out_of_memory(what: str, knobs: str = DIFFUSION_MEMORY_KNOBS) -> Iterator[None]:
    """Turn a CUDA/MPS out-of-memory error inside the block into the one-line error naming the knobs."""
    try:
        yield
    except RuntimeError as e:
        if not is_out_of_memory(e):
            raise
        import torch

        # Free what the failed step cached, so a smaller batch or request can still run in this process.
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise explain_out_of_memory(what, knobs) from e
