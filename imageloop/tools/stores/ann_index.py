"""The HNSW index of a large `EmbeddedVectorStore`: derived from its rows, rebuilt or caught up, never the truth.

FAISS (`pip install imageloop[ann]`) is imported here only, lazily. The index refers to store rows by
`seq`; replaced and deleted rows become dead positions that searches skip, and the store rebuilds
the index once too many are dead. Saved files are written whole to a temporary name, fsynced and
renamed, so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from imageloop.files import atomic_writer
from imageloop.tools.stores.vector_search import Changes, Found, Matrix, Seqs, exact_search

logger = logging.getLogger(__name__)

_MAGIC = b"ILVSHNSW"
_FORMAT = 1

# efSearch values tried, in order, when tuning for a target recall (k = 10).
_EF_CANDIDATES = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024)
RECALL_QUERIES = 500
RECALL_K = 10
_RECALL_MARGIN = 0.01
_ADD_CHUNK = 100_000
_BITMAP_CACHE_SIZE = 8


class AnnIndexUnreadable(Exception):
    """A saved HNSW file is missing, truncated or not ours; the store rebuilds it from its rows."""


@cache
def faiss_module() -> Any | None:
    """The faiss module, or None when the `ann` extra is not installed."""
    try:
        import faiss
    except ImportError:
        return None
    return faiss


@dataclass(frozen=True)
class HnswSettings:
    """How HNSW indexes are built and searched; `ef_search=None` tunes it to `target_recall` at build."""

    m: int = 32
    ef_construction: int = 40
    ef_search: int | None = None
    target_recall: float = 0.95
    # Filtered searches whose allowed subset is smaller than this are answered exactly: scoring a
    # subset costs ~0.28 us a vector at d=512 (5.6 ms at 20,000, measured), about what an HNSW walk
    # restricted to 2% of a million nodes costs once efSearch is raised to keep its recall.
    exact_below: int = 20_000


class HnswIndex:
    """A FAISS `IndexHNSWFlat` (inner product on unit vectors) plus the store row of each position."""

    kind = "hnsw"

    def __init__(self, index: Any, seqs: Seqs, generation: int, info: dict[str, Any], settings: HnswSettings) -> None:
        self._index = index
        self.seqs = seqs  # position -> seq; -1 marks a dead (deleted or replaced) position
        self.generation = generation
        self.info = info  # how it was built and the recall measured then; saved with it
        self.settings = settings
        self.saved_positions = len(seqs)  # positions already in the saved file this index came from
        self._ef_set = 0  # the efSearch last given to FAISS (setting it costs a SWIG round trip)
        self._refresh_lookups()

    @property
    def count(self) -> int:
        """How many live vectors the index holds."""
        return self._live_count

    @property
    def dim(self) -> int:
        """The vectors' dimension."""
        return int(self._index.d)

    @property
    def dead_fraction(self) -> float:
        """The share of positions that searches must skip; the store rebuilds past a limit."""
        return 1.0 - self._live_count / len(self.seqs) if len(self.seqs) else 0.0

    @property
    def ef_search(self) -> int:
        """The efSearch used: the configured one, else the one tuned at build."""
        return self.settings.ef_search or int(self.info["ef_search"])

    @classmethod
    def build(cls, seqs: Seqs, vectors: Matrix, generation: int, settings: HnswSettings) -> HnswIndex:
        """An index over unit `vectors` (rows `seqs`), with efSearch tuned and recall measured on held-out rows.

        Up to `RECALL_QUERIES` vectors are left out of the graph at first and serve as queries against
        exact search over the rest, then added: like real queries, they are not nodes of the graph.
        (A vector already in the graph finds itself and its neighbours through its own links, which
        overstates recall: 0.98 against 0.81 for fresh queries, measured at 20,000.)
        """
        faiss = faiss_module()
        assert faiss is not None, "build is only called when faiss is installed"
        started = time.perf_counter()
        n = len(seqs)
        held_out = np.sort(np.random.default_rng(0).choice(n, size=min(RECALL_QUERIES, n // 10), replace=False))
        in_graph = np.ones(n, dtype=np.bool_)
        in_graph[held_out] = False
        index = faiss.IndexHNSWFlat(vectors.shape[1], settings.m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = settings.ef_construction
        # Added a slice at a time, so leaving out the probes never copies the whole matrix.
        for start in range(0, n, _ADD_CHUNK):
            chunk = vectors[start : start + _ADD_CHUNK]
            index.add(np.ascontiguousarray(chunk[in_graph[start : start + _ADD_CHUNK]], dtype=np.float32))
        probes = np.ascontiguousarray(vectors[held_out], dtype=np.float32)
        built = cls(index, np.asarray(seqs, dtype=np.int64)[in_graph], generation, {}, settings)
        build_seconds = time.perf_counter() - started
        ef, recall = built._tune_ef_search(probes)
        built.apply(Changes(generation, np.asarray(seqs, dtype=np.int64)[held_out], probes, np.zeros(0, np.int64)))
        built.saved_positions = 0  # never saved
        built.info = {
            "engine": "faiss-hnsw",
            "m": settings.m,
            "ef_construction": settings.ef_construction,
            "ef_search": ef,
            "recall_at_10": round(recall, 4),
            "recall_method": (
                f"{len(probes)} held-out stored vectors as queries, top-{RECALL_K} against exact search, at build"
            ),
            "build_seconds": round(build_seconds, 2),
            "built_generation": generation,
            "built_count": built.count,
        }
        logger.info("built an HNSW index over %d vectors in %.1f s (efSearch %d, recall@10 %.3f)",
                    built.count, build_seconds, ef, recall)  # fmt: skip
        return built

    def vectors(self) -> Matrix:
        """The unit vectors by position, dead ones included (a view into FAISS: valid until the next `apply`)."""
        faiss = faiss_module()
        assert faiss is not None
        storage = faiss.downcast_index(self._index.storage)
        n, dim = self._index.ntotal, self._index.d
        if n == 0:
            return np.zeros((0, dim), dtype=np.float32)
        return faiss.rev_swig_ptr(storage.get_xb(), n * dim).reshape(n, dim)  # type: ignore[no-any-return]

    def apply(self, changes: Changes) -> None:
        """Catch up with `changes`: deleted and replaced rows die, written rows are added at new positions."""
        if changes.full:
            raise ValueError("an HNSW index is rebuilt, not reloaded, from a full change set")
        retired = np.concatenate([changes.deleted, changes.seqs])
        if len(retired):
            self.seqs[self._positions_of_unsorted(retired)] = -1
        if len(changes.seqs):
            self._index.add(np.ascontiguousarray(changes.vectors, dtype=np.float32))
            self.seqs = np.concatenate([self.seqs, changes.seqs])
        self.generation = changes.generation
        self._refresh_lookups()

    def positions_of(self, seqs: Seqs) -> Seqs:
        """The sorted positions of those `seqs` the index holds alive."""
        return np.sort(self._positions_of_unsorted(seqs))

    def search(self, queries: Matrix, k: int, allowed: Seqs | None = None) -> Found:
        """Approximate top-`k` for unit `queries`, over live positions or only the sorted `allowed` ones.

        A small `allowed` subset is searched exactly; a larger one by HNSW restricted to it, with
        efSearch raised as the subset shrinks, and any query that HNSW leaves short of results is
        answered exactly instead.
        """
        if allowed is None and self._live is not None:
            allowed = self._live
        if allowed is not None and len(allowed) < self.settings.exact_below:
            return exact_search(self.vectors(), queries, k, allowed)
        ef = None
        if allowed is not None:
            # A walk restricted to a share s of the nodes needs a wider beam: measured at 100,000
            # (efSearch 96, recall@10 0.977 unfiltered), s = 0.2 keeps 0.94 and s = 0.02 only 0.75,
            # while efSearch / sqrt(s) gives 0.99 and 0.996.
            share = len(allowed) / len(self.seqs)
            ef = min(_EF_CANDIDATES[-1], math.ceil(self.ef_search / math.sqrt(share)))
        found = self._hnsw_search(queries, k, allowed, ef)
        if allowed is not None:
            wanted = min(k, len(allowed))
            short = np.flatnonzero((found.positions[:, :wanted] < 0).any(axis=1))
            if len(short):
                redo = exact_search(self.vectors(), queries[short], k, allowed)
                found.scores[short], found.positions[short] = redo.scores, redo.positions
        return found

    def save(self, path: Path) -> None:
        """Write the index to `path` atomically: temporary file, fsync, rename, fsync of the folder."""
        faiss = faiss_module()
        assert faiss is not None
        header = json.dumps(
            {"format": _FORMAT, "generation": self.generation, "positions": len(self.seqs), "info": self.info}
        ).encode()
        with atomic_writer(path) as f:
            f.write(_MAGIC + len(header).to_bytes(8, "little") + header)
            f.write(self.seqs.astype("<i8").tobytes())
            faiss.write_index(self._index, faiss.PyCallbackIOWriter(f.write))
        self.saved_positions = len(self.seqs)

    @classmethod
    def load(cls, path: Path, settings: HnswSettings) -> HnswIndex:
        """The index saved at `path`; `AnnIndexUnreadable` if it is missing or damaged."""
        faiss = faiss_module()
        assert faiss is not None
        try:
            with path.open("rb") as f:
                if f.read(len(_MAGIC)) != _MAGIC:
                    raise AnnIndexUnreadable(f"{path} is not an imageloop HNSW file")
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
                if header.get("format") != _FORMAT:
                    raise AnnIndexUnreadable(f"{path} has format {header.get('format')}, expected {_FORMAT}")
                positions = int(header["positions"])
                seqs = np.frombuffer(_read_exactly(f, 8 * positions), dtype="<i8").astype(np.int64)
                index = faiss.read_index(faiss.PyCallbackIOReader(f.read))
        except AnnIndexUnreadable:
            raise
        except (OSError, ValueError, KeyError, RuntimeError) as e:
            raise AnnIndexUnreadable(f"cannot read {path}: {e}") from e
        if index.ntotal != positions:
            raise AnnIndexUnreadable(f"{path} holds {index.ntotal} vectors, its header says {positions}")
        return cls(index, seqs, int(header["generation"]), dict(header["info"]), settings)

    def measure_recall(self, probes: Matrix, ef_search: int, truth: Seqs | None = None) -> float:
        """Recall@10 of HNSW at `ef_search` against exact search, for query vectors `probes`."""
        if truth is None:
            truth = exact_search(self.vectors(), probes, RECALL_K, self._live).positions
        found = self._hnsw_search(probes, RECALL_K, self._live, ef_search).positions
        pairs = zip(truth.tolist(), found.tolist(), strict=True)
        hits = sum(len(set(expected) & set(got) - {-1}) for expected, got in pairs)
        return hits / max(1, int((truth >= 0).sum()))

    def _tune_ef_search(self, probes: Matrix) -> tuple[int, float]:
        """The configured efSearch and its recall, else the smallest candidate reaching the target recall.

        The target is raised by `_RECALL_MARGIN`, the sampling error of a few hundred probes, so that
        recall on fresh queries lands at or above it.
        """
        if len(probes) == 0:
            return self.settings.ef_search or _EF_CANDIDATES[0], 1.0
        truth = exact_search(self.vectors(), probes, RECALL_K, self._live).positions
        if self.settings.ef_search is not None:
            return self.settings.ef_search, self.measure_recall(probes, self.settings.ef_search, truth)
        recall = 0.0
        for ef in _EF_CANDIDATES:
            recall = self.measure_recall(probes, ef, truth)
            if recall >= self.settings.target_recall + _RECALL_MARGIN:
                return ef, recall
        logger.warning("HNSW recall@10 is %.3f at efSearch %d, below the target %.2f",
                       recall, _EF_CANDIDATES[-1], self.settings.target_recall)  # fmt: skip
        return _EF_CANDIDATES[-1], recall

    def _hnsw_search(self, queries: Matrix, k: int, allowed: Seqs | None, ef_search: int | None = None) -> Found:
        faiss = faiss_module()
        assert faiss is not None
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        ef = ef_search or self.ef_search
        if allowed is None:
            if ef != self._ef_set:
                self._index.hnsw.efSearch = self._ef_set = ef
            scores, positions = self._index.search(queries, k)
            return Found(scores, positions)
        bitmap = self._bitmap(allowed)
        selector = faiss.IDSelectorBitmap(len(self.seqs), faiss.swig_ptr(bitmap))
        params = faiss.SearchParametersHNSW()
        params.efSearch = ef
        params.sel = selector
        scores, positions = self._index.search(queries, k, params=params)
        del selector, bitmap  # kept alive until FAISS is done with them
        return Found(scores, positions)

    def _bitmap(self, allowed: Seqs) -> npt.NDArray[np.uint8]:
        """`allowed` as a FAISS selector bitmap; cached, since the store passes the same cached filter again."""
        cached = self._bitmaps.get(id(allowed))
        if cached is not None and cached[0] is allowed:
            return cached[1]
        mask = np.zeros(len(self.seqs), dtype=np.bool_)
        mask[allowed] = True
        bitmap = np.packbits(mask, bitorder="little")
        if len(self._bitmaps) >= _BITMAP_CACHE_SIZE:
            self._bitmaps.pop(next(iter(self._bitmaps)))
        self._bitmaps[id(allowed)] = (allowed, bitmap)  # holding `allowed` keeps its id from being reused
        return bitmap

    def _positions_of_unsorted(self, seqs: Seqs) -> Seqs:
        sorted_seqs = self._sorted_seqs
        at = np.searchsorted(sorted_seqs, seqs)
        inside = at < len(sorted_seqs)
        at = at[inside]
        positions: Seqs = self._order[at[sorted_seqs[at] == seqs[inside]]]
        return positions

    def _refresh_lookups(self) -> None:
        alive = self.seqs >= 0
        self._live_count = int(alive.sum())
        # None when nothing is dead: the common case searches without a selector.
        self._live: Seqs | None = None if self._live_count == len(self.seqs) else np.flatnonzero(alive)
        self._order = np.argsort(self.seqs, kind="stable")
        self._sorted_seqs = self.seqs[self._order]
        self._bitmaps: dict[int, tuple[Seqs, npt.NDArray[np.uint8]]] = {}


def _read_exactly(f: io.BufferedReader, size: int) -> bytes:
    data = f.read(size)
    if len(data) != size:
        raise AnnIndexUnreadable(f"{f.name} is truncated")
    return data
