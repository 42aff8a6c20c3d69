"""The step record every node of every loop appends: what it decided, in a sentence, and how long it took."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any, TypedDict

from langgraph.types import Overwrite


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


def play(
    graph: Any,
    inputs: Mapping[str, Any],
    *,
    context: Any = None,
    config: Mapping[str, Any] | None = None,
    on_step: Callable[[Step], None] | None = None,
) -> dict[str, Any]:
    """Run a compiled graph to its end, handing each node's steps to `on_step` as it finishes; the final output."""
    final: dict[str, Any] = {}
    for mode, payload in graph.stream(inputs, config, stream_mode=["updates", "values"], context=context):
        if mode == "values":
            final = dict(payload)
        elif on_step is not None:
            for update in payload.values():
                if isinstance(update, dict):
                    for recorded in node_steps(update):
                        on_step(recorded)
    return final
