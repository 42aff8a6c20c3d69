"""The index meta of a store that keeps it as one JSON text beside its vectors (Weaviate, Chroma), and its dimension.

The meta (embedder, dimension, route, root) travels with the vectors: in a Weaviate collection's
description, in a Chroma collection's metadata. `dim` is fixed by the first write (or preset) and
never changes; it is cached once known, and re-read while unknown, since another handle or
process may fix it.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from imageloop.errors import ImageloopError

DIM = "dim"


class IndexMeta:
    """A store's meta as one JSON object, read and written through the store's own calls."""

    def __init__(self, label: str, read: Callable[[], Any], write: Callable[[str], None]) -> None:
        self.label = label
        self._read = read
        self._write = write
        self._lock = threading.RLock()
        self._dim: int | None = None

    def get(self) -> dict[str, Any]:
        """All meta values, read now (another handle may have written them)."""
        return self.parse(self._read())

    def parse(self, text: Any) -> dict[str, Any]:
        """The meta in a stored JSON text (empty when absent or not ours), noting its `dim`."""
        try:
            meta = json.loads(text) if isinstance(text, str) else {}
        except json.JSONDecodeError:
            meta = {}
        if not isinstance(meta, dict):
            return {}
        with self._lock:
            if DIM in meta:
                self._dim = int(meta[DIM])
        return meta

    def set(self, values: Mapping[str, Any]) -> None:
        """Merge `values` into the meta; `dim` may only be set while unset or unchanged."""
        with self._lock:
            meta = self.get()
            if DIM in values:
                self._refuse_other_dim(int(values[DIM]), meta.get(DIM))
            meta.update(values)
            self._write(json.dumps(meta, sort_keys=True))
            if DIM in meta:
                self._dim = int(meta[DIM])

    def dim(self) -> int | None:
        """The store's dimension, or None while it holds no vector."""
        with self._lock:
            if self._dim is not None:
                return self._dim
        self.get()
        return self._dim

    def fix_dim(self, dims: Iterable[int]) -> None:
        """Record the dimension of a checked batch on first write; refuse another one, or a batch mixing two."""
        distinct = sorted(set(dims))
        if len(distinct) > 1:
            raise ImageloopError(f"vector has dimension {distinct[0]} but the batch also holds dimension {distinct[1]}")
        (dim,) = distinct
        with self._lock:
            stored = self.dim()
            if stored is None:
                self.set({DIM: dim})
            else:
                self._refuse_other_dim(dim, stored)

    def accepts_query(self, dim: int) -> bool:
        """Whether a query of `dim` can be answered: False while the store is empty; an error if dims differ."""
        stored = self.dim()
        if stored is not None and dim != stored:
            raise ImageloopError(f"query vector has dimension {dim} but the {self.label} holds dimension {stored}")
        return stored is not None

    def _refuse_other_dim(self, dim: int, stored: Any) -> None:
        if stored is not None and int(stored) != dim:
            raise ImageloopError(f"vector has dimension {dim} but the {self.label} holds dimension {stored}")
