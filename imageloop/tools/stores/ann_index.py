"""Approximate search over a large `EmbeddedVectorStore`: an HNSW graph over its vector file's rows, or over codes.

Both engines are derived from the store (built, extended or rebuilt from it, never the truth),
address vectors by their row in the store's vector file, and are built on every thread given.
FAISS (`pip install imageloop[ann]`) is imported here only, lazily.

- `HnswIndex` ("hnsw"): FAISS HNSW whose storage is a view of the memory-mapped vector file, so the
  vectors stay stored once; its own part is the graph (~2·M links a vector: 0.13x the vectors at M=32,
  d=512), and only the graph is saved. FAISS adds to a graph only while it owns its storage: rows
  appended since the graph was built are scanned exactly (at most `MAX_TAIL_ROWS`), then "folded" in
  at once: the graph's rows are read into a buffer FAISS owns, the new rows added, and the buffer
  dropped for the view again.
- `QuantizedIndex` ("quantized"): FAISS HNSW over 4-bit scalar-quantised codes held in memory (0.125x
  the vectors, plus the graph at M=16: 0.195x in all at d=512); its top candidates are re-ranked
  exactly with their rows read from the file, not mapped. For catalogues whose vectors do not fit in
  memory. Measured at 200,000 (d=512, bench/retrieval.py's vectors): after re-ranking 32 candidates,
  SQ4 codes reach the recall of SQ8 codes (0.97 at efSearch 256, M=16) at half their memory; IVF
  over SQ8 or PQ64 codes needed a scan of 1/8 of the collection for 0.93.

efSearch is tuned at build for a target recall@10 (after re-ranking) on held-out rows, and recall is
reported as measured. Saved files are written whole to a temporary name, fsynced and renamed, so a
killed process leaves the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, ClassVar, Self

import numpy as np
import numpy.typing as npt

from imageloop.files import atomic_writer
from imageloop.tools.stores.vector_file import VectorFile
from imageloop.tools.stores.vector_search import Found, Matrix, Seqs, exact_search, exact_search_blocks, merge_found

logger = logging.getLogger(__name__)

_MAGIC = b"ILVSHNSW"
_FORMAT = 2

# efSearch values tried, in order, when tuning for a target recall (k = 10). Past a million vectors the walk sets
# the quantised engine's recall, not its re-ranking: at 1M (M=16, 4-bit codes) 0.889 / 0.962 / 0.993 / 0.999 at
# efSearch 256 / 512 / 1024 / 2048 with 32, 64 or 128 candidates alike; at 10M, 0.932 at 1024, where this ladder
# used to stop. A build reaches its target at whatever efSearch it takes, and the latency it costs is reported.
_EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048, 3072, 4096)
RECALL_QUERIES = 500
RECALL_K = 10
_RECALL_MARGIN = 0.01
# Rows added to a graph per FAISS call while building (200 MiB at d=512).
_ADD_CHUNK = 100_000
# Rows sampled to train the scalar quantiser's ranges.
_TRAIN_ROWS = 100_000
# Rows appended since the graph was built that an HNSW index scans exactly before folding them in:
# 8 MiB at d=512, about a millisecond per query.
MAX_TAIL_ROWS = 4096
_BITMAP_CACHE_SIZE = 8


class AnnIndexUnreadable(Exception):
    """A saved index file is missing, truncated or not ours; the store rebuilds it from its rows."""


@cache
def faiss_module() -> Any | None:
    """The faiss module, or None when the `ann` extra is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@contextmanager
def faiss_threads(threads: int) -> Iterator[None]:
    """FAISS builds with `threads` OpenMP threads inside the block; searches keep the process's setting."""
    faiss = faiss_module()
    assert faiss is not None
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


@dataclass(frozen=True)
class HnswSettings:
    """How an HNSW graph is built and searched; `ef_search=None` tunes it to `target_recall` at build."""

    m: int = 32
    ef_construction: int = 40
    ef_search: int | None = None
    target_recall: float = 0.95
    # Filtered searches whose allowed subset is smaller than this are answered exactly: scoring a
    # subset costs ~0.28 us a vector at d=512 (5.6 ms at 20,000, measured), about what an HNSW walk
    # restricted to 2% of a million nodes costs once efSearch is raised to keep its recall.
    exact_below: int = 20_000
    # The quantised engine re-ranks this many candidates (or k, if more) exactly.
    candidates: int = 32


# The quantised engine's graph is sparser (its links are most of its memory) and its exact searches
# read rows from disk (4 MiB at 2,000 rows of d=512), so it leaves smaller subsets to its graph.
QUANTIZED_SETTINGS = HnswSettings(m=16, exact_below=2_000)


class _Graph:
    """What both engines share: a FAISS HNSW graph over the first rows of the vector file, and its tuning."""

    kind: ClassVar[str]

    def __init__(self, index: Any, info: dict[str, Any], settings: HnswSettings, vectors: VectorFile) -> None:
        self._index = index
        self.info = info  # how it was built and the recall measured then; saved with it
        self.settings = settings
        self.vectors = vectors
        self.rows = int(index.ntotal)  # rows searched: the graph's, and (hnsw) a tail scanned exactly
        self.saved_rows = self.rows  # rows in the saved file this index came from (0: never saved)
        self._ef_set = 0  # the efSearch last given to FAISS (setting it costs a SWIG round trip)
        self._bitmaps: dict[tuple[int, int], tuple[Seqs, npt.NDArray[np.uint8]]] = {}

    @property
    def graph_rows(self) -> int:
        """How many rows the graph holds (the first ones)."""
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        """The vectors' dimension."""
        return self.vectors.dim

    @property
    def ef_search(self) -> int:
        """The efSearch used: the configured one, else the one tuned at build."""
        return self.settings.ef_search or int(self.info["ef_search"])

    def extend(self, rows: int, threads: int) -> None:
        """Search the first `rows` rows of the file (rows are only ever appended)."""
        raise NotImplementedError

    def search(self, queries: Matrix, k: int, allowed: Seqs | None = None) -> Found:
        """Approximate top-`k` for unit `queries`, over every row or only the sorted `allowed` ones.

        A small `allowed` subset is searched exactly; a larger one by the graph restricted to it, with
        efSearch raised as the subset shrinks, and any query the graph leaves short of results is
        answered exactly instead.
        """
        if allowed is not None and len(allowed) < self.settings.exact_below:
            return self._exact(queries, k, allowed)
        graph_rows = self.graph_rows
        if allowed is None:
            graph_allowed, tail = None, np.arange(graph_rows, self.rows, dtype=np.int64)
        else:
            cut = int(np.searchsorted(allowed, graph_rows))
            graph_allowed, tail = allowed[:cut], allowed[cut:]
        found = self._graph_part(queries, k, graph_allowed)
        if len(tail):
            found = merge_found(found, self._exact(queries, k, tail), k)
        return found

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically: temporary file, fsync, rename, fsync of the folder."""
        faiss = faiss_module()
        assert faiss is not None
        header = {"format": _FORMAT, "engine": self.kind, "rows": self.graph_rows, "info": self.info}
        encoded = json.dumps({**header, "vectors": self.vectors.name}).encode()
        with atomic_writer(path) as f:
            f.write(_MAGIC + len(encoded).to_bytes(8, "little") + encoded)
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write), self._write_flags())
        self.saved_rows = self.graph_rows

    @classmethod
    def load(cls, path: Path, settings: HnswSettings, vectors: VectorFile) -> Self:
        """The index saved at `path`, over the rows of `vectors`; `AnnIndexUnreadable` if missing or damaged."""
        index, info = cls._read(path, vectors)
        return cls(index, info, settings, vectors)

    @classmethod
    def _read(cls, path: Path, vectors: VectorFile) -> tuple[Any, dict[str, Any]]:
        """The FAISS index saved at `path` and its build info; `AnnIndexUnreadable` unless whole and this engine's."""
        faiss = faiss_module()
        assert faiss is not None
        try:
            with path.open("rb") as f:
                if f.read(len(_MAGIC)) != _MAGIC:
                    raise AnnIndexUnreadable(f"{path} is not an imageloop search index file")
                header = json.loads(_read_exactly(f, int.from_bytes(_read_exactly(f, 8), "little")))
                if header.get("format") != _FORMAT or header.get("engine") != cls.kind:
                    raise AnnIndexUnreadable(f"{path} is not a {cls.kind} index of format {_FORMAT}")
                if header.get("vectors") != vectors.name:
                    raise AnnIndexUnreadable(f"{path} indexes another vector file than {vectors.name}")
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except AnnIndexUnreadable:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise AnnIndexUnreadable(f"cannot read {path}: {e}") from e
        if index.ntotal != header["rows"] or index.ntotal > vectors.stored_rows():
            raise AnnIndexUnreadable(f"{path} holds {index.ntotal} rows, its header says {header['rows']}")
        return index, dict(header["info"])

    def _write_flags(self) -> int:
        """FAISS's io flags for saving: what of the index is saved."""
        return 0

    def _graph_part(self, queries: Matrix, k: int, allowed: Seqs | None) -> Found:
        """Top-`k` among the graph's rows (or the sorted `allowed` ones among them)."""
        ef = None
        if allowed is not None:
            if len(allowed) == 0:
                return exact_search(np.zeros((0, self.dim), np.float32), queries, k)
            # A walk restricted to a share s of the nodes needs a wider beam: measured at 100,000
            # (efSearch 96, recall@10 0.977 unfiltered), s = 0.2 keeps 0.94 and s = 0.02 only 0.75,
            # while efSearch / sqrt(s) gives 0.99 and 0.996.
            share = len(allowed) / self.graph_rows
            ef = min(_EF_CANDIDATES[-1], math.ceil(self.ef_search / math.sqrt(share)))
        found = self._ranked(queries, k, allowed, ef)
        if allowed is not None:
            wanted = min(k, len(allowed))
            short = np.flatnonzero((found.positions[:, :wanted] < 0).any(axis=1))
            if len(short):
                redo = self._exact(queries[short], k, allowed)
                found.scores[short], found.positions[short] = redo.scores, redo.positions
        return found

    def _ranked(self, queries: Matrix, k: int, allowed: Seqs | None, ef: int | None) -> Found:
        """The graph's top-`k` at efSearch `ef` (default: the tuned one), scored as the engine reports them."""
        return self._faiss_search(queries, k, allowed, ef)

    def _exact(self, queries: Matrix, k: int, rows: Seqs) -> Found:
        """Exact top-`k` over the sorted `rows`."""
        raise NotImplementedError

    def _faiss_search(self, queries: Matrix, k: int, allowed: Seqs | None, ef: int | None) -> Found:
        faiss = faiss_module()
        assert faiss is not None
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ef = ef or self.ef_search
        if allowed is None:
            if ef != self._ef_set:
                self._index.hnsw.efSearch = self._ef_set = ef
            scores, positions = self._index.search(queries, k)
            return Found(scores, positions)
        bitmap = self._bitmap(allowed)
        selector = faiss.IDSelectorBitmap(self.graph_rows, faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        params.sel = selector
        scores, positions = self._index.search(queries, k, params=params)
        del selector, bitmap  # kept alive until FAISS is done with them
        return Found(scores, positions)

    def _bitmap(self, allowed: Seqs) -> npt.NDArray[np.uint8]:
        """`allowed` as a FAISS selector bitmap; cached, since the store passes the same cached filter again.

        Keyed by where its rows lie in memory and how many there are, not by the array object: what
        reaches here is the graph's part of the store's filter, a new view of it at every search.
        """
        key = (allowed.ctypes.data, len(allowed))
        cached = self._bitmaps.get(key)
        if cached is not None and len(cached[1]) * 8 >= self.graph_rows:
            return cached[1]
        mask = np.zeros(self.graph_rows, dtype=np.bool_)
        mask[allowed] = True
        bitmap = np.packbits(mask, bitorder="little")
        if len(self._bitmaps) >= _BITMAP_CACHE_SIZE:
            self._bitmaps.pop(next(iter(self._bitmaps)))
        self._bitmaps[key] = (allowed, bitmap)  # holding `allowed` keeps its memory, so its key, from being reused
        return bitmap

    def _tune(self, probes: Matrix, truth: Seqs, allowed: Seqs | None) -> tuple[int, float]:
        """The configured efSearch and its recall, else the smallest candidate reaching the target recall.

        The target is raised by `_RECALL_MARGIN`, the sampling error of a few hundred probes, so that
        recall on fresh queries lands at or above it.
        """
        if len(probes) == 0:
            return self.settings.ef_search or _EF_CANDIDATES[0], 1.0
        if self.settings.ef_search is not None:
            return self.settings.ef_search, self._recall(probes, truth, allowed, self.settings.ef_search)
        recall = 0.0
        for ef in _EF_CANDIDATES:
            recall = self._recall(probes, truth, allowed, ef)
            if recall >= self.settings.target_recall + _RECALL_MARGIN:
                return ef, recall
        logger.warning("%s recall@10 is %.3f at efSearch %d, below the target %.2f",
                       self.kind, recall, _EF_CANDIDATES[-1], self.settings.target_recall)  # fmt: skip
        return _EF_CANDIDATES[-1], recall

    def _recall(self, probes: Matrix, truth: Seqs, allowed: Seqs | None, ef: int) -> float:
        found = self._ranked(probes, RECALL_K, allowed, ef).positions
        pairs = zip(truth.tolist(), found.tolist(), strict=True)
        hits = sum(len(set(expected) & set(got) - {-1}) for expected, got in pairs)
        return hits / max(1, int((truth >= 0).sum()))

    def _describe_build(self, started: float, threads: int, ef: int, recall: float, probes: int) -> None:
        self.info = {
            "engine": self.kind,
            "m": self.settings.m,
            "ef_construction": self.settings.ef_construction,
            "ef_search": ef,
            "recall_at_10": round(recall, 4),
            "recall_method": (
                f"{probes} held-out stored vectors as queries, top-{RECALL_K} against exact search, at build"
            ),
            "build_seconds": round(time.perf_counter() - started, 2),
            "threads": threads,
            "built_rows": self.graph_rows,
            **self._engine_info(),
        }
        logger.info("built a %s index over %d rows in %.1f s on %d threads (efSearch %d, recall@10 %.3f)",
                    self.kind, self.graph_rows, self.info["build_seconds"], threads, ef, recall)  # fmt: skip

    def _engine_info(self) -> dict[str, Any]:
        return {}


def _held_out(rows: int, live: Seqs | None) -> tuple[int, Seqs]:
    """Where the graph stops at first, and the live rows after it that serve as recall probes.

    Like real queries, probes are not nodes of the graph while recall is measured: a vector already
    in the graph finds itself and its neighbours through its own links, which overstates recall
    (0.98 against 0.81 for fresh queries, measured at 20,000). They are the last rows, added after.
    """
    stop = rows - min(RECALL_QUERIES, rows // 10)
    tail = np.arange(stop, rows, dtype=np.int64)
    return stop, tail if live is None else tail[np.isin(tail, live)]


def _below(live: Seqs | None, stop: int) -> Seqs | None:
    return None if live is None else live[live < stop]


class HnswIndex(_Graph):
    """FAISS `IndexHNSWFlat` (inner product on unit rows) whose storage is a view of the memory-mapped vector file."""

    kind = "hnsw"

    def __init__(self, index: Any, info: dict[str, Any], settings: HnswSettings, vectors: VectorFile) -> None:
        faiss = faiss_module()
        assert faiss is not None
        # The storage belongs to this object, not to FAISS: it is swapped between a view and an owned copy.
        self._storage: Any = None
        if index.storage is not None and index.own_fields:
            self._storage = faiss.downcast_index(index.storage)
            self._storage.this.own(True)
        index.own_fields = False
        self._storage_rows: Matrix | None = None  # the memory map the view points into, kept alive
        self._matrix = vectors.matrix(int(index.ntotal))
        super().__init__(index, info, settings, vectors)
        self._use_view()

    @classmethod
    def build(
        cls, vectors: VectorFile, rows: int, live: Seqs | None, settings: HnswSettings, threads: int
    ) -> HnswIndex:
        """A graph over the first `rows` rows (`live`: those holding a record, None for all), on `threads` threads."""
        faiss = faiss_module()
        assert faiss is not None
        started = time.perf_counter()
        index = faiss.IndexHNSWFlat(vectors.dim, settings.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        built = cls(index, {}, settings, vectors)
        stop, probe_rows = _held_out(rows, live)
        with faiss_threads(threads):
            built._grow(stop, reserve=rows)
            probes = vectors.read(probe_rows)
            truth = exact_search(built._owned_matrix(), probes, RECALL_K, _below(live, stop)).positions
            ef, recall = built._tune(probes, truth, _below(live, stop))
        built.extend(rows, threads, fold=True)
        built.saved_rows = 0
        built._describe_build(started, threads, ef, recall, len(probes))
        return built

    def extend(self, rows: int, threads: int, *, fold: bool = False) -> None:
        """Search the first `rows` rows; the tail past the graph is folded in once long (or when `fold`)."""
        self.rows = rows
        tail = rows - self.graph_rows
        if tail > MAX_TAIL_ROWS or (fold and tail > 0):
            with faiss_threads(threads):
                self._grow(rows, reserve=rows)
            self._use_view()
        self._matrix = self.vectors.matrix(rows)

    def _exact(self, queries: Matrix, k: int, rows: Seqs) -> Found:
        return exact_search(self._matrix, queries, k, rows)

    def _write_flags(self) -> int:
        faiss = faiss_module()
        assert faiss is not None
        return int(faiss.IO_FLAG_SKIP_STORAGE)  # the graph only: the vectors are the store's, kept once

    def _grow(self, stop: int, *, reserve: int) -> None:
        """Add rows up to `stop` to the graph, giving FAISS an owned copy of the graph's rows while it adds."""
        faiss = faiss_module()
        assert faiss is not None
        if self._storage_rows is not None:  # a view: FAISS cannot append to it
            owned = faiss.IndexFlatIP(self.dim)
            have = self.graph_rows
            # Sized once for every row to come: growing it row block by row block would double it.
            owned.codes.resize(reserve * self.vectors.row_bytes)
            owned.codes.resize(have * self.vectors.row_bytes)
            if have:
                buffer = faiss.rev_swig_ptr(owned.codes.data(), have * self.vectors.row_bytes)
                self.vectors.read_into(buffer.view(np.float32).reshape(have, self.dim), 0)
            owned.ntotal = have
            self._index.storage = owned
            self._storage, self._storage_rows = owned, None
        for _, block in self.vectors.blocks(self.graph_rows, stop, _ADD_CHUNK):
            self._index.add(block)

    def _owned_matrix(self) -> Matrix:
        faiss = faiss_module()
        assert faiss is not None and self._storage_rows is None
        n = self.graph_rows
        return faiss.rev_swig_ptr(self._storage.get_xb(), n * self.dim).reshape(n, self.dim)  # type: ignore[no-any-return]

    def _use_view(self) -> None:
        """Point the graph's storage at the memory-mapped rows, dropping any owned copy."""
        faiss = faiss_module()
        assert faiss is not None
        rows = self.vectors.matrix(self.graph_rows)
        view = faiss.IndexFlatIP(self.dim)
        codes = rows.reshape(-1).view(np.uint8)
        pointer = faiss.swig_ptr(codes)
        # A MaybeOwnedVector that views memory it does not own (its create_view needs an owner
        # object that the Python bindings cannot make).
        borrowed = faiss.MaybeOwnedVectorUInt8()
        borrowed.is_owned = False
        borrowed.view_data, borrowed.view_size = pointer, codes.nbytes
        borrowed.c_ptr, borrowed.c_size = pointer, codes.nbytes
        view.codes = borrowed
        view.ntotal = self.graph_rows
        self._index.storage = view
        self._storage, self._storage_rows = view, rows


class QuantizedIndex(_Graph):
    """FAISS `IndexHNSWSQ` over 4-bit codes in memory; its top candidates re-ranked with rows read from the file."""

    kind = "quantized"

    @classmethod
    def build(
        cls, vectors: VectorFile, rows: int, live: Seqs | None, settings: HnswSettings, threads: int
    ) -> QuantizedIndex:
        """Codes and a graph over the first `rows` rows (`live`: those holding a record), on `threads` threads."""
        faiss = faiss_module()
        assert faiss is not None
        started = time.perf_counter()
        index = faiss.IndexHNSWSQ(vectors.dim, faiss.ScalarQuantizer.QT_4bit, settings.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        sample = np.random.default_rng(0).choice(rows, size=min(rows, _TRAIN_ROWS), replace=False)
        index.train(vectors.read(np.sort(sample)))
        storage = faiss.downcast_index(index.storage)
        storage.codes.resize(rows * storage.code_size)  # sized once: growing block by block would double it
        storage.codes.resize(0)
        built = cls(index, {}, settings, vectors)
        stop, probe_rows = _held_out(rows, live)
        with faiss_threads(threads):
            built.extend(stop, threads)
            probes = vectors.read(probe_rows)
            allowed = _below(live, stop)
            truth = exact_search_blocks(_live_blocks(vectors, stop, allowed), probes, RECALL_K).positions
            ef, recall = built._tune(probes, truth, allowed)
            built.extend(rows, threads)
        built.saved_rows = 0
        built._describe_build(started, threads, ef, recall, len(probes))
        return built

    def extend(self, rows: int, threads: int) -> None:
        """Encode and link the rows appended since, up to `rows`."""
        if rows > self.graph_rows:
            with faiss_threads(threads):
                for _, block in self.vectors.blocks(self.graph_rows, rows, _ADD_CHUNK):
                    self._index.add(block)
        self.rows = rows

    def _ranked(self, queries: Matrix, k: int, allowed: Seqs | None, ef: int | None) -> Found:
        """The graph's best `candidates` by their codes, re-ranked exactly with their rows read from the file."""
        candidates = self._faiss_search(queries, max(k, self.settings.candidates), allowed, ef).positions
        rows = np.unique(candidates[candidates >= 0])
        vectors = self.vectors.read(rows)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        positions = np.full((len(queries), k), -1, dtype=np.int64)
        for i, (query, found) in enumerate(zip(queries, candidates, strict=True)):
            found = found[found >= 0]
            exact = vectors[np.searchsorted(rows, found)] @ query
            best = np.lexsort((found, -exact))[:k]
            scores[i, : len(best)], positions[i, : len(best)] = exact[best], found[best]
        return Found(scores, positions)

    def _exact(self, queries: Matrix, k: int, rows: Seqs) -> Found:
        """Exact top-`k` over `rows`, read from the file a block at a time."""
        blocks = ((chunk, self.vectors.read(chunk)) for chunk in np.array_split(rows, max(1, len(rows) // 8192)))
        return exact_search_blocks(blocks, queries, k)

    def _engine_info(self) -> dict[str, Any]:
        return {"codes": "SQ4", "candidates": self.settings.candidates}


def _live_blocks(vectors: VectorFile, stop: int, live: Seqs | None) -> Iterator[tuple[Seqs, Matrix]]:
    """The first `stop` rows read in blocks, only the `live` ones (all when None)."""
    for first, block in vectors.blocks(0, stop):
        rows = np.arange(first, first + len(block), dtype=np.int64)
        if live is None:
            yield rows, block
        else:
            keep = np.isin(rows, live, assume_unique=True)
            yield rows[keep], block[keep]


def _read_exactly(f: io.BufferedReader, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise AnnIndexUnreadable(f"{f.name} is truncated")
    return data
