"""Metadata filters (`where`): validated, answered from per-key value lists (embedded), or as canonical JSON text.

`where` maps a metadata key to a wanted value or a list of accepted values. A record matches when,
for every key, its value equals one accepted value or, if its value is a list (tags), one of its
elements does. Values are JSON scalars: text, numbers, booleans, null; 1 and 1.0 are equal, while
1, "1" and true are three different values. Stores that filter on the server (Weaviate, Chroma)
compare `canonical_json` texts, which keep exactly these distinctions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from imageloop.errors import ImageloopError
from imageloop.tools.stores.vector_search import Seqs

Scalar = str | int | float | bool | None
# A value tagged with its JSON kind, so True and 1 (equal in Python) stay apart while 1 and 1.0 meet.
Tagged = tuple[str, Scalar]
Where = tuple[tuple[str, tuple[Tagged, ...]], ...]

_SCALARS = (str, int, float, bool, type(None))


def parse_where(where: Mapping[str, Any]) -> Where:
    """`where` as sorted (key, accepted tagged values) pairs, a hashable cache key; refused unless scalars."""
    parsed = []
    for key, wanted in where.items():
        if not isinstance(key, str):
            raise ImageloopError(f"where keys must be metadata key names, got {key!r}")
        values = tuple(wanted) if isinstance(wanted, list | tuple | set | frozenset) else (wanted,)
        for value in values:
            if not isinstance(value, _SCALARS):
                raise ImageloopError(
                    f"where[{key!r}] must be a text, number, boolean or null value, or a list of them; "
                    f"got {type(value).__name__}"
                )
        parsed.append((key, tuple(sorted({_tagged(value) for value in values}, key=repr))))
    return tuple(sorted(parsed))


def canonical_json(value: Any) -> str:
    """The JSON text `where` compares: sorted keys, no spaces, integral floats written as ints (1.0 == 1)."""
    return json.dumps(_normalised(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


class Facet:
    """For one metadata key: which rows (`seq`s) hold each value, as of write `generation`."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.generation = -1
        self.max_seq = 0
        self._rows: dict[Tagged, list[int]] = {}

    def add(self, rows: Iterable[tuple[int, str, Any, Any]], generation: int) -> None:
        """Add rows read by `json_each` over each record's metadata: (seq, JSON type, atom, JSON text)."""
        for seq, kind, atom, text in rows:
            if kind == "array":
                for element in json.loads(text):
                    if isinstance(element, _SCALARS):
                        self._rows.setdefault(_tagged(element), []).append(seq)
            elif kind != "object":
                self._rows.setdefault(_tagged(_scalar(kind, atom)), []).append(seq)
            self.max_seq = max(self.max_seq, seq)
        self.generation = generation

    def seqs(self, values: tuple[Tagged, ...]) -> Seqs:
        """The sorted rows holding any of `values` (as `parse_where` tags them)."""
        arrays = [np.asarray(self._rows.get(value, []), dtype=np.int64) for value in values]
        return np.unique(np.concatenate(arrays)) if arrays else np.zeros(0, dtype=np.int64)


def _normalised(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(key): _normalised(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_normalised(item) for item in value]
    return value


def _tagged(value: Scalar) -> Tagged:
    if isinstance(value, bool):
        return ("boolean", value)
    if isinstance(value, int | float):
        return ("number", value)
    return ("text" if isinstance(value, str) else "null", value)


def _scalar(kind: str, atom: Any) -> Scalar:
    """json_each returns booleans as 0/1 and null as NULL; its `type` column tells them apart."""
    if kind == "true":
        return True
    if kind == "false":
        return False
    return atom  # type: ignore[no-any-return]
