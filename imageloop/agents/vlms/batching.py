"""Micro-batched VLM turns: concurrent `chat` calls answered in one batched `generate`.

An evaluation running many simulated users or critics at once asks the VLM one turn per target per
round; a local model answers a batch of them in about the time of one. Calls whose `batch_key`
agrees share a pass; each answer is the answer the call gets alone (greedy or seeded sampling). A
batch that runs out of memory is split in halves and retried. Remote and LangChain models, which
cannot batch here, are called directly: an OpenAI-compatible server batches concurrent requests
itself (vLLM does), bounded per endpoint by `max_concurrent_requests`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from imageloop.batching import MicroBatcher, device_batcher
from imageloop.protocols import GREEDY, BatchVisionLanguageModel, ChatCall, Decoding, Message, VisionLanguageModel

MAX_TURNS = 16
"""Turns answered in one pass at most, unless `--max-batch` says otherwise."""


class BatchingVisionLanguageModel:
    """Wraps a VLM so concurrent callers share batched passes; the same answers, fewer passes."""

    def __init__(self, inner: VisionLanguageModel, *, max_batch: int | None = None, max_wait_s: float = 0.005) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self._batcher: MicroBatcher[ChatCall, str] | None = None
        if isinstance(inner, BatchVisionLanguageModel):
            self._batcher = device_batcher(
                inner.chat_batch, key=inner.batch_key, max_batch=max_batch or MAX_TURNS, max_wait_s=max_wait_s
            )

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        """Answer `messages`, in one pass with whatever compatible calls other threads make now."""
        if self._batcher is None:
            return self.inner.chat(messages, json_schema, decoding)
        return self._batcher.submit(ChatCall(messages, json_schema, decoding))
