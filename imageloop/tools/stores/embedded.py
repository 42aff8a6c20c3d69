"""The default vector store: one SQLite file on local disk, no server; exact search, HNSW when large.

SQLite (WAL) is the source of truth for records and vectors, and every write is one transaction.
Searches run over an index derived from it: every vector in a numpy matrix (exact search) while the
store holds at most `ann_threshold` records, a FAISS HNSW index above that (`pip install
imageloop[ann]`). The index follows the store's write generation: another process's writes are
picked up by reading only the rows written since, and the HNSW index is saved beside the store
(`<store>-hnsw-*`, written whole then renamed, and referenced from the store's meta in a
transaction) so a reopened store does not rebuild it. A killed process therefore leaves every
committed batch visible, no partial batch, and at worst a stale index that is caught up on open.

What the disk does to it is said in one line (`StorageError`): a store on a read-only disk or folder
opens read-only (searches work, writes say why they cannot); several processes creating one store at
once wait for each other rather than fail; a full disk, a store left locked and page-level damage
(`IndexDamagedError`, with "delete the index folder and re-index") are named as such.

Why these engines, measured with bench/retrieval.py on 2 shared cores (d=512, k=10, p50 of one
query): a numpy scan of 100,000 vectors takes 6-17 ms (bare FAISS IndexFlatIP 14-63 ms) and needs
no build, no second copy of the vectors and has recall 1; at a million a scan takes 80 ms while
FAISS HNSW (M=32) answers in 2.6 ms at recall@10 0.974, for a 6-minute build. Our searches add ~0.1-0.2
ms to bare FAISS (ids, metadata, the staleness check); hits come from an in-memory copy of the
records' ids and metadata, not from SQLite. HNSW variants of other engines measured here earlier
(usearch, Chroma, LanceDB, Milvus Lite, sqlite-vec) were slower, less accurate or much larger.
"""

from __future__ import annotations

import functools
import json
import logging
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
from imageloop.tools.stores.ann_index import AnnIndexUnreadable, HnswIndex, HnswSettings, faiss_module
from imageloop.tools.stores.checks import check_k, checked_vector, unit_vector
from imageloop.tools.stores.metadata_filter import Facet, Where, parse_where
from imageloop.tools.stores.vector_search import Changes, ExactIndex, Found, Matrix, Seqs, normalise_rows

logger = logging.getLogger(__name__)

# Above this many records a store searches with HNSW (when faiss is installed). Measured: exact
# search at 100,000 vectors takes ~6-17 ms here, HNSW ~1 ms but ~30 s to build and recall 0.98;
# an embedder call costs more than either, so exact search (recall 1, no build) is kept up to here.
DEFAULT_ANN_THRESHOLD = 100_000

# Vectors are stored as little-endian float32 whatever the machine, so a store file is portable.
_BLOB_DTYPE = np.dtype("<f4")

# Meta keys the store writes itself. "generation" counts committed vector writes and stamps every
# index derived from the rows; "dim" is fixed by the first upsert (or preset with set_meta before
# it) and never changes; "ann" points at the saved HNSW file and says how it was built.
_GENERATION = "generation"
_DIM = "dim"
_ANN = "ann"

# A 2 KiB vector (d=512) plus its row header does not fit twice in SQLite's default 4 KiB page, so
# half of every page would be empty; 16 KiB pages hold seven (88% full, 94% at d=384 or d=768).
_PAGE_SIZE = 16384

# PRAGMA application_id marks an SQLite file as an imageloop vector store; user_version is the layout.
_APPLICATION_ID = 0x494C5653  # "ILVS"
_LAYOUT = 2

# `seq` numbers records for the derived indexes: AUTOINCREMENT never reuses one, and an INTEGER
# PRIMARY KEY survives VACUUM. Each record carries the generation that last wrote it and `deletions`
# records what each generation removed, so an index catches up by reading only what changed.
# Vectors (2 KiB at d=512) live in a table of their own: the narrow `records` rows that a search
# reads for its hits, and that filters scan, then sit ~100 to a page and stay in cache.
_SCHEMA = (
    "CREATE TABLE records (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE, "
    "metadata TEXT NOT NULL, generation INTEGER NOT NULL)",
    "CREATE INDEX records_by_generation ON records (generation)",
    "CREATE TABLE vectors (seq INTEGER PRIMARY KEY, vector BLOB NOT NULL)",
    "CREATE TABLE deletions (seq INTEGER NOT NULL, generation INTEGER NOT NULL)",
    "CREATE INDEX deletions_by_generation ON deletions (generation)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_TABLES = {"records", "vectors", "deletions", "meta"}
# The first layout (id TEXT PRIMARY KEY, vector, metadata) is migrated in place on open.
_LAYOUT_1_COLUMNS = ["id", "vector", "metadata"]

# The HNSW index is rebuilt once this share of its positions are deleted or replaced rows, and saved
# again once this share of its positions were added since the file it came from.
_MAX_DEAD_FRACTION = 0.2
_RESAVE_FRACTION = 0.05
# A leftover HNSW file (from a killed save) older than this is deleted by the next save.
_STALE_SECONDS = 3600.0
_HNSW_INFIX = "-hnsw-"
_FILTER_CACHE_SIZE = 32
# A record as the JSON fragment `"id",{metadata}`: hits are read from these, kept in memory.
_RECORD_TEXT = "json_quote(id) || ',' || metadata"

# How long opening waits for other processes that hold the store (creating it, converting it to WAL):
# SQLite answers "database is locked" there without calling its busy handler, so opening retries.
_OPEN_PATIENCE_S = 30.0

_warned_without_faiss = False

SearchIndex = ExactIndex | HnswIndex
P = ParamSpec("P")
R = TypeVar("R")


def _translated(
    method: Callable[Concatenate[EmbeddedVectorStore, P], R],
) -> Callable[Concatenate[EmbeddedVectorStore, P], R]:
    """Turn SQLite's and the disk's errors inside a store method into one-line StorageErrors."""

    def wrapper(self: EmbeddedVectorStore, /, *args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.Error as e:
            raise store_error(e, self.path) from e
        except OSError as e:  # the HNSW file beside the store
            raise StorageError(os_error_message(e, f"writing the search index beside {self.path}")) from e

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
    """A `VectorStore` in one SQLite file; every write is one transaction, all or nothing.

    `ann_threshold`: above this many records, search with HNSW (None: always exact).
    `hnsw`: how the HNSW index is built and searched (efSearch is tuned to a target recall by default).
    """

    def __init__(
        self,
        path: Path,
        *,
        ann_threshold: int | None = DEFAULT_ANN_THRESHOLD,
        hnsw: HnswSettings | None = None,
    ) -> None:
        self.path = Path(path)
        self.ann_threshold = ann_threshold
        self.hnsw = hnsw or HnswSettings()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(os_error_message(e, f"creating the index folder {self.path.parent}")) from e
        # Autocommit mode (isolation_level=None): transactions are opened explicitly, so a batch is
        # never split by the sqlite3 module's implicit commits. One connection is shared by threads
        # (LangGraph runs sync nodes in a pool) and guarded by `_lock`.
        self._conn, self.read_only = _open_store(self.path)
        self._lock = threading.RLock()
        self._index: SearchIndex | None = None
        self._texts = _RecordTexts()
        self._facets: dict[str, Facet] = {}
        self._filters: OrderedDict[tuple[int, Where], Seqs] = OrderedDict()

    def close(self) -> None:
        """Release the database connection and the in-memory index."""
        with self._lock:
            self._conn.close()
            self._index = None
            self._texts = _RecordTexts()
            self._facets.clear()
            self._filters.clear()

    @_translated
    def get_meta(self) -> dict[str, Any]:
        """All meta values (JSON-decoded), including the store's own `dim`, `generation` and `ann`."""
        with self._lock:
            rows = self._conn.execute("SELECT key, value FROM meta").fetchall()
        return {key: json.loads(value) for key, value in rows}

    @_translated
    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Write meta values in one transaction; `dim` may only be set while unset or unchanged."""
        for key in (_GENERATION, _ANN):
            if key in values:
                raise ValueError(f"meta key {key!r} is maintained by the store")
        with self._write() as conn:
            if _DIM in values:
                self._check_dim(conn, int(values[_DIM]))
            _put_meta(conn, values)

    @_translated
    def upsert(self, records: Sequence[VectorRecord]) -> None:
        """Insert or replace `records` atomically: a failure or a killed process leaves none visible."""
        if not records:
            return
        with self._write() as conn:
            generation = _read_generation(conn) + 1
            # Keyed by id: a batch naming one id twice stores its last record, like successive upserts.
            rows: dict[str, tuple[str, bytes]] = {}
            checked_dims: set[int] = set()
            for record in records:
                # Validation and serialisation happen inside the transaction on purpose: a bad
                # record anywhere in the batch rolls back the records before it as well.
                vector = checked_vector(record.vector, f"vector for id {record.id!r}")
                if vector.shape[0] not in checked_dims:
                    self._check_dim(conn, vector.shape[0])
                    checked_dims.add(vector.shape[0])
                rows[record.id] = (json.dumps(dict(record.metadata)), vector.astype(_BLOB_DTYPE).tobytes())
            conn.executemany(
                "INSERT INTO records (id, metadata, generation) VALUES (?, ?, ?) ON CONFLICT(id) "
                "DO UPDATE SET metadata = excluded.metadata, generation = excluded.generation",
                [(record_id, metadata, generation) for record_id, (metadata, _) in rows.items()],
            )
            written = conn.execute("SELECT seq, id FROM records WHERE generation = ?", (generation,))
            conn.executemany(
                "INSERT OR REPLACE INTO vectors (seq, vector) VALUES (?, ?)",
                [(seq, rows[record_id][1]) for seq, record_id in written],
            )
            _put_meta(conn, {_GENERATION: generation})

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
        """`search` for each of `vectors`, in one batch: one matrix product or one parallel HNSW search."""
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
        records = []
        with self._lock:
            for record_id in ids:
                row = self._conn.execute(
                    "SELECT v.vector, r.metadata FROM records AS r JOIN vectors AS v USING (seq) WHERE r.id = ?",
                    (record_id,),
                ).fetchone()
                if row is not None:
                    vector = np.frombuffer(row[0], dtype=_BLOB_DTYPE).astype(np.float32)
                    records.append(VectorRecord(record_id, vector, json.loads(row[1])))
        return records

    @_translated
    def delete(self, ids: Sequence[str]) -> None:
        """Remove `ids` in one transaction; unknown ids are ignored."""
        if not ids:
            return
        with self._write() as conn:
            generation = _read_generation(conn) + 1
            for record_id in ids:
                row = conn.execute("SELECT seq FROM records WHERE id = ?", (record_id,)).fetchone()
                if row is not None:
                    conn.execute("DELETE FROM records WHERE seq = ?", row)
                    conn.execute("DELETE FROM vectors WHERE seq = ?", row)
                    conn.execute("INSERT INTO deletions (seq, generation) VALUES (?, ?)", (row[0], generation))
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
        """Read every page of the store (SQLite's quick_check, ~1 s per GB): IndexDamagedError if any is corrupt.

        A count alone can come from an intact index b-tree while the rows' own pages are damaged.
        """
        with self._lock:
            problems = [row[0] for row in self._conn.execute("PRAGMA quick_check(3)")]
        if problems != ["ok"]:
            folder = self.path.parent
            raise IndexDamagedError(
                f"the index at {folder} is damaged ({'; '.join(problems)[:200]}): delete {folder} and re-index"
            )

    @_translated
    def refresh(self, *, rebuild: bool = False) -> dict[str, Any]:
        """Bring the search index up to date now rather than at the next search, and save it; returns `ann_info()`.

        Past `ann_threshold` this builds (or, with `rebuild`, rebuilds) the HNSW index: minutes at a
        million vectors, so an indexer calls it once after its last batch.
        """
        with self._lock:
            with self._reading() as conn:
                index = self._synced_index(conn)
                if rebuild and isinstance(index, HnswIndex):
                    index = self._install(self._build_hnsw(index))
            self._save_hnsw_if_due(force=True)
            return self._describe(index)

    @_translated
    def ann_info(self) -> dict[str, Any]:
        """How searches run now: `engine` ("exact" or "faiss-hnsw"), `count`, `recall_at_10` and how it was measured.

        Brings the index up to date first, as the next search would.
        """
        with self._lock:
            with self._reading() as conn:
                index = self._synced_index(conn)
            self._save_hnsw_if_due()
            return self._describe(index)

    def _search(self, queries: Matrix, k: int, where: Mapping[str, Any] | None) -> list[list[SearchHit]]:
        """Search unit `queries` over the index and records as of one write generation of the store."""
        parsed = parse_where(where) if where else None
        with self._lock:
            # The common case reads one row of SQLite: the generation, to see that the in-memory
            # index, hit texts and (cached) filter are all current. Otherwise they are brought up
            # to date in one read transaction.
            index = self._index
            if index is None or not self._is_current(index, parsed):
                with self._reading() as conn:
                    index = self._synced_index(conn)
                    self._texts.sync(conn, index.generation)
                    if parsed is not None:
                        self._allowed_positions(conn, index, parsed)
            assert index is not None
            if index.count == 0:
                return [[] for _ in queries]
            if queries.shape[1] != index.dim:
                raise ImageloopError(
                    f"query vector has dimension {queries.shape[1]} but the store at {self.path} "
                    f"holds dimension {index.dim}"
                )
            allowed = None
            if parsed is not None:
                allowed = self._filters[(index.generation, parsed)]
                self._filters.move_to_end((index.generation, parsed))
                if len(allowed) == 0:
                    return [[] for _ in queries]
            hits = self._hits(index, index.search(queries, k, allowed))
            self._save_hnsw_if_due()
        return hits

    def _is_current(self, index: SearchIndex, where: Where | None) -> bool:
        """Whether `index`, the hit texts and the filter for `where` are all at the store's generation."""
        if not index.generation == self._texts.generation == _read_generation(self._conn):
            return False
        return where is None or (index.generation, where) in self._filters

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

    def _check_dim(self, conn: sqlite3.Connection, dim: int) -> None:
        """Fix the store's dimension on first use; refuse any other dimension afterwards."""
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (_DIM,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (_DIM, json.dumps(dim)))
        elif json.loads(row[0]) != dim:
            raise ImageloopError(
                f"vector has dimension {dim} but the store at {self.path} holds dimension {json.loads(row[0])}"
            )

    def _synced_index(self, conn: sqlite3.Connection) -> SearchIndex:
        """The search index at the store's current generation: loaded, caught up, upgraded or rebuilt as needed."""
        generation = _read_generation(conn)
        index = self._index
        if index is not None and index.generation == generation:
            return index
        if index is None or index.count == 0:
            # An empty index starts over: cheap, and it learns the dimension from the first rows.
            index = self._open_index(conn, generation)
        if index.generation != generation:
            index.apply(_changes(conn, since=index.generation, generation=generation))
        if isinstance(index, ExactIndex) and self._wants_hnsw(index.count):
            if faiss_module() is not None:
                index = self._build_hnsw(index)
            else:
                _warn_without_faiss(index.count)
        elif isinstance(index, HnswIndex) and index.dead_fraction > _MAX_DEAD_FRACTION:
            index = self._build_hnsw(index)
        return self._install(index)

    def _install(self, index: SearchIndex) -> SearchIndex:
        """Make `index` the one searched; cached filters hold positions of the index they were made for."""
        if index is not self._index:
            self._filters.clear()
            self._index = index
        return index

    def _open_index(self, conn: sqlite3.Connection, generation: int) -> SearchIndex:
        """The saved HNSW index when the store is large and has a readable one, else every vector loaded exactly."""
        pointer = _read_meta(conn, _ANN)
        if pointer is not None and self._wants_hnsw(int(pointer["count"])) and faiss_module() is not None:
            try:
                saved = HnswIndex.load(self.path.parent / pointer["file"], self.hnsw)
            except AnnIndexUnreadable as e:
                logger.warning("%s; rebuilding the HNSW index from the store", e)
            else:
                if saved.generation == pointer["generation"] <= generation:
                    return saved
                logger.warning("HNSW file %s does not match the store; rebuilding it", pointer["file"])
        dim = _read_meta(conn, _DIM)
        index = ExactIndex(int(dim or 0))
        index.apply(_changes(conn, since=0, generation=generation))
        return index

    def _wants_hnsw(self, count: int) -> bool:
        return self.ann_threshold is not None and count > self.ann_threshold

    def _build_hnsw(self, index: SearchIndex) -> HnswIndex:
        """A fresh HNSW index over `index`'s live vectors (saved after the search that asked for it)."""
        logger.info("building an HNSW index over %d vectors of %s (minutes at a million)", index.count, self.path)
        seqs, vectors = index.seqs, index.vectors()
        if index.count < len(seqs):  # a copy of the live rows only when some are dead
            live = seqs >= 0
            seqs, vectors = seqs[live], vectors[live]
        return HnswIndex.build(seqs, vectors, index.generation, self.hnsw)

    def _save_hnsw_if_due(self, *, force: bool = False) -> None:
        """Save the HNSW index when it was built here or grew by `_RESAVE_FRACTION` since its file."""
        index = self._index
        if not isinstance(index, HnswIndex) or self.read_only:
            return
        grown = len(index.seqs) - index.saved_positions >= _RESAVE_FRACTION * len(index.seqs)
        if index.saved_positions == 0 or grown or (force and _saved_generation(self._conn) < index.generation):
            self._save_hnsw(index)

    def _save_hnsw(self, index: HnswIndex) -> None:
        """Write the index to a new file, then point the store's meta at it in one transaction."""
        name = f"{self.path.name}{_HNSW_INFIX}{index.generation}-{uuid.uuid4().hex[:8]}"
        index.save(self.path.parent / name)
        with self._write() as conn:
            current = _read_meta(conn, _ANN)
            # Another process may have saved a newer index meanwhile: the newest one wins.
            if current is None or current["generation"] < index.generation:
                current = {"file": name, "generation": index.generation, "count": index.count, **index.info}
                _put_meta(conn, {_ANN: current})
        _remove_stale_hnsw_files(self.path, keep=current["file"], keep_generation=current["generation"])

    def _allowed_positions(self, conn: sqlite3.Connection, index: SearchIndex, where: Where) -> Seqs:
        """The index positions of records matching `where`, cached per write generation."""
        key = (index.generation, where)
        if key in self._filters:
            return self._filters[key]
        seqs: Seqs | None = None
        for name, values in where:
            matching = self._facet(conn, name, index.generation).seqs(values)
            seqs = matching if seqs is None else np.intersect1d(seqs, matching, assume_unique=True)
        assert seqs is not None
        positions = index.positions_of(seqs)
        self._filters[key] = positions
        if len(self._filters) > _FILTER_CACHE_SIZE:
            self._filters.popitem(last=False)
        return positions

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

    def _hits(self, index: SearchIndex, found: Found) -> list[list[SearchHit]]:
        """Search results as hits carrying each record's id and metadata."""
        valid = found.positions >= 0
        seq_rows = np.where(valid, index.seqs[np.where(valid, found.positions, 0)], -1).tolist()
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
        if isinstance(index, HnswIndex):
            return {**index.info, "ef_search": index.ef_search, "count": index.count, "generation": index.generation}
        described: dict[str, Any] = {
            "engine": "exact",
            "count": index.count,
            "recall_at_10": 1.0,
            "recall_method": "exact search scores every vector",
            "generation": index.generation,
        }
        if self._wants_hnsw(index.count) and faiss_module() is None:
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
    """A connection to the store at `path` (created if new) and whether it is read-only.

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


def _has_data(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _open_writable(path: Path) -> sqlite3.Connection:
    """Open (or create, or migrate) the store for reading and writing; SQLite's errors pass through."""
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
    try:
        # Checked before anything is written: a foreign database is refused untouched.
        if _layout_action(conn, path) == "create":
            conn.execute(f"PRAGMA page_size = {_PAGE_SIZE}")  # only possible before the first write
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Decided again under the write lock: another process may have created it meanwhile.
            action = _layout_action(conn, path)
            if action == "create":
                for statement in _SCHEMA:
                    conn.execute(statement)
            elif action == "migrate":
                _migrate_layout_1(conn)
            if action != "open":
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {_LAYOUT}")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
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
                f"{path} is read-only and not yet in this imageloop's layout: open it where it is writable"
            )
    except sqlite3.DatabaseError as e:
        conn.close()
        raise store_error(e, path) from e
    except BaseException:
        conn.close()
        raise
    return conn


def _layout_action(conn: sqlite3.Connection, path: Path) -> str:
    """What opening needs: "open" a store, "create" one in an empty database, "migrate" the first layout.

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
        return "open"
    if application_id == 0 and not tables:
        return "create"
    if application_id == 0 and tables == {"vectors", "meta"}:  # the first layout
        columns = [row[1] for row in conn.execute("PRAGMA table_info(vectors)")]
        if columns == _LAYOUT_1_COLUMNS:
            return "migrate"
    listed = ", ".join(sorted(tables)) or "none"
    raise ImageloopError(f"{path} is an SQLite database but not an imageloop vector store (its tables: {listed})")


def _migrate_layout_1(conn: sqlite3.Connection) -> None:
    """Copy a first-layout store (no seq, no generations) into the current layout, in the open transaction."""
    generation = _read_generation(conn)
    conn.execute("ALTER TABLE vectors RENAME TO vectors_layout_1")
    for statement in _SCHEMA:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO records (id, metadata, generation) SELECT id, metadata, ? FROM vectors_layout_1 ORDER BY id",
        (generation,),
    )
    conn.execute(
        "INSERT INTO vectors (seq, vector) SELECT r.seq, old.vector FROM records AS r "
        "JOIN vectors_layout_1 AS old ON old.id = r.id"
    )
    conn.execute("DROP TABLE vectors_layout_1")


def _changes(conn: sqlite3.Connection, *, since: int, generation: int) -> Changes:
    """What was written and deleted after generation `since` (everything when 0), with unit vectors."""
    dim = int(_read_meta(conn, _DIM) or 0)
    if since == 0:
        (n,) = conn.execute("SELECT COUNT(*) FROM vectors").fetchone()
        cursor = conn.execute("SELECT seq, vector FROM vectors ORDER BY seq")
        deleted = np.zeros(0, dtype=np.int64)
    else:
        (n,) = conn.execute("SELECT COUNT(*) FROM records WHERE generation > ?", (since,)).fetchone()
        cursor = conn.execute(
            "SELECT r.seq, v.vector FROM records AS r JOIN vectors AS v USING (seq) "
            "WHERE r.generation > ? ORDER BY r.seq",
            (since,),
        )
        deleted = np.array(
            [seq for (seq,) in conn.execute("SELECT seq FROM deletions WHERE generation > ?", (since,))],
            dtype=np.int64,
        )
    seqs = np.empty(n, dtype=np.int64)
    vectors = np.empty((n, dim), dtype=np.float32)
    filled = 0
    # Read in chunks into preallocated arrays: a million 2 KiB blobs never sit in memory as bytes at once.
    while rows := cursor.fetchmany(8192):
        end = filled + len(rows)
        seqs[filled:end] = [row[0] for row in rows]
        vectors[filled:end] = np.frombuffer(b"".join(row[1] for row in rows), dtype=_BLOB_DTYPE).reshape(-1, dim)
        normalise_rows(vectors[filled:end])
        filled = end
    return Changes(generation=generation, seqs=seqs, vectors=vectors, deleted=deleted, full=since == 0)


def _rewritten_since(conn: sqlite3.Connection, generation: int, max_seq: int) -> bool:
    """Whether rows up to `max_seq` were deleted or replaced after `generation` (appends do not count)."""
    deleted = conn.execute("SELECT 1 FROM deletions WHERE generation > ? LIMIT 1", (generation,)).fetchone()
    replaced = conn.execute(
        "SELECT 1 FROM records WHERE generation > ? AND seq <= ? LIMIT 1", (generation, max_seq)
    ).fetchone()
    return deleted is not None or replaced is not None


def _saved_generation(conn: sqlite3.Connection) -> int:
    """The generation of the saved HNSW file, -1 when there is none."""
    pointer = _read_meta(conn, _ANN)
    return -1 if pointer is None else int(pointer["generation"])


def _remove_stale_hnsw_files(store_path: Path, *, keep: str, keep_generation: int) -> None:
    """Delete HNSW files superseded by `keep`; others (another process's save in progress) only once abandoned."""
    prefix = store_path.name + _HNSW_INFIX
    now = time.time()
    # Temporary files of interrupted saves are dot-prefixed (imageloop.files.atomic_writer).
    for candidate in [*store_path.parent.glob(prefix + "*"), *store_path.parent.glob(f".{prefix}*")]:
        if candidate.name == keep:
            continue
        generation = candidate.name.lstrip(".")[len(prefix) :].split("-")[0]
        superseded = (
            not candidate.name.endswith(".tmp")
            and generation.isascii()
            and generation.isdigit()
            and int(generation) <= keep_generation
        )
        try:
            if superseded or now - candidate.stat().st_mtime > _STALE_SECONDS:
                candidate.unlink()
        except OSError:
            continue  # already gone, or open elsewhere (Windows): a later save tries again


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
