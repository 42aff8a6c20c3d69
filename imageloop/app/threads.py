"""What the sessions of every interrupting loop (GenIR searches, RAGE picks) share: a checkpointed thread.

A session is one LangGraph thread checkpointed in the sessions database (`App.sessions_db`) after every
node, played by one call at a time (a lock per thread), and paused on an `interrupt()` whose payload is
the question to show. Any face may play it on, since the thread id is all it takes.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Mapping
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph.state import CompiledStateGraph
from langgraph.types import Command, StateSnapshot

from imageloop.app.checkpoints import sqlite_checkpointer
from imageloop.graphs.steps import OnStep, follow_steps_and_progress
from imageloop.progress import OnProgress

__all__ = ["OnStep", "checkpointed_thread", "pending_interrupt", "play", "thread_config"]

_THREAD_LOCKS: dict[str, threading.Lock] = {}
_THREAD_LOCKS_GUARD = threading.Lock()


def thread_config(thread_id: str) -> RunnableConfig:
    """The run config naming a session's thread."""
    return {"configurable": {"thread_id": thread_id}}


@contextmanager
def checkpointed_thread(db: Path, thread_id: str) -> Iterator[SqliteSaver]:
    """A checkpointer on the sessions database, held with the thread's lock: one call per session at a time."""
    with _THREAD_LOCKS_GUARD:
        lock = _THREAD_LOCKS.setdefault(thread_id, threading.Lock())
    db.parent.mkdir(parents=True, exist_ok=True)
    # A generous busy timeout: a server plays several sessions at once against one database.
    with lock, closing(sqlite3.connect(db, timeout=30.0, check_same_thread=False)) as conn:
        yield sqlite_checkpointer(conn, db)


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
