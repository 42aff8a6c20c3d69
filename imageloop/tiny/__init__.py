"""Tiny random models for offline smoke tests: real architectures, random weights, noise pictures.

Each builder makes a model from a fixed seed and saves it with `save_pretrained` (or open_clip's
config + safetensors) into a cache directory; backends then load it through exactly the code path a
real checkpoint takes. Building is deterministic, so an index made with `tiny:clip` in one process is
queryable with `tiny:clip` in another. Their outputs mean nothing, and the `tiny` profile says so.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

TINY_SEED = 1234
NOISE_NOTICE = "imageloop: the tiny profile uses random tiny models: its pictures and captions are noise"
_build_lock = threading.Lock()


@contextmanager
def seeded() -> Iterator[None]:
    """Torch draws from `TINY_SEED` inside, without disturbing the caller's random state."""
    import torch

    # Weights are made on the CPU: seed (and restore) its generator only, never the GPUs'.
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(TINY_SEED)
        yield


def tiny_cache_root() -> Path:
    """`$IMAGELOOP_TINY_CACHE`, else `~/.cache/imageloop/tiny`."""
    configured = os.environ.get("IMAGELOOP_TINY_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "imageloop" / "tiny"


def tiny_model_dir(name: str, build: Callable[[Path], None]) -> Path:
    """The directory of tiny model `name`, built once by `build(tmp_dir)` then renamed into place.

    Once, across threads and processes (test workers, servers sharing a cache): a file lock is held while
    one builds, and a finished model is never removed, since another process may be loading it.
    """
    from filelock import FileLock

    target = tiny_cache_root() / name
    if (target / ".complete").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock, FileLock(target.parent / f".{name}.lock"):
        if (target / ".complete").exists():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
        try:
            build(tmp)
            (tmp / ".complete").write_text("ok\n")
            if target.exists():  # a build killed half-way: nobody can be loading from it
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


_noticed = False


def print_noise_notice() -> None:
    """Say once per process, on stderr, that tiny models draw noise."""
    global _noticed
    if not _noticed:
        _noticed = True
        print(NOISE_NOTICE, file=sys.stderr, flush=True)
