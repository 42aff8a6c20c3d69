"""The vectors of an embedded store, kept once: one append-only file of unit float32 rows, memory-mapped.

Row r of the file holds one record's vector scaled to length 1, as float32 (little-endian, like
every machine FAISS runs on), at byte `r * dim * 4`; SQLite says which record holds which row and
how many rows are committed. Every search engine reads these rows: exact search scans the memory
map, the HNSW graph's FAISS storage is a view of it (no copy), and the quantised engine re-ranks its
candidates with rows read by `pread`, which keeps them out of the process's memory.

Why a file and not a table: FAISS searches rows it can address in memory, and SQLite blobs cannot be
mapped; a table would need a second copy in memory (or on disk, as the HNSW file of the second
layout held one).

Rows are only ever written past the committed ones, under the store's write lock, and synced before
the transaction that counts them commits. A killed writer therefore leaves at most some uncounted
rows at the end, which the next writer overwrites; a committed row never changes, so a reader's
memory map of the first `rows` rows stays valid while others write. (Compaction writes a new file.)
"""

from __future__ import annotations

import errno
import mmap
import os
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from imageloop.files import fsync_folder
from imageloop.tools.stores.vector_search import Matrix, Seqs

DTYPE = np.dtype("<f4")
# Rows read at once when a whole file is streamed (a build, a compaction): 32 MiB at d=512.
BLOCK_ROWS = 16384
# Linux transfers at most this many bytes per read or write call.
_MAX_IO = 0x7FFFF000


class VectorFile:
    """The rows of unit vectors at `path`: appended by the store's writer, mapped or read by everyone."""

    def __init__(self, path: Path, dim: int, *, writable: bool, create: bool = False) -> None:
        self.path = path
        self.dim = dim
        self.row_bytes = dim * DTYPE.itemsize
        flags = os.O_RDWR if writable else os.O_RDONLY
        self._fd = os.open(path, flags | (os.O_CREAT if create else 0), 0o666)
        # Closed when the file is dropped unclosed too (a store freed without close(), as a server's replaced
        # index handles are): a raw descriptor is not closed by the collector, and a server that re-indexed
        # now and then leaked one per call until it hit the open-files limit.
        self._closer = weakref.finalize(self, os.close, self._fd)
        if create:
            fsync_folder(path.parent)  # the file's name must be on disk before a commit refers to it
        self._map: Matrix | None = None

    @property
    def name(self) -> str:
        """The file's name, as the store's meta records it."""
        return self.path.name

    def close(self) -> None:
        """Close the file (once, however often called); memory maps already handed out stay valid until dropped."""
        self._closer()
        self._map = None

    def stored_rows(self) -> int:
        """How many whole rows the file holds, committed or not."""
        return os.fstat(self._fd).st_size // self.row_bytes

    def write(self, at: int, vectors: Matrix, *, sync: bool = True) -> None:
        """Write `vectors` as rows `at`, `at + 1`, ... and sync them: before the transaction counting them commits."""
        data = np.ascontiguousarray(vectors, dtype=DTYPE).reshape(-1).view(np.uint8).data
        offset = at * self.row_bytes
        while data:
            written = os.pwrite(self._fd, data[:_MAX_IO], offset)
            data, offset = data[written:], offset + written
        if sync:
            self.sync()

    def sync(self) -> None:
        """Flush the rows written to the disk (a file written in many blocks is synced once, at the end)."""
        os.fdatasync(self._fd)

    def matrix(self, rows: int) -> Matrix:
        """The first `rows` rows, memory-mapped read-only (shared with every process mapping the file)."""
        if rows == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self._map is None or len(self._map) < rows:
            # Mapped up to the file's end, so that the rows appended next need no new map; mapped from the
            # open file, not its name, which another process's compaction may have removed meanwhile.
            mapped = max(rows, self.stored_rows())
            memory = mmap.mmap(self._fd, mapped * self.row_bytes, access=mmap.ACCESS_READ)
            self._map = np.frombuffer(memory, dtype=DTYPE).reshape(mapped, self.dim)
        return self._map[:rows]

    def read(self, rows: Seqs) -> Matrix:
        """Rows `rows`, in that order, read rather than mapped: they never count in this process's memory."""
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        if not len(rows):
            return out
        order = np.argsort(rows, kind="stable")
        ordered = rows[order]
        # A run of consecutive rows is read in one call.
        starts = np.flatnonzero(np.diff(ordered, prepend=-2) != 1)
        for start, end in zip(starts.tolist(), [*starts[1:].tolist(), len(ordered)], strict=True):
            block = np.empty((end - start, self.dim), dtype=np.float32)
            self.read_into(block, int(ordered[start]))
            out[order[start:end]] = block
        return out

    def blocks(self, start: int, stop: int, block_rows: int = BLOCK_ROWS) -> Iterator[tuple[int, Matrix]]:
        """Rows `start` to `stop` in blocks `(first_row, rows)`, read in order (a build, a copy of every row)."""
        for first in range(start, stop, block_rows):
            block = np.empty((min(block_rows, stop - first), self.dim), dtype=np.float32)
            self.read_into(block, first)
            yield first, block

    def read_into(self, out: Matrix, first: int) -> None:
        """Fill `out` (C-contiguous float32) with rows `first`, `first + 1`, ...; OSError if the file ends before."""
        view = out.reshape(-1).view(np.uint8).data
        offset = first * self.row_bytes
        while view:
            got = os.preadv(self._fd, [view[:_MAX_IO]], offset)
            if got == 0:
                raise OSError(errno.EIO, f"{self.path} ends before row {offset // self.row_bytes}")
            view, offset = view[got:], offset + got
