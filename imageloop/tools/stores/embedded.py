"""The default vector store: SQLite records plus one file of vectors, on local disk; exact search, ANN when large.

What is stored, once each: the records (id, metadata) in SQLite (WAL), the source of truth, and
every vector, scaled to length 1, as one row of an append-only float32 file beside it
(`<store>-vectors-*`, see `vector_file`); each record names its row, and the meta counts the
committed rows. Every write is one SQLite transaction, and the rows it appends are synced before it
commits: a killed process leaves every committed batch, no partial one, and at worst some uncounted
rows at the end of the file that the next write overwrites.

Searches run over an engine derived from those rows, at the store's write generation: up to
`ann_threshold` records an exact scan of the memory-mapped file; above it (`pip install
imageloop[ann]`) an HNSW graph whose FAISS storage is a view of that same file ("hnsw"), or, for
catalogues whose vectors do not fit in memory, a graph over 4-bit codes whose candidates are
re-ranked with rows read from the file ("quantized"). The engine is chosen per store (`ann`,
recorded in its meta; by default "quantized" once the vectors pass `DEFAULT_QUANTIZED_ABOVE_BYTES`),
built on `threads` threads, extended as rows are appended, and saved beside the store
(`<store>-ann-*`, written whole then renamed, and referenced from the meta in a transaction), so a
reopened store neither rebuilds it nor holds a second copy of the vectors. Other processes' writes
are picked up by reading only what changed since. Once a fifth of the rows are dead (deleted or
replaced), the file is compacted: the live rows are copied to a new file, and the records point at
it in one transaction.

What the disk does to it is said in one line (`StorageError`): a store on a read-only disk or folder
opens read-only (searches work, writes say why they cannot); several processes creating one store at
once wait for each other rather than fail; a full disk, a store left locked and page-level damage
(`IndexDamagedError`, with "delete the index folder and re-index") are named as such. A store of an
earlier layout (vectors inside SQLite, and again in the HNSW file) is migrated in place when opened
writable, in one transaction.

Why these engines, measured with bench/retrieval.py and bench/footprint.py on 2 shared cores (d=512,
k=10): a scan of 100,000 vectors takes 6-17 ms and needs no build and has recall 1; at a million a
scan takes 80 ms while HNSW (M=32) answers in ~2.6 ms at recall@10 0.97. Our searches add ~0.1-0.2
ms to bare FAISS (ids, metadata, the staleness check); hits come from an in-memory copy of the
records' ids and metadata, not from SQLite.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar
from urllib.parse import quote

import numpy as np

from imageloop.errors import ImageloopError, IndexDamagedError, StorageError
from imageloop.files import os_error_message
from imageloop.protocols import SearchHit, Vector, VectorRecord
from imageloop.tools.stores.ann_index import (
    QUANTIZED_SETTINGS,
    AnnIndexUnreadable,
    HnswIndex,
    HnswSettings,
    QuantizedIndex,
    faiss_module,
)
from imageloop.tools.stores.checks import check_k, checked_vector, unit_vector
from imageloop.tools.stores.engines import ANN_ENGINES, AnnEngine
from imageloop.tools.stores.metadata_filter import Facet, Where, parse_where
from imageloop.tools.stores.vector_file import BLOCK_ROWS, DTYPE, VectorFile
from imageloop.tools.stores.vector_search import Changes, ExactIndex, Found, Matrix, RowMap, Seqs

logger = logging.getLogger(__name__)

# Above this many records a store searches with an ANN engine (when faiss is installed). Measured:
# exact search at 100,000 vectors takes ~6-17 ms here, HNSW ~1 ms but ~30 s to build and recall 0.98;
# an embedder call costs more than either, so exact search (recall 1, no build) is kept up to here.
DEFAULT_ANN_THRESHOLD = 100_000
# Past this many bytes of vectors (2 million at d=512) a store whose engine was not chosen uses the
# quantised one: its memory is 0.2x the vectors where HNSW touches all of them.
DEFAULT_QUANTIZED_ABOVE_BYTES = 4 * 2**30

# Meta keys the store writes itself. "generation" counts committed writes and stamps every index
# derived from the rows; "dim" is fixed by the first upsert (or preset with set_meta before it) and
# never changes; "vectors" names the vector file and counts its committed rows; "ann" points at the
# saved ANN index and says how it was built; "ann_engine" is the engine chosen for the store.
_GENERATION = "generation"
_DIM = "dim"
_VECTORS = "vectors"
_ANN = "ann"
_ENGINE = "ann_engine"

# PRAGMA application_id marks an SQLite file as an imageloop vector store; user_version is the layout.
_APPLICATION_ID = 0x494C5653  # "ILVS"
_LAYOUT = 3

# `seq` numbers records: AUTOINCREMENT never reuses one, and an INTEGER PRIMARY KEY survives VACUUM.
# Each record carries the generation that last wrote it, the row of its vector in the vector file
# and the vector's length (vectors are kept at length 1); `deletions` records which record and row
# each generation removed (a row also dies when its record's vector is replaced), so derived indexes
# catch up by reading only what changed.
_SCHEMA = (
    "CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "metadata TEXT NOT NULL, generation INTEGER NOT NULL, row INTEGER NOT NULL, norm REAL NOT NULL)",
    "CREATE INDEX records_by_generation ON records (generation)",
    "CREATE TABLE deletions (seq INTEGER NOT NULL, row INTEGER NOT NULL, generation INTEGER NOT NULL)",
    "CREATE INDEX deletions_by_generation ON deletions (generation)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_TABLES = {"records", "deletions", "meta"}
# The first layout (id TEXT PRIMARY KEY, vector, metadata) and the second (records, and their vectors
# in a table of their own) are migrated in place on open.
_LAYOUT_1_COLUMNS = ["id", "vector", "metadata"]

# Once this share of the rows are dead (deleted, or replaced by a new row) an ANN store compacts its
# vector file and rebuilds its index; a grown index is saved again once this share of its rows are new.
_MAX_DEAD_FRACTION = 0.2
_RESAVE_FRACTION = 0.05
# An upserted vector within this distance (per component) of the stored one keeps its row: re-tagging
# or moving an image writes no new row.
_SAME_VECTOR = 1e-6
# Files beside the store: the vector file, saved ANN indexes, and the HNSW files of the second layout.
_VECTORS_INFIX = "-vectors-"
_ANN_INFIX = "-ann-"
_LAYOUT_2_HNSW_INFIX = "-hnsw-"
# A file beside the store that it does not refer to (left by a killed save, compaction or migration)
# is deleted once older than this; until then it may be another process's save in progress.
_STALE_SECONDS = 3600.0
_FILTER_CACHE_SIZE = 32
# A record as the JSON fragment `"id",{metadata}`: hits are read from these, kept in memory.
_RECORD_TEXT = "json_quote(id) || ',' || metadata"
# Reads that find their vector file gone (another process compacted it) start over this many times.
_SNAPSHOT_ATTEMPTS = 3

# How long opening waits for other processes that hold the store (creating it, converting it to WAL):
# SQLite answers "database is locked" there without calling its busy handler, so opening retries.
_OPEN_PATIENCE_S = 30.0

_warned_without_faiss = False

SearchIndex = ExactIndex | HnswIndex | QuantizedIndex
P = ParamSpec("P")
R = TypeVar("R")


class _VectorFileGone(IndexDamagedError):
    """The vector file the store's meta names is missing: replaced by a compaction since, or deleted."""


class _SavedIndexGone(Exception):
    """The saved ANN index the store's meta names is missing: superseded by another process's save since."""


def available_threads() -> int:
    """The cores this process may run on: what an ANN index is built with unless told otherwise."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _translated(
    method: Callable[Concatenate[EmbeddedVectorStore, P], R],
) -> Callable[Concatenate[EmbeddedVectorStore, P], R]:
    """Turn SQLite's and the disk's errors inside a store method into one-line StorageErrors."""

    def wrapper(self: EmbeddedVectorStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise store_error(e, self.path) from e
        except OSError as e:  # the vector file or the ANN index beside the store
            raise StorageError(os_error_message(e, f"writing the index files beside {self.path}")) from e

    return functools.wraps(method)(wrapper)


def store_error(error: sqlite3.Error, path: Path) -> StorageError:
    """What an SQLite error on the store at `path` means for its user, in one line."""
    name = getattr(error, "sqlite_errorname", "") or ""
    folder = path.parent
    if name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB")):
        return IndexDamagedError(f"the index at {folder} is damaged ({error}): delete {folder} and re-index")
    if name.startswith("SQLITE_FULL"):
        return StorageError(f"disk full while writing {path} ({error}): free some space and try again")
    if name.startswith("SQLITE_READONLY"):
        return StorageError(
            f"the index at {folder} is read-only here: searching works; adding images needs it writable"
        )
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return StorageError(f"the index at {folder} is busy: another process holds it ({error}); try again shortly")
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_AUTH")):
        return StorageError(f"cannot open {path} ({error}): check the folder's permissions")
    return StorageError(f"the index at {folder} failed: {error} ({name or type(error).__name__})")


class EmbeddedVectorStore:
    """A `VectorStore` in one SQLite file and one vector file; every write is one transaction, all or nothing.

    `ann_threshold`: above this many records, search with an ANN engine (None: always exact).
    `ann`: the ANN engine, "hnsw" or "quantized", recorded in the store (None: the recorded one, else by size).
    `threads`: threads an ANN index is built with (None: every core this process may use).
    `hnsw`, `quantized`: how each engine's graph is built and searched (efSearch is tuned by default).
    """

    def __init__(
        self,
        path: Path,
        *,
        ann_threshold: int | None = DEFAULT_ANN_THRESHOLD,
        ann: AnnEngine | None = None,
        threads: int | None = None,
        hnsw: HnswSettings | None = None,
        quantized: HnswSettings | None = None,
    ) -> None:
        if threads is not None and threads < 1:
            raise ImageloopError(f"threads must be at least 1, got {threads}")
        self.path = Path(path)
        self.ann_threshold = ann_threshold
        self.threads = threads or available_threads()
        self.settings = {"hnsw": hnsw or HnswSettings(), "quantized": quantized or QUANTIZED_SETTINGS}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(os_error_message(e, f"creating the index folder {self.path.parent}")) from e
        # Autocommit mode (isolation_level=None): transactions are opened explicitly, so a batch is
        # never split by the sqlite3 module's implicit commits. One connection is shared by threads
        # (LangGraph runs sync nodes in a pool) and guarded by `_lock`.
        self._conn, self.read_only = _open_store(self.path)
        self._lock = threading.RLock()
        self._vectors: VectorFile | None = None
        self._rows = RowMap()
        self._index: SearchIndex | None = None
        self._texts = _RecordTexts()
        self._facets: dict[str, Facet] = {}
        self._filters: OrderedDict[tuple[int, Where], Seqs] = OrderedDict()
        self._last_snapshot = False  # whether a read that finds a file gone may still start over
        if ann is not None:
            self.choose_ann(ann)

    def close(self) -> None:
        """Release the database connection, the vector file and the in-memory index."""
        with self._lock:
            self._conn.close()
            self._forget_vectors()
            self._texts = _RecordTexts()
            self._facets.clear()
            self._filters.clear()

    @_translated
    def get_meta(self) -> dict[str, Any]:
        """All meta values (JSON-decoded), including the store's own `dim`, `generation`, `vectors` and `ann`."""
        with self._lock:
            rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    @_translated
    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Write meta values in one transaction; `dim` may only be set while unset or unchanged."""
        for key in (_GENERATION, _VECTORS, _ANN, _ENGINE):
            if key in values:
                raise ValueError(f"meta key {key!r} is maintained by the store")
        with self._write() as conn:
            if _DIM in values:
                self._check_dim(conn, int(values[_DIM]))
            _put_meta(conn, values)

    @_translated
    def choose_ann(self, engine: AnnEngine) -> None:
        """Record the ANN engine this store searches with past `ann_threshold`; the next search switches to it."""
        if engine not in ANN_ENGINES:
            raise ImageloopError(f"unknown search engine {engine!r}: choose one of {', '.join(ANN_ENGINES)}")
        with self._lock:
            if _read_meta(self._conn, _ENGINE) == engine or self.read_only:
                return
            with self._write() as conn:
                _put_meta(conn, {_ENGINE: engine})

    @_translated
    def upsert(self, records: Sequence[VectorRecord]) -> None:
        """Insert or replace `records` atomically: a failure or a killed process leaves none visible."""
        if not records:
            return
        with self._write() as conn:
            generation = _read_generation(conn) + 1
            # Keyed by id: a batch naming one id twice stores its last record, like successive upserts.
            rows: dict[str, tuple[str, Matrix, float]] = {}
            checked_dims: set[int] = set()
            for record in records:
                # Validation and serialisation happen inside the transaction on purpose: a bad
                # record anywhere in the batch rolls back the records before it as well.
                vector = checked_vector(record.vector, f"vector for id {record.id!r}")
                if vector.shape[0] not in checked_dims:
                    self._check_dim(conn, vector.shape[0])
                    checked_dims.add(vector.shape[0])
                norm = np.sqrt(np.dot(vector, vector))
                rows[record.id] = (json.dumps(dict(record.metadata)), vector / norm, float(norm))
            vectors = self._vector_file(conn, create=True)
            assert vectors is not None
            kept, replaced = self._unchanged_rows(conn, vectors, rows)
            fresh = [record_id for record_id in rows if record_id not in kept]
            start = int(_read_meta(conn, _VECTORS)["rows"])
            if fresh:
                vectors.write(start, np.stack([rows[record_id][1] for record_id in fresh]))
            placed = {**kept, **{record_id: start + i for i, record_id in enumerate(fresh)}}
            conn.executemany(
                "INSERT INTO records (id, metadata, generation, row, norm) VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(id) DO UPDATE SET metadata = excluded.metadata, generation = excluded.generation, "
                "row = excluded.row, norm = excluded.norm",
                [(record_id, text, generation, placed[record_id], norm) for record_id, (text, _, norm) in rows.items()],
            )
            conn.executemany(
                "INSERT INTO deletions (seq, row, generation) VALUES (?, ?, ?)",
                [(seq, row, generation) for seq, row in replaced],
            )
            _put_meta(conn, {_GENERATION: generation, _VECTORS: {"file": vectors.name, "rows": start + len(fresh)}})

    @_translated
    def search(self, vector: Vector, k: int, where: Mapping[str, Any] | None = None) -> list[SearchHit]:
        """The at most `k` records most cosine-similar to `vector` whose metadata matches `where`.

        `where` maps metadata keys to a required value, or to a list of accepted values; a record
        whose value is a list (tags) matches when any of its elements is accepted.
        """
        check_k(k)
        return self._search(unit_vector(vector, "query vector")[None, :], k, where)[0]

    @_translated
    def search_many(
        self, vectors: Sequence[Vector] | Matrix, k: int, where: Mapping[str, Any] | None = None
    ) -> list[list[SearchHit]]:
        """`search` for each of `vectors`, in one batch: one matrix product or one parallel graph search."""
        check_k(k)
        queries = [unit_vector(vector, f"query vector {i}") for i, vector in enumerate(vectors)]
        if not queries:
            return []
        if len({query.shape[0] for query in queries}) > 1:
            raise ImageloopError("query vectors of one batch must share one dimension")
        return self._search(np.stack(queries), k, where)

    @_translated
    def get(self, ids: Sequence[str]) -> list[VectorRecord]:
        """The stored records for `ids`, in the order asked; unknown ids are left out."""

        def read(conn: sqlite3.Connection) -> list[VectorRecord]:
            found = []
            for record_id in ids:
                row = conn.execute("SELECT row, norm, metadata FROM records WHERE id = ?", (record_id,)).fetchone()
                if row is not None:
                    found.append((record_id, *row))
            vectors = self._vector_file(conn)
            if not found or vectors is None:
                return []
            matrix = vectors.read(np.array([row for _, row, _, _ in found], dtype=np.int64))
            return [
                VectorRecord(record_id, matrix[i] * np.float32(norm), json.loads(metadata))
                for i, (record_id, _, norm, metadata) in enumerate(found)
            ]

        with self._lock:
            return self._in_snapshot(read)

    @_translated
    def delete(self, ids: Sequence[str]) -> None:
        """Remove `ids` in one transaction; unknown ids are ignored."""
        if not ids:
            return
        with self._write() as conn:
            generation = _read_generation(conn) + 1
            for record_id in ids:
                row = conn.execute("SELECT seq, row FROM records WHERE id = ?", (record_id,)).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM records WHERE seq = ?", row[:1])
                    conn.execute("INSERT INTO deletions (seq, row, generation) VALUES (?, ?, ?)", (*row, generation))
            _put_meta(conn, {_GENERATION: generation})

    @_translated
    def ids(self) -> list[str]:
        """Every stored id (re-indexing prunes those whose file is gone)."""
        with self._lock:
            return [row[0] for row in self._conn.execute("SELECT id FROM records ORDER BY seq")]

    @_translated
    def count(self) -> int:
        """How many records the store holds."""
        with self._lock:
            (n,) = self._conn.execute("SELECT COUNT(*) FROM records").fetchone()
        return int(n)

    @_translated
    def check(self) -> None:
        """Read every page of the store (SQLite's quick_check, ~1 s per GB) and measure its vector file.

        IndexDamagedError if a page is corrupt or the vector file is missing or shorter than its rows.
        A count alone can come from an intact index b-tree while the rows' own pages are damaged.
        """
        folder = self.path.parent
        with self._lock:
            problems = [row[0] for row in self._conn.execute("PRAGMA quick_check(3)")]
            if problems != ["ok"]:
                raise IndexDamagedError(
                    f"the index at {folder} is damaged ({'; '.join(problems)[:200]}): delete {folder} and re-index"
                )

            def measure(conn: sqlite3.Connection) -> None:
                vectors, pointer = self._vector_file(conn), _read_meta(conn, _VECTORS)
                if vectors is not None and vectors.stored_rows() < int(pointer["rows"]):
                    raise IndexDamagedError(
                        f"the index at {folder} is damaged ({vectors.name} holds {vectors.stored_rows()} of its "
                        f"{pointer['rows']} vectors): delete {folder} and re-index"
                    )

            self._in_snapshot(measure)

    @_translated
    def search_engine(self) -> str:
        """What searches use at the store's size: exact, hnsw or quantized (read from the meta; nothing is loaded)."""
        with self._lock, self._reading() as conn:
            (count,) = conn.execute("SELECT COUNT(*) FROM records").fetchone()
            return self._wanted_engine(conn, int(count), warn=False)

    @_translated
    def refresh(self, *, rebuild: bool = False) -> dict[str, Any]:
        """Bring the search index up to date now rather than at the next search, and save it; returns `ann_info()`.

        Past `ann_threshold` this builds the ANN index (minutes at a million vectors), adds the rows
        appended since, and compacts a vector file holding dead rows; with `rebuild` it builds anew.
        An indexer calls it once after its last batch.
        """
        with self._lock:
            compacted = False
            if not self.read_only:
                rows = self._in_snapshot(self._synced_rows)
                if rows.rows > rows.count and (rebuild or rows.dead_fraction > _MAX_DEAD_FRACTION):
                    compacted = self._compact()
            index = self._in_snapshot(self._synced_index)
            if rebuild and not compacted and not isinstance(index, ExactIndex):
                # The saved index stays the one pointed at until this one is saved in its place.
                index = self._index = self._build(index.kind)
            if isinstance(index, HnswIndex):
                index.extend(self._rows.rows, self.threads, fold=True)
            self._save_ann_if_due(force=True)
            return self._describe(index)

    @_translated
    def ann_info(self) -> dict[str, Any]:
        """How searches run now: `engine` (exact, hnsw or quantized), `count`, `recall_at_10` and how it was measured.

        Brings the index up to date first, as the next search would.
        """
        with self._lock:
            index = self._in_snapshot(self._synced_index)
            if self._maintain():
                index = self._in_snapshot(self._synced_index)
            return self._describe(index)

    def _search(self, queries: Matrix, k: int, where: Mapping[str, Any] | None) -> list[list[SearchHit]]:
        """Search unit `queries` over the index and records as of one write generation of the store."""
        parsed = parse_where(where) if where else None

        def synced(conn: sqlite3.Connection) -> SearchIndex:
            index = self._synced_index(conn)
            self._texts.sync(conn, self._rows.generation)
            if parsed is not None:
                self._allowed_rows(conn, parsed)
            return index

        with self._lock:
            # The common case reads one row of SQLite: the generation, to see that the in-memory
            # index, hit texts and (cached) filter are all current. Otherwise they are brought up
            # to date in one read transaction.
            index = self._index
            if index is None or not self._is_current(parsed):
                index = self._in_snapshot(synced)
            if self._rows.count == 0:
                return [[] for _ in queries]
            if queries.shape[1] != index.dim:
                raise ImageloopError(
                    f"query vector has dimension {queries.shape[1]} but the store at {self.path} "
                    f"holds dimension {index.dim}"
                )
            allowed = self._rows.live
            if parsed is not None:
                allowed = self._filters[(self._rows.generation, parsed)]
                self._filters.move_to_end((self._rows.generation, parsed))
                if len(allowed) == 0:
                    return [[] for _ in queries]
            hits = self._hits(index.search(queries, k, allowed))
            self._maintain()
        return hits

    def _is_current(self, where: Where | None) -> bool:
        """Whether the row map, index, hit texts and the filter for `where` are all at the store's generation."""
        if not self._rows.generation == self._texts.generation == _read_generation(self._conn):
            return False
        return where is None or (self._rows.generation, where) in self._filters

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

    @contextmanager
    def _reading(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: the generation, changes, filters and hit rows all come from one WAL snapshot."""
        self._conn.execute("BEGIN")
        try:
            yield self._conn
        finally:
            self._conn.execute("COMMIT")

    def _in_snapshot(self, work: Callable[[sqlite3.Connection], R]) -> R:
        """`work` in one read transaction; in a fresh one if a file it names was replaced by another process meanwhile.

        The vector file (replaced by a compaction) or the saved ANN index (superseded by a later save).
        """
        for _ in range(_SNAPSHOT_ATTEMPTS - 1):
            try:
                with self._reading() as conn:
                    return work(conn)
            except (_VectorFileGone, _SavedIndexGone):
                continue
        # Still missing: a vector file was deleted, and that is said; a saved index is rebuilt.
        self._last_snapshot = True
        try:
            with self._reading() as conn:
                return work(conn)
        finally:
            self._last_snapshot = False

    def _check_dim(self, conn: sqlite3.Connection, dim: int) -> None:
        """Fix the store's dimension on first use; refuse any other dimension afterwards."""
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_DIM,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_DIM, json.dumps(dim)))
        elif json.loads(row[0]) != dim:
            raise ImageloopError(
                f"vector has dimension {dim} but the store at {self.path} holds dimension {json.loads(row[0])}"
            )

    def _vector_file(self, conn: sqlite3.Connection, *, create: bool = False) -> VectorFile | None:
        """The vector file the meta names (None before the first vector; created then when `create`)."""
        pointer = _read_meta(conn, _VECTORS)
        if pointer is None:
            if not create:
                return None
            name = f"{self.path.name}{_VECTORS_INFIX}{uuid.uuid4().hex[:8]}"
            self._forget_vectors()
            self._vectors = VectorFile(self.path.parent / name, int(_read_meta(conn, _DIM)), writable=True, create=True)
            _put_meta(conn, {_VECTORS: {"file": name, "rows": 0}})
            return self._vectors
        if self._vectors is None or self._vectors.name != pointer["file"]:
            try:
                opened = VectorFile(self.path.parent / pointer["file"], int(_read_meta(conn, _DIM)),
                                    writable=not self.read_only)  # fmt: skip
            except FileNotFoundError:
                folder = self.path.parent
                raise _VectorFileGone(
                    f"the index at {folder} is damaged (its vector file {pointer['file']} is missing): "
                    f"delete {folder} and re-index"
                ) from None
            self._forget_vectors()
            self._vectors = opened
        return self._vectors

    def _forget_vectors(self) -> None:
        """Close the vector file and drop everything derived from its rows (after a compaction, or on close)."""
        if self._vectors is not None:
            self._vectors.close()
        self._vectors = None
        self._index = None
        self._rows = RowMap()

    def _unchanged_rows(
        self, conn: sqlite3.Connection, vectors: VectorFile, rows: Mapping[str, tuple[str, Matrix, float]]
    ) -> tuple[dict[str, int], list[tuple[int, int]]]:
        """Of the ids in `rows` already stored: those whose vector is unchanged (id -> row); the (seq, row) replaced."""
        stored: list[tuple[str, int, int]] = []
        ids = list(rows)
        for start in range(0, len(ids), 500):
            chunk = ids[start : start + 500]
            marks = ",".join("?" * len(chunk))
            stored += conn.execute(f"SELECT id, seq, row FROM records WHERE id IN ({marks})", chunk).fetchall()
        if not stored:
            return {}, []
        old = vectors.read(np.array([row for _, _, row in stored], dtype=np.int64))
        kept: dict[str, int] = {}
        replaced: list[tuple[int, int]] = []
        for (record_id, seq, row), vector in zip(stored, old, strict=True):
            if np.abs(vector - rows[record_id][1]).max() <= _SAME_VECTOR:
                kept[record_id] = row
            else:
                replaced.append((seq, row))
        return kept, replaced

    def _synced_rows(self, conn: sqlite3.Connection) -> RowMap:
        """The row map at the store's current generation: caught up, or read whole for a new vector file."""
        generation = _read_generation(conn)
        if self._rows.generation == generation:
            return self._rows
        vectors = self._vector_file(conn)
        name = vectors.name if vectors is not None else None
        if self._rows.generation < 0 or self._rows.file_name != name:
            self._index = None
            self._rows = RowMap(name)
            self._rows.apply(_row_changes(conn, generation, since=None))
        else:
            self._rows.apply(_row_changes(conn, generation, since=self._rows))
        return self._rows

    def _synced_index(self, conn: sqlite3.Connection) -> SearchIndex:
        """The search index at the store's current generation: loaded, extended, switched or built as needed."""
        rows = self._synced_rows(conn)
        wanted = self._wanted_engine(conn, rows.count)
        index = self._index
        if index is None or index.kind != wanted or index.vectors is not self._vectors:
            index = self._open_index(conn, wanted)
        index.extend(rows.rows, self.threads)
        self._index = index
        return index

    def _wanted_engine(self, conn: sqlite3.Connection, count: int, *, warn: bool = True) -> str:
        """The engine for `count` records: exact up to the threshold, then the chosen ANN engine, else one by size."""
        if self.ann_threshold is None or count <= self.ann_threshold:
            return "exact"
        if faiss_module() is None:
            if warn:
                _warn_without_faiss(count)
            return "exact"
        chosen = _read_meta(conn, _ENGINE)
        if chosen in ANN_ENGINES:
            return str(chosen)
        dim = int(_read_meta(conn, _DIM) or 0)
        return "quantized" if count * dim * DTYPE.itemsize > DEFAULT_QUANTIZED_ABOVE_BYTES else "hnsw"

    def _open_index(self, conn: sqlite3.Connection, wanted: str) -> SearchIndex:
        """The saved ANN index if it is the wanted engine's over this vector file and readable; else built, or exact."""
        vectors = self._vectors
        if wanted == "exact" or vectors is None:
            return ExactIndex(vectors)
        engine = HnswIndex if wanted == "hnsw" else QuantizedIndex
        pointer = _read_meta(conn, _ANN)
        if pointer is not None and pointer["engine"] == wanted and pointer["vectors"] == vectors.name:
            path = self.path.parent / pointer["file"]
            try:
                saved = engine.load(path, self.settings[wanted], vectors)
            except AnnIndexUnreadable as e:
                if not path.exists() and not self._last_snapshot:
                    raise _SavedIndexGone(str(e)) from e
                logger.warning("%s; rebuilding the %s index from the store", e, wanted)
            else:
                if saved.graph_rows == pointer["rows"] <= self._rows.rows:
                    return saved
                logger.warning("%s index %s does not match the store; rebuilding it", wanted, pointer["file"])
        return self._build(wanted)

    def _build(self, engine: str) -> HnswIndex | QuantizedIndex:
        """A new `engine` index over every row of the vector file, on `threads` threads."""
        assert self._vectors is not None
        logger.info("building a %s index over %d vectors of %s on %d threads (minutes at a million)",
                    engine, self._rows.count, self.path, self.threads)  # fmt: skip
        kind = HnswIndex if engine == "hnsw" else QuantizedIndex
        return kind.build(self._vectors, self._rows.rows, self._rows.live, self.settings[engine], self.threads)

    def _maintain(self) -> bool:
        """After a search: save a new or grown ANN index; compact a file a fifth dead. True if it compacted."""
        self._save_ann_if_due()
        if isinstance(self._index, ExactIndex) or self.read_only:
            return False
        return self._rows.dead_fraction > _MAX_DEAD_FRACTION and self._compact()

    def _save_ann_if_due(self, *, force: bool = False) -> None:
        """Save the ANN index when it was built here or grew by `_RESAVE_FRACTION` since its file."""
        index = self._index
        if index is None or isinstance(index, ExactIndex) or self.read_only:
            return
        grown = index.graph_rows - index.saved_rows >= _RESAVE_FRACTION * index.graph_rows
        if index.saved_rows == 0 or grown or (force and index.saved_rows < index.graph_rows):
            self._save_ann(index)

    def _save_ann(self, index: HnswIndex | QuantizedIndex) -> None:
        """Write the index to a new file, then point the store's meta at it in one transaction."""
        name = f"{self.path.name}{_ANN_INFIX}{index.kind}-{index.graph_rows}-{uuid.uuid4().hex[:8]}"
        saved = self.path.parent / name
        index.save(saved)
        replaced: Path | None = None
        with self._write() as conn:
            current = _read_meta(conn, _ANN)
            vectors = _read_meta(conn, _VECTORS)
            # Another process may have saved a larger index meanwhile, compacted the vector file, or
            # saved one over as many rows and deleted this file; of two over as many rows, the last
            # saved (a rebuild) wins.
            if (
                vectors["file"] == index.vectors.name
                and saved.exists()
                and (
                    current is None
                    or (current["vectors"], current["engine"]) != (vectors["file"], index.kind)
                    or current["rows"] <= index.graph_rows
                )
            ):
                replaced = None if current is None else self.path.parent / current["file"]
                current = {
                    "file": name, "engine": index.kind, "vectors": index.vectors.name, "rows": index.graph_rows,
                    "generation": self._rows.generation, **index.info,
                }  # fmt: skip
                _put_meta(conn, {_ANN: current})
            # Under the write lock, so that no other save is between its check above and its commit. The
            # index pointed at until this commit goes after it: readers see it pointed at until then.
            pointed = [current["file"]] if current else []
            _remove_stale_files(self.path, keep={vectors["file"], *pointed, *([replaced.name] if replaced else [])})
        if replaced is not None:
            with contextlib.suppress(OSError):  # already gone, or open elsewhere (Windows): a later save tries again
                replaced.unlink(missing_ok=True)

    def _compact(self) -> bool:
        """Copy the live rows to a new vector file and renumber the records' rows, in one transaction.

        The copy is made outside the write lock; if a write committed meanwhile, it is dropped and
        False returned (the next maintenance tries again). Other processes reading the old file keep
        their memory map of it (unlinked files stay readable); one that opens it too late starts its
        read over (`_in_snapshot`).
        """
        rows = self._in_snapshot(self._synced_rows)
        old = self._vectors
        if old is None:
            return False
        generation = rows.generation
        live = np.flatnonzero(rows.seqs >= 0)
        name = f"{self.path.name}{_VECTORS_INFIX}{uuid.uuid4().hex[:8]}"
        logger.info("compacting the vectors of %s: %d of %d rows are live", self.path, len(live), rows.rows)
        copy = VectorFile(self.path.parent / name, old.dim, writable=True, create=True)
        done = False
        try:
            for start in range(0, len(live), BLOCK_ROWS):
                copy.write(start, old.read(live[start : start + BLOCK_ROWS]), sync=False)
            copy.sync()
            with self._write() as conn:
                if _read_generation(conn) == generation:
                    conn.executemany(
                        "UPDATE records SET row = ? WHERE seq = ?",
                        zip(range(len(live)), rows.seqs[live].tolist(), strict=True),
                    )
                    conn.execute("DELETE FROM meta WHERE key = ?", (_ANN,))
                    _put_meta(conn, {_GENERATION: generation + 1, _VECTORS: {"file": name, "rows": len(live)}})
                    done = True
        finally:
            copy.close()
            if not done:
                copy.path.unlink(missing_ok=True)
        if done:
            self._forget_vectors()
            old.path.unlink(missing_ok=True)
            _remove_stale_files(self.path, keep={name})
        return done

    def _allowed_rows(self, conn: sqlite3.Connection, where: Where) -> Seqs:
        """The rows of records matching `where`, cached per write generation."""
        key = (self._rows.generation, where)
        if key in self._filters:
            return self._filters[key]
        seqs: Seqs | None = None
        for name, values in where:
            matching = self._facet(conn, name, self._rows.generation).seqs(values)
            seqs = matching if seqs is None else np.intersect1d(seqs, matching, assume_unique=True)
        assert seqs is not None
        rows = self._rows.positions_of(seqs)
        self._filters[key] = rows
        if len(self._filters) > _FILTER_CACHE_SIZE:
            self._filters.popitem(last=False)
        return rows

    def _facet(self, conn: sqlite3.Connection, key: str, generation: int) -> Facet:
        """The value lists of metadata `key` at `generation`: appended to after inserts, rebuilt after deletes."""
        facet = self._facets.get(key)
        query = "SELECT r.seq, m.type, m.atom, m.value FROM records AS r, json_each(r.metadata) AS m WHERE m.key = ?"
        if facet is not None and facet.generation == generation:
            return facet
        if facet is not None and not _rewritten_since(conn, facet.generation, facet.max_seq):
            facet.add(conn.execute(query + " AND r.generation > ?", (key, facet.generation)), generation)
            return facet
        facet = Facet(key)
        facet.add(conn.execute(query, (key,)), generation)
        self._facets[key] = facet
        return facet

    def _hits(self, found: Found) -> list[list[SearchHit]]:
        """Search results as hits carrying each record's id and metadata."""
        valid = found.positions >= 0
        seq_rows = np.where(valid, self._rows.seqs[np.where(valid, found.positions, 0)], -1).tolist()
        records = json.loads(self._texts.document([seq for row in seq_rows for seq in row if seq >= 0]))
        results = []
        taken = 0
        for row_seqs, row_scores in zip(seq_rows, found.scores.tolist(), strict=True):
            hits = []
            for seq, score in zip(row_seqs, row_scores, strict=True):
                if seq >= 0:
                    record_id, metadata = records[taken]
                    taken += 1
                    hits.append(SearchHit(id=record_id, score=min(1.0, max(-1.0, score)), metadata=metadata))
            results.append(hits)
        return results

    def _describe(self, index: SearchIndex) -> dict[str, Any]:
        if not isinstance(index, ExactIndex):
            return {
                **index.info, "engine": index.kind, "ef_search": index.ef_search, "count": self._rows.count,
                "rows": index.rows, "generation": self._rows.generation,
            }  # fmt: skip
        described: dict[str, Any] = {
            "engine": "exact",
            "count": self._rows.count,
            "recall_at_10": 1.0,
            "recall_method": "exact search scores every vector",
            "generation": self._rows.generation,
        }
        if self.ann_threshold is not None and self._rows.count > self.ann_threshold and faiss_module() is None:
            described["note"] = "faiss is not installed: pip install imageloop[ann] for an HNSW index"
        return described


class _RecordTexts:
    """Every record's id and metadata as the UTF-8 JSON fragment `"id",{metadata}`, by seq, at one generation.

    Hits are materialised from here rather than SQLite: one json.loads for all of a search's hits
    costs ~10 us where fetching their rows costs ~50 us, next to an HNSW search of ~0.1-1 ms. The
    price is memory: about the size of the `records` table (~100-250 MiB at a million records).
    """

    def __init__(self) -> None:
        self._reset()

    def _reset(self) -> None:
        self.generation = -1
        self._buffer = bytearray()
        self._start = np.zeros(0, dtype=np.int64)  # by seq; where a record's text begins in `_buffer`
        self._end = np.zeros(0, dtype=np.int64)
        self._garbage = 0  # bytes of replaced or deleted records still in `_buffer`

    def sync(self, conn: sqlite3.Connection, generation: int) -> None:
        """Catch up with the records written or deleted since this object's generation."""
        if self.generation == generation:
            return
        if self.generation < 0 or 2 * self._garbage > len(self._buffer):
            # From scratch: first use, or once replaced texts take half the buffer.
            self._reset()
            rows = conn.execute(f"SELECT seq, {_RECORD_TEXT} FROM records ORDER BY seq")
        else:
            for (seq,) in conn.execute("SELECT seq FROM deletions WHERE generation > ?", (self.generation,)):
                self._forget(seq)
            rows = conn.execute(f"SELECT seq, {_RECORD_TEXT} FROM records WHERE generation > ?", (self.generation,))
        while chunk := rows.fetchmany(65536):
            self._append([seq for seq, _ in chunk], [text.encode() for _, text in chunk])
        self.generation = generation

    def document(self, seqs: Sequence[int]) -> bytes:
        """A JSON array of [id, metadata] for `seqs`, in their order."""
        buffer, start, end = self._buffer, self._start, self._end
        return b"[[" + b"],[".join(buffer[start[seq] : end[seq]] for seq in seqs) + b"]]"

    def _append(self, seqs: list[int], texts: list[bytes]) -> None:
        if not seqs:
            return
        if max(seqs) >= len(self._start):
            size = max(max(seqs) + 1, 2 * len(self._start))
            self._start = np.concatenate([self._start, np.zeros(size - len(self._start), dtype=np.int64)])
            self._end = np.concatenate([self._end, np.zeros(size - len(self._end), dtype=np.int64)])
        replaced = self._end[seqs] - self._start[seqs]
        self._garbage += int(replaced.sum())
        lengths = np.fromiter(map(len, texts), dtype=np.int64, count=len(texts))
        ends = len(self._buffer) + np.cumsum(lengths)
        self._start[seqs], self._end[seqs] = ends - lengths, ends
        self._buffer += b"".join(texts)

    def _forget(self, seq: int) -> None:
        if seq < len(self._start):
            self._garbage += int(self._end[seq] - self._start[seq])
            self._start[seq] = self._end[seq] = 0


def _open_store(path: Path) -> tuple[sqlite3.Connection, bool]:
    """A connection to the store at `path` (created if new, migrated if older) and whether it is read-only.

    ImageloopError for anything that is not a store. A store that cannot be opened for writing (a
    read-only disk or folder) is opened read-only; "database is locked" while another process creates
    or converts the store is waited out for up to `_OPEN_PATIENCE_S`.
    """
    if path.is_dir():
        raise ImageloopError(f"{path} is a folder, not an imageloop vector store file")
    if path.is_file() and path.stat().st_size > 0:
        with path.open("rb") as f:
            if f.read(16) != b"SQLite format 3\x00":
                raise ImageloopError(f"{path} is not an imageloop vector store: it is not an SQLite database")
    deadline = time.monotonic() + _OPEN_PATIENCE_S
    delay = 0.01
    while True:
        try:
            return _open_writable(path), False
        except sqlite3.OperationalError as e:
            name = getattr(e, "sqlite_errorname", "") or ""
            if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) and time.monotonic() < deadline:
                time.sleep(delay * (1 + random.random()))  # jittered, so waiting processes do not collide again
                delay = min(2 * delay, 0.5)
                continue
            if name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM")) and _has_data(path):
                return _open_read_only(path), True
            raise store_error(e, path) from e
        except sqlite3.DatabaseError as e:
            raise IndexDamagedError(
                f"{path} is not a readable imageloop vector store ({e}): delete {path.parent} and re-index"
            ) from e
        except OSError as e:  # writing the vector file of a migration
            raise StorageError(os_error_message(e, f"migrating the index at {path.parent}")) from e


def _has_data(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _open_writable(path: Path) -> sqlite3.Connection:
    """Open (or create, or migrate) the store for reading and writing; SQLite's errors pass through."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    try:
        # Checked before anything is written: a foreign database is refused untouched.
        _layout_action(conn, path)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Decided again under the write lock: another process may have created or migrated it meanwhile.
            action = _layout_action(conn, path)
            if action == "create":
                for statement in _SCHEMA:
                    conn.execute(statement)
            elif action == "migrate":
                _migrate(conn, path)
            if action != "open":
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {_LAYOUT}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        if action == "migrate":
            _after_migration(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _open_read_only(path: Path) -> sqlite3.Connection:
    """Open a store that may not be written (a read-only disk, folder or file) for reading only.

    SQLite reads a WAL store read-only when its `-shm` and `-wal` files exist; a cleanly closed store has
    neither, and on a read-only disk they cannot be created, so it is opened as immutable (no locks, no
    WAL): right for a disk nobody writes. A store with unmerged writes in its `-wal` cannot be read that
    way without losing them, and is refused with what to do.
    """
    uri = "file:" + quote(str(path.resolve()))
    try:
        conn = sqlite3.connect(uri + "?mode=ro", uri=True, isolation_level=None, check_same_thread=False)
        try:
            _layout_action(conn, path)
        except BaseException:
            conn.close()
            raise
    except sqlite3.OperationalError as e:
        wal = path.with_name(path.name + "-wal")
        if _has_data(wal):
            raise StorageError(
                f"the index at {path.parent} is read-only here and holds writes not yet merged into it "
                f"({wal.name}): open it once where it is writable, or index a writable copy"
            ) from e
        conn = sqlite3.connect(uri + "?immutable=1", uri=True, isolation_level=None, check_same_thread=False)
    try:
        if _layout_action(conn, path) != "open":
            raise ImageloopError(
                f"{path} is read-only and in an older imageloop layout: open it once where it is writable "
                "(any imageloop command on it migrates it in place)"
            )
    except sqlite3.DatabaseError as e:
        conn.close()
        raise store_error(e, path) from e
    except BaseException:
        conn.close()
        raise
    return conn


def _layout_action(conn: sqlite3.Connection, path: Path) -> str:
    """What opening needs: "open" a store, "create" one in an empty database, "migrate" an earlier layout.

    Read in one transaction: another process creating the store commits its tables and its application
    id together, and two separate reads could see one without the other.
    """
    if not conn.in_transaction:
        conn.execute("BEGIN")
        try:
            return _layout_action(conn, path)
        finally:
            conn.execute("COMMIT")
    (application_id,) = conn.execute("PRAGMA application_id").fetchone()
    (layout,) = conn.execute("PRAGMA user_version").fetchone()
    tables = {
        name
        for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
    }
    if application_id == _APPLICATION_ID and tables >= _TABLES:
        if layout > _LAYOUT:
            raise ImageloopError(f"{path} was written by a newer imageloop (store layout {layout}): upgrade imageloop")
        return "migrate" if "vectors" in tables else "open"  # the second layout kept vectors in SQLite
    if application_id == 0 and not tables:
        return "create"
    if application_id == 0 and tables == {"vectors", "meta"}:  # the first layout
        columns = [row[1] for row in conn.execute("PRAGMA table_info(vectors)")]
        if columns == _LAYOUT_1_COLUMNS:
            return "migrate"
    listed = ", ".join(sorted(tables)) or "none"
    raise ImageloopError(f"{path} is an SQLite database but not an imageloop vector store (its tables: {listed})")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring a store of the first or second layout to this one, in the open transaction.

    The vectors move out of SQLite into a new vector file (written before the transaction commits;
    a killed migration leaves the store as it was and an unreferenced file that is later deleted).
    The second layout's HNSW files, which held the vectors again, are dropped after the commit.
    """
    logger.info("migrating %s to store layout %d: its vectors move to a file of their own (once)", path, _LAYOUT)
    tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if "records" not in tables:  # the first layout: one table of id, vector, metadata
        generation = _read_generation(conn)
        conn.execute("ALTER TABLE vectors RENAME TO vectors_layout_1")
        for statement in _SCHEMA:
            conn.execute(statement)
        conn.execute(
            "INSERT INTO records (id, metadata, generation, row, norm) "
            "SELECT id, metadata, ?, -1, 1.0 FROM vectors_layout_1 ORDER BY id",
            (generation,),
        )
        source = (
            "SELECT r.seq, old.vector FROM records AS r JOIN vectors_layout_1 AS old ON old.id = r.id ORDER BY r.seq"
        )
        old_table = "vectors_layout_1"
    else:
        conn.execute("ALTER TABLE records ADD COLUMN row INTEGER NOT NULL DEFAULT -1")
        conn.execute("ALTER TABLE records ADD COLUMN norm REAL NOT NULL DEFAULT 1.0")
        conn.execute("ALTER TABLE deletions ADD COLUMN row INTEGER NOT NULL DEFAULT -1")
        source = "SELECT r.seq, v.vector FROM records AS r JOIN vectors AS v USING (seq) ORDER BY r.seq"
        old_table = "vectors"
    dim = _read_meta(conn, _DIM)
    if dim is not None:
        name = f"{path.name}{_VECTORS_INFIX}{uuid.uuid4().hex[:8]}"
        vectors = VectorFile(path.parent / name, int(dim), writable=True, create=True)
        rows = 0
        try:
            cursor = conn.execute(source)
            while chunk := cursor.fetchmany(8192):
                matrix = np.frombuffer(b"".join(blob for _, blob in chunk), dtype=DTYPE).reshape(-1, int(dim))
                norms = np.sqrt(np.einsum("ij,ij->i", matrix, matrix))
                vectors.write(rows, matrix / norms[:, None], sync=False)
                conn.executemany(
                    "UPDATE records SET row = ?, norm = ? WHERE seq = ?",
                    zip(range(rows, rows + len(chunk)), norms.tolist(), [seq for seq, _ in chunk], strict=True),
                )
                rows += len(chunk)
            vectors.sync()
        finally:
            vectors.close()
        _put_meta(conn, {_VECTORS: {"file": name, "rows": rows}})
    conn.execute(f"DROP TABLE {old_table}")
    conn.execute("DELETE FROM meta WHERE key = ?", (_ANN,))


def _after_migration(conn: sqlite3.Connection, path: Path) -> None:
    """Delete the second layout's HNSW files and give the dropped vectors' pages back to the disk."""
    for leftover in [*path.parent.glob(f"{path.name}{_LAYOUT_2_HNSW_INFIX}*"),
                     *path.parent.glob(f".{path.name}{_LAYOUT_2_HNSW_INFIX}*")]:  # fmt: skip
        leftover.unlink(missing_ok=True)
    try:
        conn.execute("VACUUM")
    except sqlite3.OperationalError as e:  # another process is reading: the free pages are reused instead
        logger.info("could not VACUUM %s after migrating it (%s)", path, e)


def _row_changes(conn: sqlite3.Connection, generation: int, *, since: RowMap | None) -> Changes:
    """What happened to the vector file's rows after `since` (everything when None), as of `generation`."""
    pointer = _read_meta(conn, _VECTORS)
    rows = 0 if pointer is None else int(pointer["rows"])
    if since is None:
        written = conn.execute("SELECT row, seq FROM records")
        dead: Seqs = np.zeros(0, dtype=np.int64)
    else:
        # A record whose vector was replaced has a row past the ones already known; one whose metadata
        # alone changed keeps its row.
        written = conn.execute(
            "SELECT row, seq FROM records WHERE generation > ? AND row >= ?", (since.generation, since.rows)
        )
        dead = _int_columns(
            conn.execute("SELECT row FROM deletions WHERE generation > ? AND row >= 0", (since.generation,)), 1
        )[0]
    written_rows, written_seqs = _int_columns(written, 2)
    order = np.argsort(written_rows)
    return Changes(generation, rows, written_rows[order], written_seqs[order], dead, full=since is None)


def _int_columns(cursor: sqlite3.Cursor, width: int) -> list[Seqs]:
    """The integer columns of a query's rows as arrays, read in chunks: a million rows never sit in memory as tuples."""
    chunks = [np.array(chunk, dtype=np.int64).reshape(-1, width) for chunk in iter(lambda: cursor.fetchmany(65536), [])]
    table = np.concatenate(chunks) if chunks else np.zeros((0, width), dtype=np.int64)
    return [table[:, column] for column in range(width)]


def _rewritten_since(conn: sqlite3.Connection, generation: int, max_seq: int) -> bool:
    """Whether records up to `max_seq` were deleted or replaced after `generation` (appends do not count)."""
    deleted = conn.execute("SELECT 1 FROM deletions WHERE generation > ? LIMIT 1", (generation,)).fetchone()
    replaced = conn.execute(
        "SELECT 1 FROM records WHERE generation > ? AND seq <= ? LIMIT 1", (generation, max_seq)
    ).fetchone()
    return deleted is not None or replaced is not None


def _remove_stale_files(store_path: Path, *, keep: set[str]) -> None:
    """Delete the files beside the store that it no longer refers to.

    A saved ANN index covering no more rows than the kept one is superseded at once (a save calls
    this holding the write lock: another process's save of it, if in progress, finds it gone before
    pointing at it); any other unreferenced file (a vector file or index of another process's
    compaction or save in progress, or left by a killed one) only once older than `_STALE_SECONDS`.
    """
    prefix = store_path.name
    kept_rows = max((_ann_rows(name, prefix) for name in keep), default=-1)
    now = time.time()
    for candidate in [*store_path.parent.glob(f"{prefix}-*"), *store_path.parent.glob(f".{prefix}-*")]:
        name = candidate.name.lstrip(".")
        if name in keep or not any(name.startswith(prefix + infix) for infix in (_ANN_INFIX, _VECTORS_INFIX)):
            continue  # ours to keep, or not ours (the SQLite -wal and -shm files)
        superseded = not candidate.name.endswith(".tmp") and 0 <= _ann_rows(name, prefix) <= kept_rows
        try:
            if superseded or now - candidate.stat().st_mtime > _STALE_SECONDS:
                candidate.unlink()
        except OSError:
            continue  # already gone, or open elsewhere (Windows): a later save tries again


def _ann_rows(name: str, prefix: str) -> int:
    """The rows a saved ANN index file covers, from its name `<store>-ann-<engine>-<rows>-<id>`; -1 if not one."""
    if not name.startswith(prefix + _ANN_INFIX):
        return -1
    parts = name[len(prefix + _ANN_INFIX) :].split("-")
    return int(parts[1]) if len(parts) == 3 and parts[1].isascii() and parts[1].isdigit() else -1


def _read_meta(conn: sqlite3.Connection, key: str) -> Any:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else json.loads(row[0])


def _read_generation(conn: sqlite3.Connection) -> int:
    return int(_read_meta(conn, _GENERATION) or 0)


def _put_meta(conn: sqlite3.Connection, values: Mapping[str, Any]) -> None:
    conn.executemany(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(key, json.dumps(value)) for key, value in values.items()],
    )


def _warn_without_faiss(count: int) -> None:
    """Say once per process that a large store is searched exactly because faiss is missing."""
    global _warned_without_faiss
    if not _warned_without_faiss:
        _warned_without_faiss = True
        logger.warning(
            "faiss is not installed: searching %d vectors exactly (slower past ~100,000); "
            "pip install imageloop[ann] for an HNSW index",
            count,
        )
