"""The default vector store: one SQLite file on local disk, exact cosine search, no server.

SQLite (WAL) is the source of truth for records and vectors; searches run over a numpy matrix
loaded once and reloaded only when the store's write generation changes, so a process that keeps a
store open sees what another process indexed without reopening it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from imageloop.errors import ImageloopError
from imageloop.protocols import SearchHit, Vector, VectorRecord

# Vectors are stored as little-endian float32 whatever the machine, so a store file is portable.
_BLOB_DTYPE = np.dtype("<f4")

# Meta keys the store writes itself. "generation" counts committed vector writes and is the cache
# key; "dim" is fixed by the first upsert (or preset with set_meta before it) and never changes.
_GENERATION = "generation"
_DIM = "dim"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS vectors (id TEXT PRIMARY KEY, vector BLOB NOT NULL, metadata TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


@dataclass(frozen=True)
class _Snapshot:
    """All vectors at one write generation, row-normalised so a dot product is a cosine."""

    generation: int
    ids: list[str]
    unit_vectors: npt.NDArray[np.float32]
    metadata: list[dict[str, Any]]


class EmbeddedVectorStore:
    """A `VectorStore` in one SQLite file; every write is one transaction, all or nothing."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode (isolation_level=None): transactions are opened explicitly in `_write`,
        # so a batch is never split by the sqlite3 module's implicit commits. One connection is
        # shared by threads (LangGraph runs sync nodes in a pool) and guarded by `_lock`.
        self._conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0, check_same_thread=False)
        self._lock = threading.RLock()
        self._snapshot: _Snapshot | None = None
        with self._lock:
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        """Release the database connection."""
        with self._lock:
            self._conn.close()
            self._snapshot = None

    def get_meta(self) -> dict[str, Any]:
        """All meta values (JSON-decoded), including the store's own `dim` and `generation`."""
        with self._lock:
            rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Write meta values in one transaction; `dim` may only be set while unset or unchanged."""
        if _GENERATION in values:
            raise ValueError(f"meta key {_GENERATION!r} is maintained by the store")
        with self._write() as conn:
            if _DIM in values:
                self._check_dim(conn, int(values[_DIM]))
            conn.executemany(
                "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                [(key, json.dumps(value)) for key, value in values.items()],
            )

    def upsert(self, records: Sequence[VectorRecord]) -> None:
        """Insert or replace `records` atomically: a failure or a killed process leaves none visible."""
        if not records:
            return
        with self._write() as conn:
            for record in records:
                # Validation and serialisation happen inside the transaction on purpose: a bad
                # record anywhere in the batch rolls back the records before it as well.
                vector = _checked_vector(record.vector, f"vector for id {record.id!r}")
                self._check_dim(conn, vector.shape[0])
                conn.execute(
                    "INSERT INTO vectors (id, vector, metadata) VALUES (?, ?, ?) ON CONFLICT(id) DO UPDATE "
                    "SET vector = excluded.vector, metadata = excluded.metadata",
                    (record.id, vector.astype(_BLOB_DTYPE).tobytes(), json.dumps(dict(record.metadata))),
                )
            _bump_generation(conn)

    def search(self, vector: Vector, k: int, where: Mapping[str, Any] | None = None) -> list[SearchHit]:
        """The at most `k` records most cosine-similar to `vector` whose metadata matches `where`.

        `where` maps metadata keys to a required value, or to a list of accepted values.
        """
        if k <= 0:
            raise ImageloopError(f"k must be a positive number of results, got {k}")
        snapshot = self._current_snapshot()
        if not snapshot.ids:
            return []
        query = _checked_vector(vector, "query vector")
        stored_dim = snapshot.unit_vectors.shape[1]
        if query.shape[0] != stored_dim:
            raise ImageloopError(
                f"query vector has dimension {query.shape[0]} but the store at {self.path} holds dimension {stored_dim}"
            )
        candidates = np.arange(len(snapshot.ids))
        if where:
            candidates = candidates[[_matches(meta, where) for meta in snapshot.metadata]]
        scores = snapshot.unit_vectors[candidates] @ (query / np.linalg.norm(query))
        # argpartition finds the k best in linear time; putting them back in row (id) order before
        # the stable sort makes equal scores come back in a reproducible order.
        top = np.sort(np.argpartition(-scores, k - 1)[:k]) if k < len(scores) else np.arange(len(scores))
        ranked = top[np.argsort(-scores[top], kind="stable")]
        return [
            SearchHit(
                id=snapshot.ids[candidates[i]],
                score=float(np.clip(scores[i], -1.0, 1.0)),
                metadata=snapshot.metadata[candidates[i]],
            )
            for i in ranked
        ]

    def get(self, ids: Sequence[str]) -> list[VectorRecord]:
        """The stored records for `ids`, in the order asked; unknown ids are left out."""
        records = []
        with self._lock:
            for record_id in ids:
                row = self._conn.execute("SELECT vector, metadata FROM vectors WHERE id = ?", (record_id,)).fetchone()
                if row is not None:
                    vector = np.frombuffer(row[0], dtype=_BLOB_DTYPE).astype(np.float32)
                    records.append(VectorRecord(record_id, vector, json.loads(row[1])))
        return records

    def delete(self, ids: Sequence[str]) -> None:
        """Remove `ids` in one transaction; unknown ids are ignored."""
        if not ids:
            return
        with self._write() as conn:
            conn.executemany("DELETE FROM vectors WHERE id = ?", [(record_id,) for record_id in ids])
            _bump_generation(conn)

    def count(self) -> int:
        """How many records the store holds."""
        with self._lock:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM vectors").fetchone()
        return int(n)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front so it cannot deadlock."""
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._conn.execute("COMMIT")

    def _check_dim(self, conn: sqlite3.Connection, dim: int) -> None:
        """Fix the store's dimension on first use; refuse any other dimension afterwards."""
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_DIM,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_DIM, json.dumps(dim)))
        elif json.loads(row[0]) != dim:
            raise ImageloopError(
                f"vector has dimension {dim} but the store at {self.path} holds dimension {json.loads(row[0])}"
            )

    def _current_snapshot(self) -> _Snapshot:
        """The cached matrix, reloaded when any connection (this one or another process) wrote."""
        with self._lock:
            generation = _read_generation(self._conn)
            if self._snapshot is not None and self._snapshot.generation == generation:
                return self._snapshot
            # One read transaction: the generation and the rows come from the same WAL snapshot.
            self._conn.execute("BEGIN")
            try:
                generation = _read_generation(self._conn)
                rows = self._conn.execute("SELECT id, vector, metadata FROM vectors ORDER BY id").fetchall()
            finally:
                self._conn.execute("COMMIT")
            if rows:
                matrix = np.stack([np.frombuffer(blob, dtype=_BLOB_DTYPE) for _, blob, _ in rows])
                matrix = matrix.astype(np.float32)
                matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
            else:
                matrix = np.zeros((0, 0), dtype=np.float32)
            self._snapshot = _Snapshot(
                generation=generation,
                ids=[row[0] for row in rows],
                unit_vectors=matrix,
                metadata=[json.loads(row[2]) for row in rows],
            )
            return self._snapshot


def _checked_vector(vector: Vector, what: str) -> npt.NDArray[np.float32]:
    """A 1-D, finite, non-zero float32 copy of `vector`; cosine is undefined otherwise."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1:
        raise ImageloopError(f"{what} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)) or not np.any(array):
        raise ImageloopError(f"{what} must be finite and non-zero")
    return array


def _matches(metadata: Mapping[str, Any], where: Mapping[str, Any]) -> bool:
    """Equality on every `where` key; a list (or tuple/set) of values means any of them."""
    for key, wanted in where.items():
        if key not in metadata:
            return False
        value = metadata[key]
        if isinstance(wanted, list | tuple | set | frozenset):
            # Compared with == rather than `in` so unhashable metadata values work against sets.
            if not any(value == option for option in wanted):
                return False
        elif value != wanted:
            return False
    return True


def _read_generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (_GENERATION,)).fetchone()
    return 0 if row is None else int(json.loads(row[0]))


def _bump_generation(conn: sqlite3.Connection) -> None:
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?, '1') "
        "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1",
        (_GENERATION,),
    )
