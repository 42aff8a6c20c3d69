"""Micro-batched embedding: many threads' embedding calls merged into one batched call.

An evaluation searching for many targets at once asks the embedder for one vector per round per
target; on a GPU one batch of 64 costs about what one item costs. `imageloop.batching.MicroBatcher`
merges the concurrent calls; each caller gets its own rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from PIL import Image

from imageloop.batching import MicroBatcher
from imageloop.protocols import Embedder, Vector


def _rows_per_request(embed: Callable[[list[Any]], Vector]) -> Callable[[list[list[Any]]], list[Vector]]:
    """One embedding call over every request's items, cut back into each request's rows."""

    def run(requests: list[list[Any]]) -> list[Vector]:
        vectors = embed([item for request in requests for item in request])
        ends = np.cumsum([len(request) for request in requests])
        return [np.asarray(vectors[end - len(request) : end]) for request, end in zip(requests, ends, strict=True)]

    return run


MAX_ITEMS = 64
"""Texts or images embedded in one call at most, unless `--max-batch` says otherwise."""


class BatchingEmbedder:
    """Wraps an embedder so concurrent callers share batched calls; same vectors, fewer calls."""

    def __init__(self, inner: Embedder, *, max_batch: int | None = None, max_wait_s: float = 0.005) -> None:
        max_batch = max_batch or MAX_ITEMS
        self.inner = inner
        self.model_id = inner.model_id
        self.embeds_images = inner.embeds_images
        self._texts: MicroBatcher[list[Any], Vector] = MicroBatcher(
            _rows_per_request(inner.embed_texts), max_batch=max_batch, max_wait_s=max_wait_s, size=len
        )
        self._images: MicroBatcher[list[Any], Vector] = MicroBatcher(
            _rows_per_request(inner.embed_images), max_batch=max_batch, max_wait_s=max_wait_s, size=len
        )

    @property
    def dim(self) -> int:
        """The wrapped embedder's width."""
        return self.inner.dim

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        """Embed `texts`, batched with whatever other threads are embedding right now."""
        return self._texts.submit(list(texts))

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        """Embed `images`, batched with whatever other threads are embedding right now."""
        return self._images.submit(list(images))
