"""Exact top-k cosine search over an in-memory matrix, and the change feed the store's indexes follow.

Both search indexes of `EmbeddedVectorStore` (this exact one and the HNSW one in `ann_index`) hold
unit vectors by *position* and know which store row (`seq`) each position holds; the store brings
them up to date with `Changes` read from SQLite instead of reloading everything after each write.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

Seqs = npt.NDArray[np.int64]
Matrix = npt.NDArray[np.float32]

# Queries scored together in one matrix product; bounds the (queries x vectors) score matrix that a
# batched search holds at once (32 x 1M float32 = 128 MiB).
_QUERY_CHUNK = 32
# Rows of a subset copied out at once (16 MiB at d=512): the copy is scored while still in cache,
# which halves the cost of gathering 30,000 rows in one go (measured).
_GATHER_BLOCK = 8192


@dataclass(frozen=True)
class Changes:
    """What the records gained and lost up to write `generation`: the feed an index catches up from.

    `seqs` are rows written (new or replaced), ascending, with their unit `vectors`; `deleted` are
    rows removed. `full` means `seqs` is every record and the index should start over from them.
    """

    generation: int
    seqs: Seqs
    vectors: Matrix
    deleted: Seqs
    full: bool = False


@dataclass(frozen=True)
class Found:
    """Top-k results of a batch of queries: `positions[i, j] == -1` where query i found fewer than j+1."""

    scores: Matrix
    positions: Seqs


def normalise_rows(matrix: Matrix) -> Matrix:
    """`matrix` scaled in place to unit rows, so a dot product is a cosine."""
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    return matrix


def top_k(scores: Matrix, k: int) -> tuple[Matrix, Seqs]:
    """The `k` best columns of each row of `scores`, best first; equal scores in column order."""
    n = scores.shape[1]
    # argpartition finds the k best in linear time; only those k are then sorted.
    columns = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < n else np.broadcast_to(np.arange(n), scores.shape)
    picked = np.take_along_axis(scores, columns, axis=1)
    order = np.lexsort((columns, -picked), axis=1)
    return np.take_along_axis(picked, order, axis=1), np.take_along_axis(columns, order, axis=1).astype(np.int64)


def exact_search(matrix: Matrix, queries: Matrix, k: int, allowed: Seqs | None = None) -> Found:
    """Exact top-`k` by inner product over the rows of `matrix`, or only over the `allowed` rows (sorted)."""
    n = matrix.shape[0] if allowed is None else len(allowed)
    width = min(k, n)
    scores_out = np.full((len(queries), k), -np.inf, dtype=np.float32)
    positions_out = np.full((len(queries), k), -1, dtype=np.int64)
    if width == 0:
        return Found(scores_out, positions_out)
    # Scoring a row of a subset means copying it out first, which costs ~4.5x scanning it in place
    # (measured, d=512): a subset of up to a fifth of the rows is gathered, a larger one is scanned
    # in full and the rest masked out.
    gathered = allowed is not None and 5 * len(allowed) <= matrix.shape[0]
    excluded: npt.NDArray[np.bool_] | None = None
    if allowed is not None and not gathered:
        excluded = np.ones(matrix.shape[0], dtype=np.bool_)
        excluded[allowed] = False
    for start in range(0, len(queries), _QUERY_CHUNK):
        chunk = queries[start : start + _QUERY_CHUNK]
        if allowed is not None and gathered:
            scores = _gathered_scores(matrix, chunk, allowed)
        else:
            # One query is a matrix-vector product (gemv), several a matrix product (gemm).
            scores = (matrix @ chunk[0])[None, :] if len(chunk) == 1 else chunk @ matrix.T
            if excluded is not None:
                scores[:, excluded] = -np.inf
        best, columns = top_k(scores, width)
        if gathered:
            columns = allowed[columns]  # type: ignore[index]
        scores_out[start : start + len(chunk), :width] = best
        positions_out[start : start + len(chunk), :width] = columns
    return Found(scores_out, positions_out)


def _gathered_scores(matrix: Matrix, queries: Matrix, rows: Seqs) -> Matrix:
    """Inner products of `queries` with `matrix[rows]`, copied out a cache-sized block at a time."""
    scores = np.empty((len(queries), len(rows)), dtype=np.float32)
    for start in range(0, len(rows), _GATHER_BLOCK):
        block = matrix[rows[start : start + _GATHER_BLOCK]]
        scores[:, start : start + len(block)] = block @ queries[0] if len(queries) == 1 else queries @ block.T
    return scores


class ExactIndex:
    """Every live vector in one matrix, in row (`seq`) order, searched by a full scan: recall 1 by definition."""

    kind = "exact"

    def __init__(self, dim: int) -> None:
        self.dim = dim
        self.generation = 0
        self.seqs: Seqs = np.zeros(0, dtype=np.int64)
        # Rows beyond `count` are spare capacity, so a small append does not copy the whole matrix.
        self._buffer: Matrix = np.zeros((0, dim), dtype=np.float32)

    @property
    def count(self) -> int:
        """How many vectors the index holds."""
        return len(self.seqs)

    def vectors(self) -> Matrix:
        """The unit vectors by position (a view: valid until the next `apply`)."""
        return self._buffer[: self.count]

    def apply(self, changes: Changes) -> None:
        """Catch up with `changes`: drop deleted rows, overwrite replaced ones, append new ones."""
        if changes.full:
            self.seqs, self._buffer = changes.seqs, changes.vectors
            self.generation = changes.generation
            return
        if len(changes.deleted):
            keep = ~np.isin(self.seqs, changes.deleted)
            if not keep.all():
                self._buffer = self.vectors()[keep]
                self.seqs = self.seqs[keep]
        if len(changes.seqs):
            positions = np.searchsorted(self.seqs, changes.seqs)
            found = positions < self.count
            found[found] = self.seqs[positions[found]] == changes.seqs[found]
            self._buffer[positions[found]] = changes.vectors[found]
            # The store never reuses a seq, so new rows sort after every row already held.
            self._append(changes.seqs[~found], changes.vectors[~found])
        self.generation = changes.generation

    def positions_of(self, seqs: Seqs) -> Seqs:
        """The sorted positions of those `seqs` the index holds."""
        positions = np.searchsorted(self.seqs, seqs)
        inside = positions < self.count
        positions = positions[inside]
        return np.sort(positions[self.seqs[positions] == seqs[inside]])

    def search(self, queries: Matrix, k: int, allowed: Seqs | None = None) -> Found:
        """Exact top-`k` for unit `queries`, over all positions or only the sorted `allowed` ones."""
        return exact_search(self.vectors(), queries, k, allowed)

    def _append(self, seqs: Seqs, vectors: Matrix) -> None:
        if not len(seqs):
            return
        count, needed = self.count, self.count + len(seqs)
        if needed > len(self._buffer):
            grown = np.empty((max(needed, 2 * len(self._buffer)), self.dim), dtype=np.float32)
            grown[:count] = self.vectors()
            self._buffer = grown
        self._buffer[count:needed] = vectors
        self.seqs = np.concatenate([self.seqs, seqs])
