"""Micro-batching: concurrent callers share calls and each gets its own result (embeddings, then the mechanism)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from imageloop.batching import MicroBatcher
from imageloop.errors import OutOfMemoryError
from imageloop.runtime import BatchMemory, is_out_of_memory
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


# --- the shared mechanism, over a recording fake -------------------------------------------------------


class RecordingRun:
    """A batched function that doubles numbers, records each call's requests and runs out of memory above a size."""

    def __init__(self, fits: int = 1000) -> None:
        self.calls: list[list[int]] = []
        self.fits = fits
        self.lock = threading.Lock()

    def __call__(self, requests: list[int]) -> list[int]:
        with self.lock:
            self.calls.append(list(requests))
        if len(requests) > self.fits:
            raise OutOfMemoryError("out of GPU memory while doubling: use fewer")
        time.sleep(0.01)
        return [2 * r for r in requests]


def submit_all(batcher: MicroBatcher[int, int], requests: list[int], device: threading.Lock | None = None) -> list[int]:
    """Submit every request from its own thread; with `device` held meanwhile, all of them queue for one batch."""
    with ThreadPoolExecutor(len(requests)) as pool:
        if device is None:
            return list(pool.map(batcher.submit, requests))
        with device:
            futures = [pool.submit(batcher.submit, r) for r in requests]
            time.sleep(0.1)
        return [f.result() for f in futures]


def test_only_requests_of_one_kind_share_a_call() -> None:
    run = RecordingRun()
    batcher = MicroBatcher(run, max_wait_s=0.05, key=lambda r: r % 2)
    assert submit_all(batcher, list(range(8))) == [2 * r for r in range(8)]
    assert all(len({r % 2 for r in call}) == 1 for call in run.calls)
    assert len(run.calls) < 8


def test_a_call_holds_at_most_max_batch_and_the_backends_capacity_for_its_kind() -> None:
    run = RecordingRun()
    capacities = {0: 3, 1: None}
    batcher = MicroBatcher(run, max_batch=4, max_wait_s=0.05, key=lambda r: r % 2, capacity=capacities.get)
    submit_all(batcher, list(range(16)))
    assert max(len(call) for call in run.calls if call[0] % 2 == 0) <= 3
    assert max(len(call) for call in run.calls if call[0] % 2 == 1) <= 4


def test_an_out_of_memory_call_splits_in_halves_until_each_part_fits() -> None:
    run, device = RecordingRun(fits=2), threading.Lock()
    batcher = MicroBatcher(run, max_batch=8, max_wait_s=0.001, splits_on=is_out_of_memory, gate=device)
    assert submit_all(batcher, list(range(8)), device) == [2 * r for r in range(8)]
    assert [len(call) for call in run.calls] == [8, 4, 2, 2, 4, 2, 2]


def test_a_single_request_out_of_memory_reaches_its_caller() -> None:
    batcher = MicroBatcher(RecordingRun(fits=0), splits_on=is_out_of_memory)
    with pytest.raises(OutOfMemoryError, match="use fewer"):
        batcher.submit(1)


def test_errors_other_than_out_of_memory_fail_the_whole_call_without_retrying() -> None:
    def broken(requests: list[int]) -> list[int]:
        raise RuntimeError("model crashed")

    batcher = MicroBatcher(broken, max_wait_s=0.05, splits_on=is_out_of_memory)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(batcher.submit, r) for r in range(4)]
        for future in futures:
            with pytest.raises(RuntimeError, match="model crashed"):
                future.result()


def test_a_failure_outside_any_call_still_answers_every_caller() -> None:
    def no_estimate(kind: object) -> int | None:
        raise RuntimeError("CUDA driver gone")

    batcher = MicroBatcher(RecordingRun(), max_wait_s=0.01, capacity=no_estimate)
    with pytest.raises(RuntimeError, match="CUDA driver gone"):
        batcher.submit(1)


def test_requests_queued_while_another_model_holds_the_device_join_one_batch() -> None:
    run, device = RecordingRun(), threading.Lock()
    batcher = MicroBatcher(run, max_wait_s=0.001, gate=device)
    assert submit_all(batcher, list(range(6)), device) == [2 * r for r in range(6)]
    assert len(run.calls) == 1 and sorted(run.calls[0]) == list(range(6))


# --- the memory estimate, over a faked CUDA allocator ------------------------------------------------------


class FakeAllocator:
    """torch.cuda's memory counters for one device, set by the test (in MiB)."""

    def __init__(self, free: int, allocated: int) -> None:
        self.free, self.allocated, self.reserved, self.peak = free, allocated, allocated, allocated

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import torch

        mib = 2**20
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (self.free * mib, 80 * 1024 * mib))
        monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: self.allocated * mib)
        monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: self.reserved * mib)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak * mib)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device=None: None)


def test_the_memory_estimate_fits_a_batch_to_free_memory_and_learns_from_running_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    allocator = FakeAllocator(free=1000, allocated=5000)
    allocator.install(monkeypatch)
    memory = BatchMemory("cuda", headroom=0.8)
    assert memory.capacity("1024px") is None  # nothing measured yet: only max_batch bounds the first batch
    with memory.measure("1024px", 4):
        allocator.peak = 5000 + 400  # four requests took 400 MiB at peak: 100 each
    assert memory.capacity("1024px") == 8  # 1000 MiB free * 0.8 / 100
    allocator.reserved = 5200  # the allocator kept 200 MiB cached that no tensor uses: free for the next batch
    assert memory.capacity("1024px") == 9
    with pytest.raises(OutOfMemoryError), memory.measure("1024px", 6):
        raise OutOfMemoryError("out of GPU memory while generating")
    assert memory.capacity("1024px") == 5  # a batch of 6 did not fit, whatever the estimate says
    assert memory.capacity("512px") is None  # kinds are learned apart


def test_off_cuda_there_is_no_memory_estimate() -> None:
    memory = BatchMemory("cpu")
    with memory.measure("any", 8):
        pass
    assert memory.capacity("any") is None
