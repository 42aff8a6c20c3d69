"""In-node progress (a diffusion's denoising steps), emitted once through LangGraph's custom stream.

A node's long call reports how far it got with `report_progress`; whoever runs the graph reads the
events from `graph.stream(..., stream_mode="custom")`: the CLI draws a bar, the MCP server sends progress
notifications, the browser UI a progress bar, a library user whatever they like. Outside a graph run (a
backend called directly) the report goes nowhere.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from typing_extensions import TypedDict

PROGRESS_KEY = "imageloop_progress"


class ProgressEvent(TypedDict):
    """How far one long call inside a node got: `done` of `total` units of `what` (e.g. denoising steps)."""

    node: str | None
    what: str
    done: int
    total: int | None


OnProgress = Callable[[ProgressEvent], None]


def report_progress(what: str, done: int, total: int | None = None) -> None:
    """Emit a progress event on the running graph's custom stream; a no-op outside a graph run."""
    from langgraph.config import get_config, get_stream_writer

    try:
        writer = get_stream_writer()
        node = (get_config().get("metadata") or {}).get("langgraph_node")
    except (RuntimeError, KeyError):  # not inside a graph node (RuntimeError), or in a runnable that is no graph
        return
    writer({PROGRESS_KEY: ProgressEvent(node=node, what=what, done=done, total=total)})


def progress_event(chunk: Any) -> ProgressEvent | None:
    """The progress event in a custom-stream chunk, or None for anything else a node wrote."""
    if isinstance(chunk, Mapping) and isinstance(chunk.get(PROGRESS_KEY), Mapping):
        event: ProgressEvent = chunk[PROGRESS_KEY]
        return event
    return None


def describe(event: ProgressEvent) -> str:
    """One line for a person: `[generate_draft] denoising 3/20`."""
    where = f"[{event['node']}] " if event["node"] else ""
    of = f"/{event['total']}" if event["total"] is not None else ""
    return f"{where}{event['what']} {event['done']}{of}"
