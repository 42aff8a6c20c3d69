"""Micro-batching: many threads' embedding calls merged into one batched call.

An evaluation searching for many targets at once asks the embedder for one vector per round per
target; on a GPU one batch of 64 costs about what one item costs. The first caller to arrive becomes
the batch's leader: it waits up to `max_wait_s` (or until `max_batch` items are queued) and for the
previous batch to finish, then embeds everything queued in one call and hands each caller its rows.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np
from PIL import Image

from imageloop.protocols import Embedder, Vector


class _Batcher:
    """Collects (items, future) requests for one embedding function and runs them in batches."""

    def __init__(self, embed: Callable[[list[Any]], Vector], max_batch: int, max_wait_s: float) -> None:
        self.embed = embed
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.lock = threading.Lock()
        self.full = threading.Condition(self.lock)
        self.queue: list[tuple[list[Any], Future[Vector]]] = []
        self.leader_waiting = False
        self.flushing = threading.Lock()

    def submit(self, items: Sequence[Any]) -> Vector:
        future: Future[Vector] = Future()
        with self.lock:
            self.queue.append((list(items), future))
            if self.leader_waiting:
                if sum(len(i) for i, _ in self.queue) >= self.max_batch:
                    self.full.notify()
                lead = False
            else:
                self.leader_waiting = lead = True
        if lead:
            self._lead()
        return future.result()

    def _lead(self) -> None:
        with self.lock:
            self.full.wait_for(lambda: sum(len(i) for i, _ in self.queue) >= self.max_batch, self.max_wait_s)
        # The batch is collected only once the previous one has left the device: whatever arrived while
        # it was embedding joins this batch, instead of queuing behind it in batches of one.
        with self.flushing:
            with self.lock:
                batch, self.queue = self.queue, []
                self.leader_waiting = False
            self._embed(batch)

    def _embed(self, batch: list[tuple[list[Any], Future[Vector]]]) -> None:
        items = [item for request, _ in batch for item in request]
        try:
            vectors = self.embed(items)
        except BaseException as e:
            for _, future in batch:
                future.set_exception(e)
            return
        start = 0
        for request, future in batch:
            future.set_result(np.asarray(vectors[start : start + len(request)]))
            start += len(request)


class BatchingEmbedder:
    """Wraps an embedder so concurrent callers share batched calls; same vectors, fewer calls."""

    def __init__(self, inner: Embedder, *, max_batch: int = 64, max_wait_s: float = 0.005) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.embeds_images = inner.embeds_images
        self._texts = _Batcher(lambda items: inner.embed_texts(items), max_batch, max_wait_s)
        self._images = _Batcher(lambda items: inner.embed_images(items), max_batch, max_wait_s)

    @property
    def dim(self) -> int:
        """The wrapped embedder's width."""
        return self.inner.dim

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        """Embed `texts`, batched with whatever other threads are embedding right now."""
        return self._texts.submit(texts)

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        """Embed `images`, batched with whatever other threads are embedding right now."""
        return self._images.submit(images)
