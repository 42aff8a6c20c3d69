"""The background-run registry: what a finished run keeps while the server keeps it listed."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from typing import Any

from imageloop.app.jobs import Job, JobRegistry


class Graph:
    """Stands in for a run's compiled graph and checkpointer, which its record writer closes over."""


def run_holding(graph: Graph) -> tuple[Callable[[Job], dict[str, Any]], weakref.ref[Graph]]:
    """A run's work whose record writer closes over `graph`, and a weak reference to that graph."""

    def work(job: Job) -> dict[str, Any]:
        job.record_with(lambda error: {"graph": id(graph), "error": error})
        return {"stop_reason": "aligned"}

    return work, weakref.ref(graph)


def test_a_finished_run_lets_go_of_what_its_record_writer_holds() -> None:
    registry = JobRegistry()
    work, held = run_holding(Graph())

    job = registry.submit("generate", work)
    del work  # the registry's own references are what is tested
    assert job.done.wait(10)
    gc.collect()

    assert job.status == "done" and job.result == {"stop_reason": "aligned"}  # still listed, with its result
    assert held() is None  # a server keeps hundreds of finished runs: never their graphs
    registry.shutdown(grace_s=1.0)
