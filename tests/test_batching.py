"""Micro-batched embedding: concurrent callers share calls and each gets its own rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from imageloop.tools.embedders.batching import BatchingEmbedder
from tests.fakes import FakeHashEmbedder


class CountingEmbedder(FakeHashEmbedder):
    """FakeHashEmbedder that counts calls and can be made to fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0
        self.fail = False
        self.lock = threading.Lock()

    def embed_texts(self, texts):  # type: ignore[no-untyped-def]
        with self.lock:
            self.calls += 1
        if self.fail:
            raise RuntimeError("endpoint down")
        return super().embed_texts(texts)


def test_concurrent_callers_share_calls_and_get_their_own_rows() -> None:
    inner = CountingEmbedder()
    batching = BatchingEmbedder(inner, max_batch=64, max_wait_s=0.05)
    texts = [[f"text {i}", f"other {i}"] for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(batching.embed_texts, texts))
    for request, vectors in zip(texts, results, strict=True):
        np.testing.assert_allclose(vectors, FakeHashEmbedder().embed_texts(request), rtol=1e-6)
    assert inner.calls < 8  # 32 requests, merged into a few batches


def test_a_failed_batch_fails_every_caller_in_it() -> None:
    inner = CountingEmbedder()
    inner.fail = True
    batching = BatchingEmbedder(inner, max_wait_s=0.01)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batching.embed_texts, ["x"]) for _ in range(4)]
        for future in futures:
            with pytest.raises(RuntimeError, match="endpoint down"):
                future.result()


def test_a_lone_caller_is_served_after_the_wait() -> None:
    batching = BatchingEmbedder(CountingEmbedder(), max_wait_s=0.001)
    assert batching.embed_texts(["alone"]).shape == (1, 64)
    assert batching.dim == 64 and batching.model_id == "fake:hash"


def test_requests_arriving_during_a_slow_batch_join_the_next_one() -> None:
    class SlowEmbedder(CountingEmbedder):
        def embed_texts(self, texts):  # type: ignore[no-untyped-def]
            time.sleep(0.05)  # a device busy for a while: callers keep arriving meanwhile
            return super().embed_texts(texts)

    inner = SlowEmbedder()
    batching = BatchingEmbedder(inner, max_batch=64, max_wait_s=0.001)

    def staggered(i: int) -> np.ndarray:
        time.sleep(0.002 * i)  # arrivals spread over ~60 ms, longer than one batch takes
        return batching.embed_texts([f"text {i}"])

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(staggered, range(32)))
    assert all(r.shape == (1, 64) for r in results)
    assert inner.calls <= 4  # not one call per straggler
