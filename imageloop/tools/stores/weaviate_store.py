"""The scale-out vector store: one Weaviate collection per index, reached by URL (+ API key).

Vectors are self-provided (no Weaviate vectorizer) in one named vector, `default`, indexed with
HNSW under cosine distance, so a hit's similarity is `1 - distance`. Each record is one object
whose uuid is derived from the record id (uuid5), so upserting an id again overwrites it. Its
metadata is stored twice: verbatim as JSON (what `search` and `get` return) and, per top-level key,
as a filterable text property holding the value's canonical JSON (what `where` compares), so
equality filters are exact whatever the value's type. The index meta (embedder, dimension, route)
lives in the collection's description, so it travels with the vectors.

Weaviate is reached over REST (schema) and gRPC (batch writes, search, delete, count). Transient
failures (unreachable, timeouts, HTTP 5xx/429, gRPC errors) are retried with exponential backoff;
what still fails becomes a one-line `BackendError` naming the URL.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import numpy as np
import weaviate
from weaviate.classes.config import Configure, DataType, Property, Tokenization, VectorDistances
from weaviate.classes.data import DataObject
from weaviate.classes.init import AdditionalConfig, Auth, Timeout
from weaviate.classes.query import Filter, MetadataQuery
from weaviate.collections import Collection
from weaviate.exceptions import (
    InsufficientPermissionsError,
    UnexpectedStatusCodeError,
    WeaviateBaseError,
    WeaviateConnectionError,
    WeaviateGRPCUnavailableError,
    WeaviateQueryError,
    WeaviateRetryError,
    WeaviateStartUpError,
    WeaviateTimeoutError,
)

from imageloop.errors import BackendError, ConfigError, IndexNotFoundError
from imageloop.protocols import SearchHit, Vector, VectorRecord
from imageloop.tools.stores.checks import check_k, checked_vector
from imageloop.tools.stores.index_meta import IndexMeta
from imageloop.tools.stores.metadata_filter import canonical_json

T = TypeVar("T")

DEFAULT_GRPC_PORT = 50051
VECTOR_NAME = "default"
RECORD_ID_PROPERTY = "record_id"
METADATA_PROPERTY = "metadata_json"
# Never change: record uuids are derived from it, and existing collections hold those uuids.
RECORD_NAMESPACE = uuid.UUID("6f1c2b1e-5d0a-5b8e-9a4e-3c7d1f0b2a61")
# Objects per gRPC batch write, and ids per get/delete filter (the server caps query results).
WRITE_BATCH = 256
ID_BATCH = 500

_COLLECTION_NAME = re.compile(r"^[A-Z][_0-9A-Za-z]{0,230}$")
_PLAIN_KEY = re.compile(r"^[a-z0-9_]{1,200}$")
_CLOUD_SUFFIXES = (".weaviate.cloud", ".weaviate.network")


def record_uuid(record_id: str) -> str:
    """The Weaviate object uuid of a record id: stable, so an upsert of the same id overwrites."""
    return str(uuid.uuid5(RECORD_NAMESPACE, record_id))


def metadata_property(key: str) -> str:
    """The filterable property that holds metadata `key`: `m_<key>`, or a hash for unusual keys.

    Weaviate property names are restricted (and compared case-insensitively), so keys that are not
    lowercase identifiers are named by their sha256 instead.
    """
    if _PLAIN_KEY.match(key):
        return f"m_{key}"
    return f"mh_{hashlib.sha256(key.encode()).hexdigest()[:40]}"


def collection_name_for(folder: Path) -> str:
    """A default collection name for an image folder: readable, and unique per absolute path."""
    resolved = Path(folder).resolve()
    readable = re.sub(r"[^0-9A-Za-z]+", "_", resolved.name).strip("_")[:40] or "root"
    digest = hashlib.sha256(str(resolved).encode()).hexdigest()[:10]
    return f"Imageloop_{readable}_{digest}"


def check_collection_name(name: str) -> str:
    """`name` if Weaviate accepts it as a collection name, else a ConfigError saying what is allowed."""
    if not _COLLECTION_NAME.match(name):
        raise ConfigError(
            f"invalid Weaviate collection name {name!r}: use an uppercase letter, then letters, digits or underscores"
        )
    return name


class WeaviateVectorStore:
    """A `VectorStore` in one Weaviate collection, created on first open unless `create=False`."""

    def __init__(
        self,
        url: str,
        collection: str,
        *,
        api_key: str | None = None,
        grpc_port: int | None = None,
        create: bool = True,
        attempts: int = 3,
        backoff_s: float = 0.5,
        timeout_s: float = 30.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path.strip("/") or parts.query:
            raise ConfigError(f"invalid Weaviate URL {url!r}: expected http(s)://HOST[:PORT], without a path")
        if attempts < 1:
            raise ConfigError(f"attempts must be at least 1, got {attempts}")
        self.url = url.rstrip("/")
        self.collection_name = check_collection_name(collection)
        self._host = parts.hostname
        self._secure = parts.scheme == "https"
        self._http_port = parts.port or (443 if self._secure else 80)
        self._grpc_port = grpc_port or DEFAULT_GRPC_PORT
        self._cloud = self._host.endswith(_CLOUD_SUFFIXES)
        if self._cloud and not api_key:
            raise ConfigError(f"Weaviate Cloud at {self.url} needs an API key: set WEAVIATE_API_KEY")
        self._api_key = api_key
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._timeout_s = timeout_s
        # Caches of what this process last saw on the server; refreshed when a miss could be stale.
        self._lock = threading.RLock()
        self._properties: set[str] = set()
        self._meta = IndexMeta(self.label, self._read_description, self._write_description)
        self._client = self._retrying("connect", self._connect)
        try:
            self._collection = self._retrying("open the collection", lambda: self._open_collection(create))
        except BaseException:
            self._client.close()
            raise

    @property
    def label(self) -> str:
        """`collection NAME at URL`, as error messages name this store."""
        return f"collection {self.collection_name} at {self.url}"

    def close(self) -> None:
        """Close the client's HTTP and gRPC connections."""
        self._client.close()

    def drop(self) -> None:
        """Delete the whole collection (vectors and meta) from the server."""
        self._retrying("delete the collection", lambda: self._client.collections.delete(self.collection_name))

    def get_meta(self) -> dict[str, Any]:
        """The index meta kept in the collection's description (JSON), including `dim` once fixed."""
        return self._meta.get()

    def set_meta(self, values: Mapping[str, Any]) -> None:
        """Merge `values` into the meta; `dim` may only be set while unset or unchanged."""
        self._meta.set(values)

    def upsert(self, records: Sequence[VectorRecord]) -> None:
        """Insert or overwrite `records`; all are validated before anything is written.

        Weaviate has no multi-object transactions: a server failure part-way can leave earlier
        batches written. Re-running the same upsert is safe (same ids, same uuids).
        """
        if not records:
            return
        objects = []
        keys: set[str] = set()
        dims: set[int] = set()
        for record in records:
            vector = checked_vector(record.vector, f"vector for id {record.id!r}")
            dims.add(vector.shape[0])
            properties = {RECORD_ID_PROPERTY: record.id, METADATA_PROPERTY: json.dumps(dict(record.metadata))}
            for key, value in record.metadata.items():
                keys.add(str(key))
                properties[metadata_property(str(key))] = canonical_json(value)
            objects.append(
                DataObject(properties=properties, uuid=record_uuid(record.id), vector={VECTOR_NAME: vector.tolist()})
            )
        self._meta.fix_dim(dims)
        self._ensure_properties(keys)
        for start in range(0, len(objects), WRITE_BATCH):
            batch = objects[start : start + WRITE_BATCH]
            result = self._retrying("write vectors", partial(self._collection.data.insert_many, batch))
            if result.errors:
                first = next(iter(result.errors.values()))
                raise BackendError(
                    f"Weaviate at {self.url} refused {len(result.errors)} of {len(batch)} records: "
                    f"{_one_line(first.message)}"
                )

    def search(self, vector: Vector, k: int, where: Mapping[str, Any] | None = None) -> list[SearchHit]:
        """The at most `k` records most cosine-similar to `vector` whose metadata matches `where`.

        `where` maps metadata keys to a required value, or to a list of accepted values.
        """
        check_k(k)
        query = checked_vector(vector, "query vector")
        if not self._meta.accepts_query(query.shape[0]):
            return []
        filters = self._filters(where) if where else None
        if filters is False:
            return []
        result = self._retrying(
            "search",
            lambda: self._collection.query.near_vector(
                near_vector=query.tolist(),
                target_vector=VECTOR_NAME,
                limit=k,
                filters=filters or None,
                return_metadata=MetadataQuery(distance=True),
                return_properties=[RECORD_ID_PROPERTY, METADATA_PROPERTY],
            ),
        )
        hits = [
            SearchHit(
                id=str(obj.properties[RECORD_ID_PROPERTY]),
                score=float(np.clip(1.0 - (obj.metadata.distance or 0.0), -1.0, 1.0)),
                metadata=json.loads(str(obj.properties[METADATA_PROPERTY])),
            )
            for obj in result.objects
        ]
        # The server orders by distance; equal scores are put in id order, as the embedded store does.
        return sorted(hits, key=lambda hit: (-hit.score, hit.id))

    def get(self, ids: Sequence[str]) -> list[VectorRecord]:
        """The stored records for `ids`, in the order asked; unknown ids are left out."""
        found: dict[str, VectorRecord] = {}
        for chunk in _chunks(list(dict.fromkeys(ids)), ID_BATCH):
            uuids = [record_uuid(record_id) for record_id in chunk]
            result = self._retrying(
                "read vectors",
                partial(
                    self._collection.query.fetch_objects,
                    filters=Filter.by_id().contains_any(uuids),
                    limit=len(uuids),
                    include_vector=[VECTOR_NAME],
                    return_properties=[RECORD_ID_PROPERTY, METADATA_PROPERTY],
                ),
            )
            for obj in result.objects:
                record_id = str(obj.properties[RECORD_ID_PROPERTY])
                found[record_id] = VectorRecord(
                    id=record_id,
                    vector=np.asarray(obj.vector[VECTOR_NAME], dtype=np.float32),
                    metadata=json.loads(str(obj.properties[METADATA_PROPERTY])),
                )
        return [found[record_id] for record_id in ids if record_id in found]

    def delete(self, ids: Sequence[str]) -> None:
        """Remove `ids`; unknown ids are ignored."""
        for chunk in _chunks(list(dict.fromkeys(ids)), ID_BATCH):
            uuids = [record_uuid(record_id) for record_id in chunk]
            result = self._retrying(
                "delete vectors",
                partial(self._collection.data.delete_many, where=Filter.by_id().contains_any(uuids)),
            )
            if result.failed:
                raise BackendError(f"Weaviate at {self.url} failed to delete {result.failed} of {len(chunk)} records")

    def ids(self) -> list[str]:
        """Every stored id, read page by page with Weaviate's cursor (offsets stop at 10,000 objects)."""
        found: list[str] = []
        after: str | None = None
        while True:
            page = self._retrying(
                "list ids",
                partial(
                    self._collection.query.fetch_objects,
                    limit=ID_BATCH,
                    after=after,
                    return_properties=[RECORD_ID_PROPERTY],
                ),
            )
            found += [str(obj.properties[RECORD_ID_PROPERTY]) for obj in page.objects]
            if len(page.objects) < ID_BATCH:
                return found
            after = str(page.objects[-1].uuid)

    def count(self) -> int:
        """How many records the collection holds."""
        result = self._retrying("count vectors", lambda: self._collection.aggregate.over_all(total_count=True))
        return int(result.total_count or 0)

    # Connection and schema.

    def _connect(self) -> weaviate.WeaviateClient:
        """A connected client whose gRPC port answers (checked here: the client's own check also calls PyPI)."""
        auth = Auth.api_key(self._api_key) if self._api_key else None
        config = AdditionalConfig(
            timeout=Timeout(init=min(self._timeout_s, 10.0), query=self._timeout_s, insert=self._timeout_s)
        )
        if self._cloud:
            assert auth is not None
            client = weaviate.connect_to_weaviate_cloud(
                cluster_url=self.url, auth_credentials=auth, additional_config=config, skip_init_checks=True
            )
        else:
            client = weaviate.connect_to_custom(
                http_host=self._host,
                http_port=self._http_port,
                http_secure=self._secure,
                grpc_host=self._host,
                grpc_port=self._grpc_port,
                grpc_secure=self._secure,
                auth_credentials=auth,
                additional_config=config,
                skip_init_checks=True,
            )
        try:
            # A wrong gRPC port would otherwise surface only at the first search, after the
            # client's own minute of UNAVAILABLE retries.
            ping = getattr(client._connection, "_ping_grpc", None)
            if ping is not None:
                ping("sync")
        except BaseException:
            client.close()
            raise
        return client

    def _open_collection(self, create: bool) -> Collection[Any, Any]:
        """The collection, created with our schema if missing and allowed; refuses a foreign one."""
        collections = self._client.collections
        if not collections.exists(self.collection_name):
            if not create:
                raise IndexNotFoundError(f"no {self.label}")
            try:
                collections.create(
                    self.collection_name,
                    description=json.dumps({}),
                    properties=[
                        Property(name=name, data_type=DataType.TEXT, index_filterable=False, index_searchable=False)
                        for name in (RECORD_ID_PROPERTY, METADATA_PROPERTY)
                    ],
                    vector_config=Configure.Vectors.self_provided(
                        name=VECTOR_NAME,
                        vector_index_config=Configure.VectorIndex.hnsw(distance_metric=VectorDistances.COSINE),
                    ),
                )
            except UnexpectedStatusCodeError as e:
                # Another process created it between our check and our create: use theirs.
                if e.status_code != 422 or not collections.exists(self.collection_name):
                    raise
        collection = collections.use(self.collection_name)
        config = collection.config.get()
        vectors = config.vector_config or {}
        named = vectors.get(VECTOR_NAME)
        names = {prop.name for prop in config.properties}
        if (
            named is None
            or getattr(named.vector_index_config, "distance_metric", None) != VectorDistances.COSINE
            or not {RECORD_ID_PROPERTY, METADATA_PROPERTY} <= names
        ):
            raise ConfigError(
                f"{self.label} was not created by imageloop (it needs a cosine vector named {VECTOR_NAME!r} "
                f"and properties {RECORD_ID_PROPERTY!r}, {METADATA_PROPERTY!r}): choose another collection name"
            )
        with self._lock:
            self._properties = names
        self._meta.parse(config.description)
        return collection

    def _read_description(self) -> str | None:
        """The collection's description (the index meta); refreshes the property cache on the way."""
        config = self._retrying("read the index meta", self._collection.config.get)
        with self._lock:
            self._properties = {prop.name for prop in config.properties}
        return config.description

    def _write_description(self, description: str) -> None:
        self._retrying("write the index meta", lambda: self._collection.config.update(description=description))

    def _ensure_properties(self, keys: set[str]) -> None:
        """Add a filterable text property for every metadata key the collection does not have yet."""
        with self._lock:
            missing = {metadata_property(key) for key in keys} - self._properties
            if missing:
                self.get_meta()  # refreshes the property cache: another process may have added them
                missing -= self._properties
            for name in sorted(missing):
                self._retrying("add a metadata property", partial(self._add_property, name))
                self._properties.add(name)

    def _add_property(self, name: str) -> None:
        try:
            self._collection.config.add_property(
                Property(
                    name=name,
                    data_type=DataType.TEXT,
                    tokenization=Tokenization.FIELD,
                    index_filterable=True,
                    index_searchable=False,
                )
            )
        except UnexpectedStatusCodeError as e:
            if e.status_code != 422 or name not in {prop.name for prop in self._collection.config.get().properties}:
                raise

    def _filters(self, where: Mapping[str, Any]) -> Any:
        """The Weaviate filter for `where`, or False when no record can match (an unknown key, no options)."""
        with self._lock:
            names = {key: metadata_property(str(key)) for key in where}
            if not set(names.values()) <= self._properties:
                self.get_meta()
                if not set(names.values()) <= self._properties:
                    return False
        clauses = []
        for key, wanted in where.items():
            target = Filter.by_property(names[key])
            if isinstance(wanted, list | tuple | set | frozenset):
                options = sorted({canonical_json(option) for option in wanted})
                if not options:
                    return False
                clauses.append(target.contains_any(options))
            else:
                clauses.append(target.equal(canonical_json(wanted)))
        return clauses[0] if len(clauses) == 1 else Filter.all_of(clauses)

    def _retrying(self, what: str, call: Callable[[], T]) -> T:
        """`call()`, retried with exponential backoff on transient failures, else a one-line BackendError."""
        for attempt in range(1, self._attempts + 1):
            try:
                return call()
            except WeaviateBaseError as e:
                if attempt < self._attempts and _is_transient(e):
                    _pause(self._backoff_s * 2 ** (attempt - 1))
                    continue
                raise BackendError(self._failure(what, e, attempt)) from e
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _failure(self, what: str, error: WeaviateBaseError, attempts: int) -> str:
        tries = f"{attempts} attempt{'s' if attempts > 1 else ''}"
        if isinstance(error, WeaviateGRPCUnavailableError):
            return (
                f"cannot reach Weaviate's gRPC port at {self._host}:{self._grpc_port} for {self.url} ({tries}): "
                "is the server running, and is the gRPC port right?"
            )
        if isinstance(error, WeaviateStartUpError | WeaviateConnectionError):
            return f"cannot reach Weaviate at {self.url} ({tries}): {_one_line(str(error))}"
        status = getattr(error, "status_code", None)
        if status in (401, 403):
            return (
                f"Weaviate at {self.url} refused to {what} (HTTP {status}): check the API key "
                "(WEAVIATE_API_KEY or `weaviate_api_key`)"
            )
        return f"Weaviate at {self.url} failed to {what} ({tries}): {_one_line(str(error))}"


def _is_transient(error: WeaviateBaseError) -> bool:
    """Worth retrying: the network, an overloaded or failing server, or a gRPC error (whose code the client drops)."""
    if isinstance(error, InsufficientPermissionsError):
        return False
    if isinstance(error, UnexpectedStatusCodeError):
        return error.status_code >= 500 or error.status_code == 429
    return isinstance(
        error,
        WeaviateConnectionError
        | WeaviateTimeoutError
        | WeaviateStartUpError
        | WeaviateGRPCUnavailableError
        | WeaviateRetryError
        | WeaviateQueryError,
    )


def _pause(seconds: float) -> None:
    """The wait between attempts; tests replace it to see the backoff without waiting."""
    time.sleep(seconds)


def _chunks(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _one_line(text: str, limit: int = 300) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
