"""Checkpoints that cannot run code: every checkpointer imageloop builds reads through `StrictSerializer`.

LangGraph's default serializer rebuilds any object a checkpoint names by importing and calling it, so
a run folder someone sent, or a shared sessions database, whose checkpoint names `os.mkdir` (or
`os.system`) would run it on `--resume`. Ours revives only the types imageloop's state holds
(`CHECKPOINT_TYPES`), checked before anything is built, refuses a checkpoint naming anything else
with one line, and never reads pickle or LangChain's JSON envelopes, which imageloop never writes.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import ormsgpack
from langgraph.checkpoint.serde.jsonplus import JsonPlusSerializer
from langgraph.checkpoint.sqlite import SqliteSaver

from imageloop.errors import ImageloopError
from imageloop.knobs import LOOPS

CHECKPOINT_TYPES: dict[tuple[str, str], str] = {
    ("langgraph.types", "Send"): "ImageRAG's retrieval fanned out, one task per caption",
    ("langgraph.types", "Interrupt"): "the question a session waits on (GenIR feedback, RAGE picks and reviews)",
    ("langgraph.types", "Overwrite"): "a run's step list, reset by `prepare`",
    **{("imageloop.knobs", knobs.__name__): f"{loop}: the knobs `prepare` resolved" for loop, knobs in LOOPS.items()},
}
"""Every type a checkpoint of ours may name, and which state holds it: the one table to extend when state
holds a new one (a pydantic model, a dataclass). Plain dicts, lists, text and numbers need no row."""

# LangGraph's msgpack extension codes (langgraph.checkpoint.serde.jsonplus): those that name a type to build,
# the method call, and the delta snapshot that only wraps other values.
_CONSTRUCTORS = frozenset({0, 1, 2, 4, 5})
_METHOD = 3
_DELTA_SNAPSHOT = 7
_PLAIN_KINDS = frozenset({"null", "bytes", "bytearray"})


class CheckpointRefusedError(ImageloopError):
    """A checkpoint names something imageloop never stores: it was not written by imageloop, and is not loaded."""


class StrictSerializer(JsonPlusSerializer):
    """LangGraph's serializer, reading only what imageloop writes: msgpack naming the types of `CHECKPOINT_TYPES`."""

    def __init__(self, where: Path) -> None:
        """`where` names the checkpoint file in messages."""
        super().__init__(allowed_msgpack_modules=tuple(CHECKPOINT_TYPES))
        self.where = where

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        """The value, once its payload is known to name only allowed types; else CheckpointRefusedError."""
        kind, payload = data
        if kind == "msgpack":
            named = sorted(named_types(payload, self.where) - set(CHECKPOINT_TYPES))
            if named:
                raise CheckpointRefusedError(
                    f"a checkpoint in {self.where} names {'.'.join(named[0])}, which imageloop never stores: "
                    "not loaded (was it written by someone else?); start a new run or session"
                )
        elif kind not in _PLAIN_KINDS:
            raise CheckpointRefusedError(
                f"a checkpoint in {self.where} holds {kind!r} data, which imageloop never writes: not loaded "
                "(was it written by someone else?); start a new run or session"
            )
        return super().loads_typed(data)


def named_types(payload: bytes, where: Path) -> set[tuple[str, ...]]:
    """Every (module, name) a msgpack checkpoint payload asks to build, nested ones included; nothing is built."""
    named: set[tuple[str, ...]] = set()

    def ext(code: int, data: bytes) -> None:
        if code not in _CONSTRUCTORS | {_METHOD, _DELTA_SNAPSHOT}:
            named.add(("msgpack extension", str(code)))
            return None
        inner = ormsgpack.unpackb(data, ext_hook=ext, option=ormsgpack.OPT_NON_STR_KEYS)
        if code == _DELTA_SNAPSHOT:
            return None
        if not (isinstance(inner, list | tuple) and len(inner) >= 3 and all(isinstance(x, str) for x in inner[:2])):
            named.add(("a malformed extension",))
        elif code == _METHOD:
            named.add((str(inner[0]), f"{inner[1]}.{inner[3]}" if len(inner) > 3 else str(inner[1])))
        else:
            named.add((str(inner[0]), str(inner[1])))
        return None

    try:
        ormsgpack.unpackb(payload, ext_hook=ext, option=ormsgpack.OPT_NON_STR_KEYS)
    except (ormsgpack.MsgpackDecodeError, ValueError, TypeError) as e:
        raise CheckpointRefusedError(f"a checkpoint in {where} is damaged ({e}): start a new run or session") from None
    return named


def sqlite_checkpointer(conn: sqlite3.Connection, where: Path) -> SqliteSaver:
    """A SqliteSaver on `conn` (the database at `where`) that reads through `StrictSerializer`."""
    return SqliteSaver(conn, serde=StrictSerializer(where))
