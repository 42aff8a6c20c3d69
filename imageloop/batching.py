"""Micro-batching: concurrent callers' requests merged into batched calls of one function.

An evaluation running many targets at once asks its models for one thing per target per round; on a
GPU one batch of eight costs about what one item costs. The first caller to arrive becomes the
batch's leader: it waits up to `max_wait_s` (or until `max_batch` units of one kind are queued) and
for the previous batch to leave the device, then takes everything queued and runs it, one call per
group of compatible requests (same `key`), each call at most as large as `max_batch` and the
backend's `capacity` for that kind allow. Every caller gets its own result, or the exception of the
call its request was in. A call that fails with an error `splits_on` accepts (out of memory) is
split in halves and each half retried, down to single requests, whose failure is then the caller's.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Generic, TypeVar

from imageloop.runtime import device_lock, is_out_of_memory

RequestT = TypeVar("RequestT")
ResultT = TypeVar("ResultT")

_Pending = tuple[RequestT, Future[ResultT], Hashable, int]


def _same_kind(request: object) -> Hashable:
    return None


def _one_unit(request: object) -> int:
    return 1


def _no_capacity_limit(key: Hashable) -> int | None:
    return None


def _never(error: BaseException) -> bool:
    return False


class MicroBatcher(Generic[RequestT, ResultT]):
    """Runs `run(requests) -> results` (one result per request, in order) over batches of concurrent requests.

    `key(request)`: requests with equal keys may share a call. `size(request)`: the units a request
    counts for against `max_batch` (an embedding request of 5 texts counts 5). `capacity(key)`: at
    most this many units of that kind per call right now (a memory estimate; None: no limit). `gate`:
    held while a batch is collected and run, e.g. the device lock, so requests queued while another
    model had the device join the next batch instead of waiting behind it in batches of one.
    """

    def __init__(
        self,
        run: Callable[[list[RequestT]], Sequence[ResultT]],
        *,
        max_batch: int = 64,
        max_wait_s: float = 0.005,
        key: Callable[[RequestT], Hashable] = _same_kind,
        size: Callable[[RequestT], int] = _one_unit,
        capacity: Callable[[Hashable], int | None] = _no_capacity_limit,
        splits_on: Callable[[BaseException], bool] = _never,
        gate: AbstractContextManager[Any] | None = None,
    ) -> None:
        self.run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.key = key
        self.size = size
        self.capacity = capacity
        self.splits_on = splits_on
        self.gate = gate
        self.lock = threading.Lock()
        self.full = threading.Condition(self.lock)
        self.queue: list[_Pending[RequestT, ResultT]] = []
        self.queued_units: dict[Hashable, int] = {}
        self.leader_waiting = False
        self.flushing = threading.Lock()

    def submit(self, request: RequestT) -> ResultT:
        """Run `request` in a batch with whatever compatible requests other threads submit meanwhile."""
        future: Future[ResultT] = Future()
        key, units = self.key(request), self.size(request)
        with self.lock:
            self.queue.append((request, future, key, units))
            self.queued_units[key] = self.queued_units.get(key, 0) + units
            if self.leader_waiting:
                if self.queued_units[key] >= self.max_batch:
                    self.full.notify()
                lead = False
            else:
                self.leader_waiting = lead = True
        if lead:
            self._lead()
        return future.result()

    def _lead(self) -> None:
        with self.lock:
            self.full.wait_for(lambda: max(self.queued_units.values()) >= self.max_batch, self.max_wait_s)
        # The batch is collected only once the previous one has left the device: whatever arrived while
        # it ran joins this batch, instead of queuing behind it in batches of one.
        with self.flushing, self.gate or nullcontext():
            with self.lock:
                pending, self.queue = self.queue, []
                self.queued_units = {}
                self.leader_waiting = False
            try:
                self._run_groups(pending)
            except BaseException as e:
                # A failure outside any call (a capacity estimate, say) must not leave callers waiting forever.
                for _, future, *_ in pending:
                    if not future.done():
                        future.set_exception(e)

    def _run_groups(self, pending: list[_Pending[RequestT, ResultT]]) -> None:
        groups: dict[Hashable, list[_Pending[RequestT, ResultT]]] = {}
        for item in pending:
            groups.setdefault(item[2], []).append(item)
        for key, group in groups.items():
            while group:
                # Asked before each call: an out-of-memory split teaches the backend a lower capacity.
                capacity = self.capacity(key)
                limit = self.max_batch if capacity is None else max(1, min(self.max_batch, capacity))
                taken, units = 1, group[0][3]
                while taken < len(group) and units + group[taken][3] <= limit:
                    units += group[taken][3]
                    taken += 1
                self._run(group[:taken])
                group = group[taken:]

    def _run(self, batch: list[_Pending[RequestT, ResultT]]) -> None:
        try:
            results = self.run([request for request, *_ in batch])
            if len(results) != len(batch):
                raise RuntimeError(f"a batched call returned {len(results)} results for {len(batch)} requests")
        except BaseException as e:
            if len(batch) > 1 and self.splits_on(e):
                half = len(batch) // 2
                self._run(batch[:half])
                self._run(batch[half:])
                return
            for _, future, *_ in batch:
                future.set_exception(e)
            return
        for (_, future, *_), result in zip(batch, results, strict=True):
            future.set_result(result)


def device_batcher(
    run: Callable[[list[RequestT]], Sequence[ResultT]],
    *,
    key: Callable[[RequestT], Hashable],
    capacity: Callable[[Hashable], int | None] = _no_capacity_limit,
    max_batch: int,
    max_wait_s: float,
) -> MicroBatcher[RequestT, ResultT]:
    """A MicroBatcher for a local model: batches are collected once the device is free, halved when out of memory."""
    return MicroBatcher(
        run,
        max_batch=max_batch,
        max_wait_s=max_wait_s,
        key=key,
        capacity=capacity,
        splits_on=is_out_of_memory,
        gate=device_lock,
    )
