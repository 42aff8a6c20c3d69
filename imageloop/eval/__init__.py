"""Metrics and evaluation harnesses for the loops."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeAlias, TypeVar

from imageloop.files import jsonl_journal

T = TypeVar("T")
R = TypeVar("R")
OnProgress = Callable[[int, int], None]
Run: TypeAlias = Callable[[Iterable[T]], Iterable[R]]
"""How a job's items run: each item's result yielded as it finishes (in threads here, or on a cluster)."""


def in_threads(work: Callable[[T], R], concurrency: int = 1) -> Run[T, R]:
    """Run `work` on the items `concurrency` at a time in this process (their model calls share batches)."""

    def run(items: Iterable[T]) -> Iterator[R]:
        with ThreadPoolExecutor(concurrency) as pool:
            yield from pool.map(work, items)

    return run


def journaled(
    pending: Sequence[T],
    run: Run[T, dict[str, Any]],
    journal: Path,
    *,
    total: int,
    on_progress: OnProgress | None = None,
) -> Iterator[dict[str, Any]]:
    """Run the pending items (`run` says where), journal each result as it finishes, yield it.

    Only this process writes the journal, whoever did the work, so every resume rule holds however the
    items ran. `on_progress(done, total)` is told first of the `total - len(pending)` items done before,
    then of each.
    """
    finished = total - len(pending)
    if on_progress is not None:
        on_progress(finished, total)
    with jsonl_journal(journal) as append:
        for record in run(pending):
            append(record)
            finished += 1
            yield record
            if on_progress is not None:
                on_progress(finished, total)
