"""Test-only entry point: `imageloop index ARGS...` with a slow fake embedder, so a test can kill it mid-run.

    python -m tests.slow_index FOLDER [--batch-size N] [--json]

`SLOW_EMBED_DELAY_S` (default 0.05) is how long each embedding call takes. The embedder is swapped in
where the CLI builds it, so everything else (parsing, batching, commits, Ctrl-C handling) is the real path.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence

from PIL import Image

import imageloop.backends
from imageloop.cli import main
from imageloop.config import Settings
from imageloop.protocols import Vector
from tests.fakes import FakeHashEmbedder


class SlowEmbedder(FakeHashEmbedder):
    """A `FakeHashEmbedder` whose every call takes `delay_s`, like a model on a busy device."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        self.delay_s = delay_s

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        time.sleep(self.delay_s)
        return super().embed_texts(texts)

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        time.sleep(self.delay_s)
        return super().embed_images(images)


def slow_embedder(settings: Settings, *, batched: bool = False) -> SlowEmbedder:
    """The slow embedder in place of the configured one (unbatched either way: indexing is one caller)."""
    return SlowEmbedder(float(os.environ.get("SLOW_EMBED_DELAY_S", "0.05")))


if __name__ == "__main__":
    # A terminal's Ctrl-C: restored because a child of a background job starts with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    imageloop.backends.make_embedder = slow_embedder
    sys.exit(main(["index", *sys.argv[1:]]))
