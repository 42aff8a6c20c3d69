"""The step record every node of every loop appends: what it decided, in a sentence, and how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Iterable, Mapping
from typing import Any

from langgraph.types import Overwrite
from typing_extensions import TypedDict

from imageloop.progress import OnProgress, progress_event

Publish = Callable[[Any], Any]
"""How a run names its images in its questions (interrupts) and answers for whoever reads them: as paths (no
`publish`, a local caller), or as addresses a remote client can fetch (LangGraph Server: `imageloop.app.links`)."""


def kept(value: Any) -> Any:
    """The local caller's `Publish`: images named by their paths."""
    return value


class Step(TypedDict):
    """One visited node."""

    node: str
    iteration: int
    decision: str
    seconds: float
    detail: dict[str, Any]


def step(node: str, iteration: int, decision: str, started: float, **detail: Any) -> Step:
    """A Step timed from `started` (a `time.perf_counter()` reading) to now."""
    return Step(
        node=node,
        iteration=iteration,
        decision=decision,
        seconds=round(time.perf_counter() - started, 4),
        detail=detail,
    )


def node_steps(update: Mapping[str, Any]) -> list[Step]:
    """The steps a node's update adds (a `prepare` node starts the list afresh with `Overwrite`)."""
    steps = update.get("steps") or []
    return list(steps.value if isinstance(steps, Overwrite) else steps)


OnStep = Callable[[Step], None]


def follow_steps_and_progress(
    chunks: Iterable[Any], on_step: OnStep | None, on_progress: OnProgress | None = None
) -> dict[str, Any]:
    """Consume a multi-mode stream (`stream_mode=["updates", "custom"]`, with "values" if the output is
    wanted): each node's steps to `on_step` as the node finishes, in-node progress events to `on_progress`
    as they happen (either may raise to stop the run); returns the last "values" chunk, if streamed.

    A stream stopped that way is closed here, before the exception leaves: closing it waits for the
    checkpoint writes still running in LangGraph's background threads, so the caller may close the
    checkpointer's connection next (left to the garbage collector, those writes raced that close and
    crashed the process, and the finished node's writes could be lost).
    """
    final: dict[str, Any] = {}
    try:
        for item in chunks:
            mode, chunk = item  # (stream mode, chunk) when several modes are streamed
            if mode == "values":
                final = dict(chunk)
            elif mode == "custom":
                event = progress_event(chunk)
                if event is not None and on_progress is not None:
                    on_progress(event)
            elif on_step is not None:
                for update in chunk.values():
                    if isinstance(update, dict):  # an interrupt's update is a tuple
                        for recorded in node_steps(update):
                            on_step(recorded)
    finally:
        if isinstance(chunks, Generator):
            chunks.close()
    return final


def play(
    graph: Any,
    inputs: Mapping[str, Any],
    *,
    context: Any = None,
    config: Mapping[str, Any] | None = None,
    on_step: OnStep | None = None,
    on_progress: OnProgress | None = None,
) -> dict[str, Any]:
    """Run a compiled graph to its end, handing each node's steps to `on_step` as it finishes (and in-node
    progress to `on_progress`); the final output."""
    chunks = graph.stream(inputs, config, stream_mode=["updates", "values", "custom"], context=context)
    return follow_steps_and_progress(chunks, on_step, on_progress)
