"""Sessions: the loops a person plays across calls (GenIR searches, RAGE picks), one way for both.

A session is one LangGraph thread checkpointed in the sessions database (`App.sessions_db`) after every
node, registered with its loop, index, folder and the knobs it resolved when it started, so its id is all
a later call needs, from any face. One resume policy: a session keeps its knobs; a call that asks for
other values is refused in one line, never silently played with the session's (or another face's).
One call plays a session at a time (a lock from a fixed table: sessions hash onto it, so it never grows).
"""

from __future__ import annotations

import json
import sqlite3
import threading
import zlib
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from langgraph.checkpoint.sqlite import SqliteSaver

from imageloop.app.checkpoints import sqlite_checkpointer
from imageloop.errors import ConfigError, ImageloopError
from imageloop.knobs import Given, Knobs

if TYPE_CHECKING:
    from imageloop.app.core import App

Loop = Literal["genir", "rage"]
SESSIONS_TABLE = "imageloop_sessions"
LEGACY_TABLES = {"genir": "imageloop_search_sessions", "rage": "imageloop_rage_sessions"}
"""Where sessions started before the one table was kept: read, never written."""
_LOCKS = tuple(threading.Lock() for _ in range(64))


@dataclass(frozen=True)
class Session:
    """What a session id stands for: its loop, the index searched, the folder written, the knobs it runs with."""

    session_id: str
    loop: Loop
    index: Path
    out_dir: Path
    knobs: dict[str, Any]

    def refuse_changes(self, model: type[Knobs], given: Given) -> None:
        """The one resume policy: knobs asked for that differ from the session's are refused, naming them."""
        changed = model.model_validate(self.knobs).changed_by(given)
        if changed:
            differs = "; ".join(f"{name} {old!r}, not {new!r}" for name, (old, new) in changed.items())
            raise ConfigError(f"session {self.session_id} was started with {differs}: continue it without those")


def register(app: App, session: Session) -> None:
    """Record a new session in the sessions database."""
    db = app.sessions_db
    db.parent.mkdir(parents=True, exist_ok=True)
    with closing(sqlite3.connect(db, timeout=30.0)) as conn, conn:
        _create_table(conn)
        conn.execute(
            f"INSERT INTO {SESSIONS_TABLE} (session_id, loop, index_path, out_dir, knobs, created_at) "
            "VALUES (?, ?, ?, ?, ?, datetime('now'))",
            (session.session_id, session.loop, str(session.index), str(session.out_dir), json.dumps(session.knobs)),
        )


def load(app: App, session_id: str, loop: Loop, model: type[Knobs]) -> Session:
    """The `loop` session registered as `session_id` (its index must still be one this app may use), with every
    knob it started with: none is taken from this app's settings (a session registered before knobs were
    kept whole takes the ones it did not keep from them)."""
    row = _row(app.sessions_db, session_id, loop)
    if row is None:
        what = "search session" if loop == "genir" else "RAGE session"
        raise ImageloopError(f"no {what} {session_id!r} in {app.sessions_db}: start one first")
    index_path, out_dir, kept, legacy = row
    index = app.path(index_path, "the session's index", kind="dir")
    knobs = model.from_settings(app.settings).overridden(kept) if legacy else model.model_validate(kept)
    return Session(session_id, loop, index, Path(out_dir), knobs.record())


def _row(db: Path, session_id: str, loop: Loop) -> tuple[str, str, dict[str, Any], bool] | None:
    """A session's index, folder and knobs as registered, and whether a legacy table holds it."""
    if not db.is_file():
        return None
    with closing(sqlite3.connect(db, timeout=30.0)) as conn:
        _create_table(conn)
        row = conn.execute(
            f"SELECT index_path, out_dir, knobs FROM {SESSIONS_TABLE} WHERE session_id = ? AND loop = ?",
            (session_id, loop),
        ).fetchone()
        if row is not None:
            return row[0], row[1], json.loads(row[2]), False
        if not _has_table(conn, LEGACY_TABLES[loop]):
            return None
        feedback = ", feedback" if loop == "genir" else ""
        row = conn.execute(
            f"SELECT index_path, out_dir, knobs{feedback} FROM {LEGACY_TABLES[loop]} WHERE thread_id = ?",
            (session_id,),
        ).fetchone()
    if row is None:
        return None
    knobs = json.loads(row[2] or "{}")
    return row[0], row[1], _legacy_knobs({**knobs, "feedback": row[3]} if len(row) > 3 else knobs), True


def _legacy_knobs(knobs: dict[str, Any]) -> dict[str, Any]:
    """Knobs as sessions recorded them before the knob models (`steps_per_image`, RAGE's `where`, None values)."""
    renamed = {("steps" if name == "steps_per_image" else name): value for name, value in knobs.items()}
    return {name: value for name, value in renamed.items() if value is not None and name != "where"}


def _has_table(conn: sqlite3.Connection, table: str) -> bool:
    found = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (table,)).fetchone()
    return found is not None


def _create_table(conn: sqlite3.Connection) -> None:
    conn.execute(
        f"CREATE TABLE IF NOT EXISTS {SESSIONS_TABLE} (session_id TEXT PRIMARY KEY, loop TEXT NOT NULL, "
        "index_path TEXT NOT NULL, out_dir TEXT NOT NULL, knobs TEXT NOT NULL, created_at TEXT NOT NULL)"
    )


@contextmanager
def session_thread(app: App, session_id: str) -> Iterator[SqliteSaver]:
    """A checkpointer on the sessions database, held with the session's lock: one call per session at a time."""
    lock = _LOCKS[zlib.crc32(session_id.encode()) % len(_LOCKS)]
    db = app.sessions_db
    db.parent.mkdir(parents=True, exist_ok=True)
    # A generous busy timeout: a server plays several sessions at once against one database.
    with lock, closing(sqlite3.connect(db, timeout=30.0, check_same_thread=False)) as conn:
        yield sqlite_checkpointer(conn, db)
