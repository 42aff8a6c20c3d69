"""Micro-batched generation: concurrent `generate` calls drawn together in one pipeline call.

An evaluation drawing for many targets at once runs one pipeline call per batch of compatible
requests (same size, steps and references, as the backend's `batch_key` says) instead of one per
request; each picture comes from its own seed. Batches are bounded by `max_batch` and by the
backend's memory estimate; one that runs out of memory is split in halves and retried. Generators
that cannot batch (remote APIs) are called directly.
"""

from __future__ import annotations

from imageloop.batching import MicroBatcher, device_batcher
from imageloop.protocols import BatchImageGenerator, GenerationRequest, GenerationResult, ImageGenerator

MAX_PICTURES = 8
"""Pictures drawn in one pipeline call at most, unless `--max-batch` says otherwise (or memory says fewer)."""


class BatchingGenerator:
    """Wraps an image generator so concurrent callers share pipeline calls; the same pictures, fewer calls."""

    def __init__(self, inner: ImageGenerator, *, max_batch: int | None = None, max_wait_s: float = 0.005) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.max_references = inner.max_references
        self._batcher: MicroBatcher[GenerationRequest, GenerationResult] | None = None
        if isinstance(inner, BatchImageGenerator):
            self._batcher = device_batcher(
                inner.generate_batch,
                key=inner.batch_key,
                capacity=inner.batch_capacity,
                max_batch=max_batch or MAX_PICTURES,
                max_wait_s=max_wait_s,
            )

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Draw `request`, in one pipeline call with whatever compatible requests other threads make now."""
        if self._batcher is None:
            return self.inner.generate(request)
        return self._batcher.submit(request)
