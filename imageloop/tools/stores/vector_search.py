"""Exact top-k cosine search, the row map every engine shares, and the change feed it follows.

Every search engine of `EmbeddedVectorStore` addresses vectors by their *row* in the store's vector
file (`vector_file.VectorFile`); the `RowMap` says which record (`seq`) each row holds now, and is
brought up to date with `Changes` read from SQLite rather than reloaded after each write.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from imageloop.tools.stores.vector_file import VectorFile

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
    """What happened to the vector file's rows up to write `generation`: the feed the row map follows.

    `rows` is the file's committed row count then; `written_rows` (ascending) were written since,
    each now holding the record `written_seqs`; `dead_rows` lost their record (deleted, or its vector
    replaced by a new row). `full` means the written rows are every live row: start over.
    """

    generation: int
    rows: int
    written_rows: Seqs
    written_seqs: Seqs
    dead_rows: Seqs
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


def merge_found(first: Found, second: Found, k: int) -> Found:
    """The `k` best of two results for the same queries (positions from one numbering)."""
    scores = np.concatenate([first.scores, second.scores], axis=1)
    positions = np.concatenate([first.positions, second.positions], axis=1)
    scores[positions < 0] = -np.inf
    best, columns = top_k(scores, k)
    return Found(best, np.take_along_axis(positions, columns, axis=1))


def exact_search_blocks(blocks: Iterable[tuple[Seqs, Matrix]], queries: Matrix, k: int) -> Found:
    """Exact top-`k` over vectors that come in blocks `(rows, vectors)`: streamed from disk, never all in memory."""
    found = Found(np.full((len(queries), k), -np.inf, dtype=np.float32), np.full((len(queries), k), -1, np.int64))
    for rows, vectors in blocks:
        block = exact_search(vectors, queries, k)
        valid = block.positions >= 0
        block.positions[valid] = rows[block.positions[valid]]
        found = merge_found(found, block, k)
    return found


class RowMap:
    """Which record (`seq`) each row of the vector file holds at one write generation; -1 marks a dead row."""

    def __init__(self, file_name: str | None = None) -> None:
        self.file_name = file_name
        self.generation = -1
        self.seqs: Seqs = np.zeros(0, dtype=np.int64)
        self._live: Seqs | None = None
        self._live_count = 0
        # The seq -> row lookup is sorted on first use: only filtered searches need it.
        self._order: Seqs | None = None
        self._sorted: Seqs = self.seqs

    @property
    def rows(self) -> int:
        """How many rows the file had committed at this generation."""
        return len(self.seqs)

    @property
    def count(self) -> int:
        """How many rows hold a record."""
        return self._live_count

    @property
    def dead_fraction(self) -> float:
        """The share of rows that searches skip; past a limit the store compacts its file."""
        return 1.0 - self._live_count / len(self.seqs) if len(self.seqs) else 0.0

    @property
    def live(self) -> Seqs | None:
        """The rows holding a record, sorted; None when every row does (searches then need no filter)."""
        return self._live

    def apply(self, changes: Changes) -> None:
        """Catch up with `changes`: new rows take their records, dead rows are marked."""
        if changes.full:
            self.seqs = np.full(changes.rows, -1, dtype=np.int64)
        elif changes.rows > len(self.seqs):
            self.seqs = np.concatenate([self.seqs, np.full(changes.rows - len(self.seqs), -1, dtype=np.int64)])
        self.seqs[changes.dead_rows] = -1
        self.seqs[changes.written_rows] = changes.written_seqs
        self.generation = changes.generation
        self._refresh()

    def positions_of(self, seqs: Seqs) -> Seqs:
        """The sorted rows holding `seqs` (those that are stored)."""
        if self._order is None:
            self._order = np.argsort(self.seqs, kind="stable")
            self._sorted = self.seqs[self._order]
        at = np.searchsorted(self._sorted, seqs)
        inside = at < len(self._sorted)
        at = at[inside]
        return np.sort(self._order[at[self._sorted[at] == seqs[inside]]])

    def _refresh(self) -> None:
        alive = self.seqs >= 0
        self._live_count = int(alive.sum())
        self._live = None if self._live_count == len(self.seqs) else np.flatnonzero(alive)
        self._order = None


class ExactIndex:
    """Every row scanned in place in the memory-mapped vector file: recall 1 by definition, nothing to build or save."""

    kind = "exact"

    def __init__(self, vectors: VectorFile | None) -> None:
        self.vectors = vectors
        self.dim = vectors.dim if vectors is not None else 0
        self.rows = 0
        self._matrix: Matrix = np.zeros((0, self.dim), dtype=np.float32)

    def extend(self, rows: int, threads: int) -> None:
        """Cover the first `rows` rows of the file (rows are only ever appended); nothing to build on `threads`."""
        if self.vectors is not None:
            self._matrix = self.vectors.matrix(rows)
        self.rows = rows

    def search(self, queries: Matrix, k: int, allowed: Seqs | None = None) -> Found:
        """Exact top-`k` for unit `queries` over every row, or only over the sorted `allowed` rows."""
        return exact_search(self._matrix, queries, k, allowed)
