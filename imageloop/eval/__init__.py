"""Metrics and evaluation harnesses for the loops."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from imageloop.files import jsonl_journal

T = TypeVar("T")
OnProgress = Callable[[int, int], None]


def journaled(
    pending: Sequence[T],
    work: Callable[[T], dict[str, Any]],
    journal: Path,
    *,
    total: int,
    concurrency: int = 1,
    on_progress: OnProgress | None = None,
) -> Iterator[dict[str, Any]]:
    """Run `work` on each pending item (`concurrency` at once), journal each result as it finishes, yield it.

    `on_progress(done, total)` is told first of the `total - len(pending)` items done before, then of each.
    """
    finished = total - len(pending)
    if on_progress is not None:
        on_progress(finished, total)
    with jsonl_journal(journal) as append, ThreadPoolExecutor(concurrency) as pool:
        for record in pool.map(work, pending):
            append(record)
            finished += 1
            yield record
            if on_progress is not None:
                on_progress(finished, total)
