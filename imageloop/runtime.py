"""Where local models run, and the process-wide cache that loads each of them once.

Device and dtype are chosen lazily (torch is imported only when a local backend is built): CUDA
with fp16 (bf16 where supported), Apple MPS with fp16, else CPU with fp32; both can be overridden.
Every local backend loads through `load_cached`, keyed by what it loads and where, so repeated
iterations, runs and server sessions in one process share one copy. GPU work is serialised through
`device_lock`, because LangGraph runs sync nodes in a thread pool and two pipelines on one GPU at
once only thrash memory.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, TypeVar

from imageloop.errors import ConfigError, ImageloopError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")

_cache: dict[Hashable, Any] = {}
_cache_lock = threading.Lock()
_key_locks: dict[Hashable, threading.Lock] = {}
device_lock = threading.RLock()
"""Held around every forward pass of a local model."""

DTYPES = ("float32", "float16", "bfloat16")


def pick_device(requested: str | None = None) -> str:
    """`requested` if given (validated), else cuda, then mps, then cpu."""
    import torch

    if requested:
        if requested.startswith("cuda") and not torch.cuda.is_available():
            raise ConfigError(f"--device {requested}: CUDA is not available in this torch build or machine")
        if requested == "mps" and not torch.backends.mps.is_available():
            raise ConfigError("--device mps: Apple MPS is not available on this machine")
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
            raise ConfigError(f"--dtype {requested!r}: expected one of {', '.join(DTYPES)}")
        return getattr(torch, requested)  # type: ignore[no-any-return]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device == "mps":
        return torch.float16
    return torch.float32


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
        value = load()
        with _cache_lock:
            _cache[key] = value
        return value


def cached_keys() -> list[Hashable]:
    """What is loaded now (for tests and diagnostics)."""
    with _cache_lock:
        return list(_cache)


def clear_cache() -> None:
    """Forget every loaded model (tests; freeing memory between unrelated jobs)."""
    with _cache_lock:
        _cache.clear()
        _key_locks.clear()


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


# Steps cost time, not memory; a 16-bit dtype halves float32's weights and activations.
DIFFUSION_MEMORY_KNOBS = "lower --size, use --dtype bfloat16 or float16 (not float32), or CPU offload (--offload)"


def explain_out_of_memory(what: str, knobs: str = DIFFUSION_MEMORY_KNOBS) -> ImageloopError:
    """The one-line message for a CUDA/MPS out-of-memory error, naming the knobs that help `what`."""
    return ImageloopError(f"out of GPU memory while {what}: {knobs}")
