"""Playing a checkpointed LangGraph thread (a session's, a run's) to its next question or its end.

A thread pauses on an `interrupt()` whose payload is the question to show, or stops part-way (a callback
that raised, a process killed); any face may play it on, since the thread id is all it takes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, StateSnapshot

from imageloop.graphs.steps import OnStep, follow_steps_and_progress
from imageloop.knobs import Knobs
from imageloop.progress import OnProgress

__all__ = ["OnStep", "carry_knobs", "pending_interrupt", "play", "thread_config", "unfinished"]


def thread_config(thread_id: str) -> RunnableConfig:
    """The run config naming a session's thread."""
    return {"configurable": {"thread_id": thread_id}}


def play(
    graph: CompiledStateGraph[Any, Any, Any, Any],
    command: Mapping[str, Any] | Command[Any] | None,
    thread_id: str,
    context: Any,
    on_step: OnStep | None,
    on_progress: OnProgress | None = None,
) -> StateSnapshot:
    """Play to the next question or the end, handing each node's steps to `on_step` as the node finishes and
    in-node progress (a drawing's denoising steps) to `on_progress` as it happens.

    Either may raise to stop the play there (a server's cancel): the checkpoint keeps every finished
    node, and the session shows as incomplete until it is played on with no command.
    """
    config = thread_config(thread_id)
    chunks = graph.stream(command, config, stream_mode=["updates", "custom"], context=context)
    follow_steps_and_progress(chunks, on_step, on_progress)
    return graph.get_state(config)


def pending_interrupt(snapshot: StateSnapshot) -> Any | None:
    """The question a paused thread waits on (its interrupt's payload), if any."""
    pending = [i.value for task in snapshot.tasks for i in task.interrupts]
    return pending[0] if pending else None


def unfinished(snapshot: StateSnapshot) -> bool:
    """Whether a thread stopped part-way: nodes still to run, or finished ones whose writes wait to be applied.

    A run stopped right after a node (a step callback raising) leaves that node's writes pending on the
    last checkpoint: `snapshot.next` no longer names it, but its task is there, and continuing applies
    its writes instead of running it again.
    """
    return bool(snapshot.next or snapshot.tasks)


def carry_knobs(graph: CompiledStateGraph[Any, Any, Any, Any], thread_id: str, knobs: Knobs) -> None:
    """A thread checkpointed before a loop's knobs were one model in state gets them there, so it plays on."""
    config = thread_config(thread_id)
    values = graph.get_state(config).values
    if values and "knobs" not in values:
        graph.update_state(config, {"knobs": knobs})
