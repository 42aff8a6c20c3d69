"""The step record every node of every loop appends: what it decided, in a sentence, and how long it took."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from langgraph.types import Overwrite
from typing_extensions import TypedDict


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
