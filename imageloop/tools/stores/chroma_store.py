"""The Chroma store: one Chroma collection per index, on local disk through Chroma's persistent client.

Chroma (the vector database the RAGE blog builds on) runs inside this process, no server: its data
lives in one folder (`<folder>/.imageloop/chroma/`, an SQLite file plus HNSW segment files). Its
telemetry is off, and the collection has no embedding function: we always pass our own vectors, so
Chroma never loads, or downloads, its default ONNX text model. The collection's HNSW index uses
cosine distance, so a hit's similarity is `1 - distance`. Searches are approximate at every size
(Chroma's defaults, M 16 and efSearch 100), unlike the embedded store's exact search up to 100,000
records. Measured with bench/retrieval.py (20,000 512-d vectors, 2 busy cores): p50 6.5 ms at
recall@10 0.977 (embedded store exact 20 ms, its HNSW 1.7 ms), but 60-80 ms with a `where` filter,
which is Chroma's own cost (a plain `$eq` on a scalar field measured as slow as our `$contains`).

Metadata is kept twice per record, as in the Weaviate store: verbatim as JSON under one reserved
key (what `search` and `get` return), and per top-level key `K`, under `m:K`, the list of the
canonical JSON texts of its scalar values (a list value, such as tags, gives one text per scalar
element). `where` is answered by Chroma's own filter: each accepted value becomes `$contains` of its
text, several accepted values an `$or`, several keys an `$and`. This emulates what Chroma 1.x lacks:
its `$eq`/`$in` do not look inside list values, it refuses empty or mixed-type lists and nested
objects, and it tells 1 from 1.0; the texts make 1 and 1.0 equal, keep 1, "1" and true apart, and
a list field match when any element does, exactly as the embedded store filters.

Chroma's upsert merges new metadata into a stored record's, so a replaced record's keys that its
new metadata lacks are removed explicitly (Chroma deletes a key written as None). The index meta
(embedder, dimension, route, root) is JSON in the collection's own metadata. Every batch is checked
whole before anything is written; a batch larger than Chroma's maximum is written in several calls.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from imageloop.errors import ConfigError, ImageloopError, IndexNotFoundError
from imageloop.protocols import SearchHit, Vector, VectorRecord
from imageloop.tools.stores.checks import check_k, checked_vector
from imageloop.tools.stores.index_meta import IndexMeta
from imageloop.tools.stores.metadata_filter import Where, canonical_json, parse_where

if TYPE_CHECKING:
    from chromadb.api.client import Client
    from chromadb.api.models.Collection import Collection
    from chromadb.api.types import Metadata

# One collection per index: each index has its own Chroma folder, so the name is fixed.
COLLECTION_NAME = "imageloop"
# Keys of our own in Chroma's metadata: the index meta (on the collection), the verbatim record
# metadata (on each record), and the prefix of the filterable copies (never `$` or `#`, which
# Chroma reserves, whatever the user's keys are).
_META_KEY = "imageloop_meta"
_METADATA_KEY = "imageloop_metadata"
_FILTER_PREFIX = "m:"
_SCALARS = (str, int, float, bool, type(None))

# Chroma's local client keeps its HNSW index in memory per process and is not safe across processes:
# a process that has the folder open does not see another's writes (measured: its next search
# returned records whose metadata was gone). So processes take turns through an advisory lock on
# this file: any number of processes read, or one writes (from its first write until it closes).
LOCK_FILENAME = "imageloop.lock"

# A filter that no record can pass (an empty list of accepted values): answered without a query.
_NOTHING: dict[str, Any] = {}


class ChromaVectorStore:
    """A `VectorStore` in one Chroma collection under `path`, created on first open unless `create=False`."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        self.path = Path(path).resolve()
        if not create and not self.path.is_dir():
            raise IndexNotFoundError(f"no {self.label}")
        chromadb, settings = _chromadb()
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._closed = False
        self._meta = IndexMeta(self.label, self._read_meta, self._write_meta)
        with ExitStack() as undo:
            _claim(self.path, self.label)
            undo.callback(_release, self.path)
            # Clients of one folder share one Chroma system in this process (refcounted by Chroma),
            # so every handle opens it with the same settings.
            self._client: Client = chromadb.PersistentClient(path=str(self.path), settings=settings)
            undo.callback(self._client.close)
            self._collection = self._open_collection(create)
            self._batch = self._client.get_max_batch_size()
            undo.pop_all()

    @property
    def label(self) -> str:
        """`Chroma store at PATH`, as error messages name this store."""
        return f"Chroma store at {self.path}"

    def close(self) -> None:
        """Release this handle on the Chroma folder (the last handle of the process stops Chroma and unlocks it)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._client.close()
        _release(self.path)

    def get_meta(self) -> dict[str, Any]:
        """The index meta kept in the collection's metadata (JSON), including `dim` once fixed."""
        return self._meta.get()

    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Merge `values` into the meta; `dim` may only be set while unset or unchanged."""
        self._meta.set(values)

    def upsert(self, records: Sequence[VectorRecord]) -> None:
        """Insert or replace `records`; all are checked before anything is written."""
        if not records:
            return
        # Keyed by id: a batch naming one id twice stores its last record, like successive upserts.
        latest: dict[str, tuple[npt.NDArray[np.float32], Metadata]] = {}
        for record in records:
            vector = checked_vector(record.vector, f"vector for id {record.id!r}")
            latest[record.id] = (vector, _chroma_metadata(record.metadata))
        self._meta.fix_dim(vector.shape[0] for vector, _ in latest.values())
        _claim_for_writing(self.path, self.label)
        ids = list(latest)
        for start in range(0, len(ids), self._batch):
            chunk = ids[start : start + self._batch]
            # Chroma's upsert merges into a stored record's metadata: the keys a replaced record no
            # longer has are written as None, which deletes them (0.04 s per 5,000 new ids here).
            stored = self._collection.get(ids=chunk, include=["metadatas"])
            previous = dict(zip(stored["ids"], stored["metadatas"] or [], strict=True))
            metadatas: list[Metadata] = [
                {**dict.fromkeys(previous.get(record_id) or {}), **latest[record_id][1]} for record_id in chunk
            ]
            self._collection.upsert(
                ids=chunk,
                embeddings=np.stack([latest[record_id][0] for record_id in chunk]),
                metadatas=metadatas,
            )

    def search(self, vector: Vector, k: int, where: Mapping[str, Any] | None = None) -> list[SearchHit]:
        """The at most `k` records most cosine-similar to `vector` whose metadata matches `where`.

        `where` maps metadata keys to a required value, or to a list of accepted values; a record
        whose value is a list (tags) matches when any of its elements is accepted.
        """
        check_k(k)
        return self._query([checked_vector(vector, "query vector")], k, where)[0]

    def search_many(
        self, vectors: Sequence[Vector] | npt.NDArray[np.float32], k: int, where: Mapping[str, Any] | None = None
    ) -> list[list[SearchHit]]:
        """`search` for each of `vectors`, in one Chroma query."""
        check_k(k)
        return self._query([checked_vector(vector, f"query vector {i}") for i, vector in enumerate(vectors)], k, where)

    def get(self, ids: Sequence[str]) -> list[VectorRecord]:
        """The stored records for `ids`, in the order asked; unknown ids are left out."""
        unique = list(dict.fromkeys(ids))
        found: dict[str, VectorRecord] = {}
        for start in range(0, len(unique), self._batch):
            result = self._collection.get(ids=unique[start : start + self._batch], include=["embeddings", "metadatas"])
            embeddings = result["embeddings"]
            metadatas = result["metadatas"]
            assert embeddings is not None and metadatas is not None
            for record_id, embedding, metadata in zip(result["ids"], embeddings, metadatas, strict=True):
                found[record_id] = VectorRecord(
                    record_id, np.asarray(embedding, dtype=np.float32), json.loads(str(metadata[_METADATA_KEY]))
                )
        return [found[record_id] for record_id in ids if record_id in found]

    def delete(self, ids: Sequence[str]) -> None:
        """Remove `ids`; unknown ids are ignored."""
        unique = list(dict.fromkeys(ids))
        if unique:
            _claim_for_writing(self.path, self.label)
        for start in range(0, len(unique), self._batch):
            self._collection.delete(ids=unique[start : start + self._batch])

    def ids(self) -> list[str]:
        """Every stored id, page by page (re-indexing prunes those whose file is gone)."""
        found: list[str] = []
        while page := self._collection.get(include=[], limit=self._batch, offset=len(found))["ids"]:
            found += page
        return found

    def count(self) -> int:
        """How many records the collection holds."""
        return self._collection.count()

    def _query(
        self, queries: list[npt.NDArray[np.float32]], k: int, where: Mapping[str, Any] | None
    ) -> list[list[SearchHit]]:
        """Search checked `queries` in one Chroma query; hits ordered by score, then id."""
        filters = _chroma_where(parse_where(where)) if where else None
        if not queries:
            return []
        answerable = [self._meta.accepts_query(query.shape[0]) for query in queries]
        if not all(answerable) or filters is _NOTHING:
            return [[] for _ in queries]
        result = self._collection.query(
            query_embeddings=np.stack(queries), n_results=k, where=filters, include=["metadatas", "distances"]
        )
        distances = result["distances"]
        metadatas = result["metadatas"]
        assert distances is not None and metadatas is not None
        hit_lists = []
        for ids, scores, found in zip(result["ids"], distances, metadatas, strict=True):
            hits = [
                SearchHit(
                    id=record_id,
                    score=float(np.clip(1.0 - distance, -1.0, 1.0)),
                    metadata=json.loads(str(metadata[_METADATA_KEY])),
                )
                for record_id, distance, metadata in zip(ids, scores, found, strict=True)
            ]
            # Chroma orders by distance; equal scores are put in id order, as the embedded store does.
            hit_lists.append(sorted(hits, key=lambda hit: (-hit.score, hit.id)))
        return hit_lists

    def _open_collection(self, create: bool) -> Collection:
        """The collection, created for cosine distance if missing and allowed; refuses a foreign one."""
        from chromadb.errors import NotFoundError

        # embedding_function=None: Chroma would otherwise attach (and record) its default ONNX model.
        try:
            collection = self._client.get_collection(COLLECTION_NAME, embedding_function=None)
        except NotFoundError:
            if not create:
                raise IndexNotFoundError(f"no {self.label}") from None
            _claim_for_writing(self.path, self.label)
            collection = self._client.get_or_create_collection(
                COLLECTION_NAME,
                configuration={"hnsw": {"space": "cosine"}},
                metadata={_META_KEY: json.dumps({})},
                embedding_function=None,
            )
        hnsw = collection.configuration_json.get("hnsw") or {}
        if hnsw.get("space") != "cosine" or _META_KEY not in (collection.metadata or {}):
            raise ConfigError(
                f"the collection {COLLECTION_NAME!r} in {self.label} was not created by imageloop (it needs cosine "
                f"distance): delete {self.path} and re-index"
            )
        self._meta.parse((collection.metadata or {}).get(_META_KEY))
        return collection

    def _read_meta(self) -> Any:
        """The meta's JSON text, read now from the collection's metadata."""
        return (self._client.get_collection(COLLECTION_NAME, embedding_function=None).metadata or {}).get(_META_KEY)

    def _write_meta(self, text: str) -> None:
        _claim_for_writing(self.path, self.label)
        self._collection.modify(metadata={_META_KEY: text})


@dataclass
class _Claim:
    """This process's lock on one Chroma folder, shared by all its handles there."""

    file: IO[str]
    handles: int = 0
    writing: bool = False


_claims: dict[Path, _Claim] = {}
_claims_lock = threading.Lock()


def _claim(path: Path, label: str) -> None:
    """Count a new handle on `path`; the process's first one takes the shared (reading) lock."""
    with _claims_lock:
        claim = _claims.get(path)
        if claim is None:
            file = (path / LOCK_FILENAME).open("a", encoding="utf-8")
            if not _flock(file, "shared"):
                file.close()
                raise ImageloopError(
                    f"the {label} is being written by another process, and Chroma's local client cannot "
                    "share a folder with a process that writes: retry when it is done"
                )
            claim = _claims[path] = _Claim(file)
        claim.handles += 1


def _claim_for_writing(path: Path, label: str) -> None:
    """Take the exclusive (writing) lock on `path` for this process; refused while another process has it open."""
    with _claims_lock:
        claim = _claims[path]
        if claim.writing:
            return
        if not _flock(claim.file, "exclusive"):
            # A refused upgrade has dropped the shared lock (flock converts by unlocking first): take it back.
            _flock(claim.file, "shared")
            raise ImageloopError(
                f"the {label} is open in another process, and Chroma's local client lets a process write "
                "only while no other has the folder open: close the other one (a server, a search) and retry"
            )
        claim.writing = True


def _release(path: Path) -> None:
    """Count a handle on `path` closed; the process's last one drops its lock."""
    with _claims_lock:
        claim = _claims[path]
        claim.handles -= 1
        if claim.handles == 0:
            del _claims[path]
            claim.file.close()  # closing the file releases its flock


def _flock(file: IO[str], mode: Literal["shared", "exclusive"]) -> bool:
    """Take (or convert to) an advisory lock without waiting; False when another process holds a conflicting one."""
    try:
        import fcntl
    except ImportError:
        return True  # no flock on this platform (Windows): processes are not kept apart
    try:
        fcntl.flock(file.fileno(), (fcntl.LOCK_SH if mode == "shared" else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _chromadb() -> tuple[Any, Any]:
    """The chromadb module and the client settings every handle uses (telemetry off), or a ConfigError."""
    try:
        import chromadb
        from chromadb.config import Settings
    except ImportError as e:
        raise ConfigError(f"the Chroma store needs the chroma extra: pip install 'imageloop[chroma]' ({e})") from e
    return chromadb, Settings(anonymized_telemetry=False)


def _chroma_metadata(metadata: Mapping[str, Any]) -> Metadata:
    """A record's Chroma metadata: the verbatim JSON, plus each key's filterable texts under `m:KEY`."""
    chroma: dict[str, Any] = {_METADATA_KEY: json.dumps(dict(metadata))}
    for key, value in metadata.items():
        items = value if isinstance(value, list | tuple) else [value]
        # Chroma refuses empty lists; a key without scalar values (an object, []) then matches no `where`.
        texts = sorted({canonical_json(item) for item in items if isinstance(item, _SCALARS)})
        if texts:
            chroma[_FILTER_PREFIX + str(key)] = texts
    return chroma


def _chroma_where(where: Where) -> dict[str, Any]:
    """The Chroma filter for a parsed `where`, or `_NOTHING` when a key accepts no value."""
    clauses = []
    for key, accepted in where:
        field = _FILTER_PREFIX + key
        options = [{field: {"$contains": text}} for text in sorted({canonical_json(value) for _, value in accepted})]
        if not options:
            return _NOTHING
        clauses.append(options[0] if len(options) == 1 else {"$or": options})
    return clauses[0] if len(clauses) == 1 else {"$and": clauses}
