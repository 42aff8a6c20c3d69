"""FakeWeaviateServer: Weaviate's wire protocol on 127.0.0.1, backed by exact numpy search.

No Weaviate server can run where the tests run, so the real `weaviate-client` is pointed at this
fake instead: REST (`/v1/meta`, `/v1/schema...`) on a stdlib HTTP server and the gRPC service
`weaviate.v1.Weaviate` built from the stubs the client itself ships (as the client's own mock tests
do), so every request is the client's real serialisation and every reply goes through its real
parsing.

What it implements, and nothing more:
- REST: `GET /v1/meta`, `GET /v1/.well-known/{ready,live}`, `GET/POST /v1/schema`,
  `GET/PUT/DELETE /v1/schema/{Class}`, `POST /v1/schema/{Class}/properties`. Created classes come
  back with the server-side defaults filled in (inverted index, replication, sharding, HNSW keys,
  property index flags), as a real server returns them.
- gRPC: the health check; `Search` (near_vector or plain fetch, filters, limit/offset, distance
  and vector metadata, property selection; the server's default limit of 10 when none is sent);
  `BatchObjects` (an object whose uuid exists is replaced whole, as Weaviate's batch import does);
  `BatchDelete`; `Aggregate` (total count only). Everything else answers UNIMPLEMENTED, and any REST path it does
  not know answers 404 and is listed in `unhandled`, so a client change that needs more is seen.
- Vectors: named vectors only (`vectorConfig`, what `Configure.Vectors.self_provided` creates),
  cosine or dot distance, exact search; no HNSW approximation, no auto-schema (an unknown property
  is a per-object error, as with `AUTOSCHEMA_ENABLED=false`), no tenants, no references, no
  object or date properties, no GraphQL.
- Filters: equal, not-equal, and/or/not, contains-any/all/none, is-null, on properties and `_id`.
- Auth: with `api_key` set, every REST request needs `Authorization: Bearer <key>` (else 401) and
  every gRPC call the same metadata (else UNAUTHENTICATED); the health check, which the client
  sends without credentials, needs none.
- Faults: `fail_next(n)` makes the next n requests, REST or gRPC, fail with HTTP 500 / INTERNAL.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from weaviate.proto.v1 import (
    aggregate_pb2,
    base_pb2,
    batch_delete_pb2,
    batch_pb2,
    health_weaviate_pb2,
    properties_pb2,
    search_get_pb2,
    weaviate_pb2_grpc,
)

SERVER_VERSION = "1.35.7"
# The server's QUERY_DEFAULTS_LIMIT: a search that sets no limit gets this many results.
DEFAULT_LIMIT = 10
CLASS_NAME = re.compile(r"^[A-Z][_0-9A-Za-z]{0,254}$")
PROPERTY_NAME = re.compile(r"^[_A-Za-z][_0-9A-Za-z]{0,230}$")

HNSW_DEFAULTS: dict[str, Any] = {
    "skip": False,
    "cleanupIntervalSeconds": 300,
    "maxConnections": 32,
    "efConstruction": 128,
    "ef": -1,
    "dynamicEfMin": 100,
    "dynamicEfMax": 500,
    "dynamicEfFactor": 8,
    "vectorCacheMaxObjects": 1000000000000,
    "flatSearchCutoff": 40000,
    "distance": "cosine",
    "pq": {
        "enabled": False,
        "bitCompression": False,
        "segments": 0,
        "centroids": 256,
        "trainingLimit": 100000,
        "encoder": {"type": "kmeans", "distribution": "log-normal"},
    },
    "bq": {"enabled": False},
    "sq": {"enabled": False, "trainingLimit": 100000, "rescoreLimit": 20},
    "filterStrategy": "sweeping",
    "multivector": {"enabled": False, "aggregation": "maxSim", "muvera": {"enabled": False}},
}
CLASS_DEFAULTS: dict[str, Any] = {
    "invertedIndexConfig": {
        "bm25": {"b": 0.75, "k1": 1.2},
        "cleanupIntervalSeconds": 60,
        "stopwords": {"preset": "en", "additions": None, "removals": None},
        "usingBlockMaxWAND": True,
    },
    "multiTenancyConfig": {"enabled": False, "autoTenantCreation": False, "autoTenantActivation": False},
    "replicationConfig": {"factor": 1, "asyncEnabled": False, "deletionStrategy": "NoAutomatedResolution"},
    "shardingConfig": {
        "virtualPerPhysical": 128,
        "desiredCount": 1,
        "actualCount": 1,
        "desiredVirtualCount": 128,
        "actualVirtualCount": 128,
        "key": "_id",
        "strategy": "hash",
        "function": "murmur3",
    },
}
SUPPORTED_DISTANCES = ("cosine", "dot")
UNIMPLEMENTED_SEARCHES = (
    "hybrid_search", "bm25_search", "near_object", "near_text", "near_image", "near_audio", "near_video",
    "near_depth", "near_thermal", "near_imu", "group_by", "generative", "rerank", "boost",
)  # fmt: skip


class FakeWeaviateError(Exception):
    """A request the fake refuses, with the HTTP status and gRPC code a real server would use."""

    def __init__(self, message: str, http_status: int = 422, grpc_code: grpc.StatusCode = grpc.StatusCode.UNKNOWN):
        super().__init__(message)
        self.http_status = http_status
        self.grpc_code = grpc_code


def _unimplemented(message: str) -> FakeWeaviateError:
    """What the fake says about a feature it does not have (HTTP 501, gRPC UNIMPLEMENTED)."""
    return FakeWeaviateError(message, 501, grpc.StatusCode.UNIMPLEMENTED)


@dataclass
class StoredObject:
    """One object: its properties and its named vectors (kept as sent, not normalised)."""

    properties: dict[str, Any]
    vectors: dict[str, np.ndarray]


@dataclass
class StoredClass:
    schema: dict[str, Any]
    objects: dict[str, StoredObject] = field(default_factory=dict)


def _merge_defaults(defaults: dict[str, Any], given: dict[str, Any] | None) -> dict[str, Any]:
    """`given` on top of `defaults`, recursively, the way the server fills an incomplete config."""
    merged = json.loads(json.dumps(defaults))
    for key, value in (given or {}).items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge_defaults(merged[key], value)
        else:
            merged[key] = value
    return merged


def _with_property_defaults(prop: dict[str, Any]) -> dict[str, Any]:
    if not PROPERTY_NAME.match(str(prop.get("name", ""))):
        raise FakeWeaviateError(f"'{prop.get('name')}' is not a valid property name")
    data_type = prop.get("dataType") or []
    if not data_type:
        raise FakeWeaviateError(f"property '{prop['name']}': dataType is required")
    is_text = data_type[0] in ("text", "text[]")
    return {
        "indexFilterable": True,
        "indexSearchable": is_text,
        "indexRangeFilters": False,
        **({"tokenization": "word"} if is_text else {}),
        **prop,
    }


def _with_class_defaults(body: dict[str, Any]) -> dict[str, Any]:
    name = str(body.get("class", ""))
    name = name[:1].upper() + name[1:]
    if not CLASS_NAME.match(name):
        raise FakeWeaviateError(f"'{name}' is not a valid class name")
    if body.get("vectorIndexConfig") or body.get("vectorizer") not in (None, "none"):
        raise _unimplemented("fake Weaviate: only named vectors (vectorConfig) are implemented")
    schema = {key: _merge_defaults(value, body.get(key)) for key, value in CLASS_DEFAULTS.items()}
    schema["class"] = name
    if body.get("description") is not None:
        schema["description"] = body["description"]
    schema["properties"] = [_with_property_defaults(prop) for prop in body.get("properties") or []]
    vector_config = {}
    for vector_name, config in (body.get("vectorConfig") or {}).items():
        index_type = config.get("vectorIndexType", "hnsw")
        if index_type != "hnsw":
            raise _unimplemented(f"fake Weaviate: vectorIndexType {index_type!r} is not implemented")
        index_config = _merge_defaults(HNSW_DEFAULTS, config.get("vectorIndexConfig"))
        if index_config["distance"] not in SUPPORTED_DISTANCES:
            raise _unimplemented(f"fake Weaviate: distance {index_config['distance']!r} is not implemented")
        vector_config[vector_name] = {
            "vectorizer": config.get("vectorizer") or {"none": {}},
            "vectorIndexType": index_type,
            "vectorIndexConfig": index_config,
        }
    schema["vectorConfig"] = vector_config
    return schema


class FakeWeaviateServer:
    """Weaviate REST + gRPC on 127.0.0.1 for the real client; use as a context manager."""

    def __init__(self, *, api_key: str | None = None, version: str = SERVER_VERSION) -> None:
        self.api_key = api_key
        self.version = version
        self.classes: dict[str, StoredClass] = {}
        # "GET /v1/meta", "grpc Search", ...: every request in arrival order, for assertions.
        self.requests: list[str] = []
        # The Authorization header (REST) or metadata (gRPC) of every request, None when absent.
        self.authorizations: list[str | None] = []
        self.unhandled: list[str] = []
        self._faults = 0
        self._lock = threading.RLock()
        self._http: ThreadingHTTPServer | None = None
        self._grpc: grpc.Server | None = None
        self.http_port = 0
        self.grpc_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self) -> FakeWeaviateServer:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _rest_handler(self))
        self._http.daemon_threads = True
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="fake-weaviate-rest", daemon=True).start()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
        weaviate_pb2_grpc.add_WeaviateServicer_to_server(_WeaviateServicer(self), self._grpc)
        self._grpc.add_generic_rpc_handlers([_health_handler(self)])
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=None)
            self._grpc = None

    def __enter__(self) -> FakeWeaviateServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def fail_next(self, count: int) -> None:
        """Make the next `count` requests (REST: HTTP 500, gRPC: INTERNAL) fail, as a sick server does."""
        with self._lock:
            self._faults = count

    # Shared by both protocols.

    def _admit(self, request: str, authorization: str | None) -> None:
        """Log the request; raise for a missing key or an injected fault."""
        with self._lock:
            self.requests.append(request)
            self.authorizations.append(authorization)
            if self.api_key is not None and authorization != f"Bearer {self.api_key}":
                raise FakeWeaviateError(
                    "anonymous access not enabled, please provide an auth scheme such as OIDC or API key",
                    401,
                    grpc.StatusCode.UNAUTHENTICATED,
                )
            if self._faults > 0:
                self._faults -= 1
                raise FakeWeaviateError("fake Weaviate: injected fault", 500, grpc.StatusCode.INTERNAL)

    def _class(self, name: str) -> StoredClass:
        stored = self.classes.get(name)
        if stored is None:
            raise FakeWeaviateError(f"could not find class {name} in schema", 404, grpc.StatusCode.NOT_FOUND)
        return stored

    # REST

    def handle_rest(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        """One REST request: the status and the JSON body of the reply."""
        parts = path.split("?", 1)[0].rstrip("/").split("/")[1:]
        with self._lock:
            if parts[:1] != ["v1"]:
                return self._unhandled(method, path)
            route = parts[1:]
            if method == "GET" and route == ["meta"]:
                return 200, {
                    "hostname": f"http://[::]:{self.http_port}",
                    "version": self.version,
                    "modules": {},
                    "grpcMaxMessageSize": 104858000,
                }
            if method == "GET" and route in (
                [".well-known", "ready"],
                [".well-known", "live"],
            ):
                return 200, None
            if method == "GET" and route == [".well-known", "openid-configuration"]:
                return 404, None
            if route[:1] != ["schema"]:
                return self._unhandled(method, path)
            if route == ["schema"]:
                if method == "GET":
                    return 200, {"classes": [stored.schema for stored in self.classes.values()]}
                if method == "POST":
                    schema = _with_class_defaults(body)
                    if schema["class"] in self.classes:
                        raise FakeWeaviateError(f"class name {schema['class']!r} already exists")
                    self.classes[schema["class"]] = StoredClass(schema)
                    return 200, schema
            if len(route) == 2:
                name = route[1]
                if method == "GET":
                    return 200, self._class(name).schema
                if method == "DELETE":
                    self.classes.pop(name, None)
                    return 200, None
                if method == "PUT":
                    stored = self._class(name)
                    if body.get("vectorConfig") != stored.schema["vectorConfig"]:
                        raise _unimplemented("fake Weaviate: changing vectorConfig is not implemented")
                    stored.schema = {**stored.schema, **body, "class": name}
                    return 200, stored.schema
            if len(route) == 3 and route[2] == "properties" and method == "POST":
                stored = self._class(route[1])
                prop = _with_property_defaults(body)
                if any(p["name"].lower() == prop["name"].lower() for p in stored.schema["properties"]):
                    raise FakeWeaviateError(f"property {prop['name']!r} already exists")
                stored.schema["properties"].append(prop)
                return 200, prop
            return self._unhandled(method, path)

    def _unhandled(self, method: str, path: str) -> tuple[int, Any]:
        self.unhandled.append(f"{method} {path}")
        return 404, None

    # gRPC

    def search(self, request: search_get_pb2.SearchRequest) -> search_get_pb2.SearchReply:
        with self._lock:
            started = time.perf_counter()
            stored = self._class(request.collection)
            _refuse_unimplemented_search(request)
            keep = _filter_predicate(request.filters) if request.HasField("filters") else _always
            candidates = [(key, obj) for key, obj in sorted(stored.objects.items()) if keep(key, obj)]
            if request.after:  # the cursor: objects in uuid order after the given one
                candidates = [(key, obj) for key, obj in candidates if key > request.after]
            limit = request.limit or DEFAULT_LIMIT
            distances: dict[str, float] = {}
            if request.HasField("near_vector"):
                ranked = _rank(stored, candidates, request.near_vector)
                candidates = [(key, obj) for key, obj, _ in ranked]
                distances = {key: distance for key, _, distance in ranked}
            results = [
                _search_result(request, stored, key, obj, distances.get(key))
                for key, obj in candidates[request.offset : request.offset + limit]
            ]
            return search_get_pb2.SearchReply(took=time.perf_counter() - started, results=results)

    def batch_objects(self, request: batch_pb2.BatchObjectsRequest) -> batch_pb2.BatchObjectsReply:
        with self._lock:
            started = time.perf_counter()
            errors = []
            for index, obj in enumerate(request.objects):
                try:
                    self._put_object(obj)
                except FakeWeaviateError as e:
                    errors.append(batch_pb2.BatchObjectsReply.BatchError(index=index, error=str(e)))
            return batch_pb2.BatchObjectsReply(took=time.perf_counter() - started, errors=errors)

    def _put_object(self, obj: batch_pb2.BatchObject) -> None:
        stored = self._class(obj.collection)
        if obj.tenant:
            raise FakeWeaviateError("fake Weaviate: tenants are not implemented")
        properties = _decode_batch_properties(obj.properties) if obj.HasField("properties") else {}
        known = {p["name"] for p in stored.schema["properties"]}
        for name in properties:
            if name not in known:
                raise FakeWeaviateError(
                    f"no such prop with name '{name}' found in class '{obj.collection}' in the schema"
                )
        vectors: dict[str, np.ndarray] = {}
        if obj.vector_bytes or obj.vector:
            raise FakeWeaviateError("fake Weaviate: unnamed vectors are not implemented, send named vectors")
        for vector in obj.vectors:
            name = vector.name or "default"
            if name not in stored.schema["vectorConfig"]:
                raise FakeWeaviateError(f"collection {obj.collection} has no vector named {name!r}")
            if vector.type == base_pb2.Vectors.VECTOR_TYPE_MULTI_FP32:
                raise FakeWeaviateError("fake Weaviate: multi-vectors are not implemented")
            values = np.frombuffer(vector.vector_bytes, dtype="<f4").astype(np.float32)
            for other in stored.objects.values():
                if name in other.vectors and other.vectors[name].shape != values.shape:
                    raise FakeWeaviateError(
                        f"new node has a vector with length {values.shape[0]}. "
                        f"Existing nodes have vectors with length {other.vectors[name].shape[0]}"
                    )
                break
            vectors[name] = values
        stored.objects[str(uuid.UUID(obj.uuid))] = StoredObject(properties, vectors)

    def batch_delete(self, request: batch_delete_pb2.BatchDeleteRequest) -> batch_delete_pb2.BatchDeleteReply:
        with self._lock:
            started = time.perf_counter()
            stored = self._class(request.collection)
            keep = _filter_predicate(request.filters)
            matches = [key for key, obj in stored.objects.items() if keep(key, obj)]
            if not request.dry_run:
                for key in matches:
                    del stored.objects[key]
            return batch_delete_pb2.BatchDeleteReply(
                took=time.perf_counter() - started,
                matches=len(matches),
                successful=0 if request.dry_run else len(matches),
                failed=0,
                objects=[
                    batch_delete_pb2.BatchDeleteObject(uuid=uuid.UUID(key).bytes, successful=not request.dry_run)
                    for key in matches
                ]
                if request.verbose
                else [],
            )

    def aggregate(self, request: aggregate_pb2.AggregateRequest) -> aggregate_pb2.AggregateReply:
        with self._lock:
            started = time.perf_counter()
            stored = self._class(request.collection)
            search = request.WhichOneof("search")
            if request.aggregations or request.HasField("group_by") or search is not None:
                raise _unimplemented("fake Weaviate: Aggregate implements objects_count only")
            keep = _filter_predicate(request.filters) if request.HasField("filters") else _always
            count = sum(1 for key, obj in stored.objects.items() if keep(key, obj))
            return aggregate_pb2.AggregateReply(
                took=time.perf_counter() - started,
                single_result=aggregate_pb2.AggregateReply.Single(objects_count=count),
            )


def _always(key: str, obj: StoredObject) -> bool:
    return True


def _refuse_unimplemented_search(request: search_get_pb2.SearchRequest) -> None:
    for name in UNIMPLEMENTED_SEARCHES:
        if request.HasField(name):
            raise _unimplemented(f"fake Weaviate: {name} is not implemented")
    if request.sort_by or request.autocut or request.tenant:
        raise _unimplemented("fake Weaviate: sort, autocut and tenants are not implemented")


def _decode_batch_properties(properties: batch_pb2.BatchObject.Properties) -> dict[str, Any]:
    if (
        properties.single_target_ref_props
        or properties.multi_target_ref_props
        or properties.object_properties
        or properties.object_array_properties
    ):
        raise FakeWeaviateError("fake Weaviate: references and object properties are not implemented")
    decoded: dict[str, Any] = json_format.MessageToDict(properties.non_ref_properties)
    for arrays in (
        properties.text_array_properties,
        properties.int_array_properties,
        properties.boolean_array_properties,
    ):
        for array in arrays:
            decoded[array.prop_name] = list(array.values)
    for numbers in properties.number_array_properties:
        decoded[numbers.prop_name] = (
            np.frombuffer(numbers.values_bytes, dtype="<f8").tolist() if numbers.values_bytes else list(numbers.values)
        )
    for name in properties.empty_list_props:
        decoded[name] = []
    return decoded


def _query_vector(stored: StoredClass, near: Any) -> tuple[str, np.ndarray]:
    """The target vector's name and the query vector of a NearVector message."""
    names = list(stored.schema["vectorConfig"])
    targets = list(near.targets.target_vectors) or list(near.target_vectors)
    if len(targets) > 1:
        raise _unimplemented("fake Weaviate: multi-target search is not implemented")
    if not targets and len(names) != 1:
        raise FakeWeaviateError(
            "multiple vectors configured: a target vector is required", grpc_code=grpc.StatusCode.INVALID_ARGUMENT
        )
    target = targets[0] if targets else names[0]
    if target not in stored.schema["vectorConfig"]:
        raise FakeWeaviateError(f"target vector {target!r} does not exist", grpc_code=grpc.StatusCode.INVALID_ARGUMENT)
    if near.vector_for_targets:
        raise _unimplemented("fake Weaviate: vector_for_targets is not implemented")
    if near.vectors:
        (vector,) = near.vectors
        if vector.type == base_pb2.Vectors.VECTOR_TYPE_MULTI_FP32:
            raise _unimplemented("fake Weaviate: multi-vectors are not implemented")
        raw = vector.vector_bytes
    else:
        raw = near.vector_bytes
    return target, np.frombuffer(raw, dtype="<f4").astype(np.float64)


def _rank(
    stored: StoredClass, candidates: list[tuple[str, StoredObject]], near: Any
) -> list[tuple[str, StoredObject, float]]:
    """Candidates with a vector for the target, by ascending distance (ties by uuid), cut by threshold."""
    target, query = _query_vector(stored, near)
    metric = stored.schema["vectorConfig"][target]["vectorIndexConfig"]["distance"]
    ranked = []
    for key, obj in candidates:
        vector = obj.vectors.get(target)
        if vector is None:
            continue
        if vector.shape != query.shape:
            raise FakeWeaviateError(
                f"vector search: knn search: distance between entrypoint and query node: vector lengths don't match: "
                f"{vector.shape[0]} vs {query.shape[0]}",
                grpc_code=grpc.StatusCode.UNKNOWN,
            )
        stored_vector = vector.astype(np.float64)
        if metric == "cosine":
            distance = 1.0 - float(stored_vector @ query) / float(np.linalg.norm(stored_vector) * np.linalg.norm(query))
        else:
            distance = -float(stored_vector @ query)
        ranked.append((key, obj, distance))
    ranked.sort(key=lambda item: (item[2], item[0]))
    if near.HasField("distance"):
        ranked = [item for item in ranked if item[2] <= near.distance]
    if near.HasField("certainty"):
        ranked = [item for item in ranked if 1.0 - item[2] / 2.0 >= near.certainty]
    return ranked


def _search_result(
    request: search_get_pb2.SearchRequest, stored: StoredClass, key: str, obj: StoredObject, distance: float | None
) -> search_get_pb2.SearchResult:
    wanted = request.metadata
    metadata = search_get_pb2.MetadataResult(id=key, id_as_bytes=uuid.UUID(key).bytes)
    if wanted.distance and distance is not None:
        metadata.distance = distance
        metadata.distance_present = True
    if wanted.certainty and distance is not None:
        metadata.certainty = 1.0 - distance / 2.0
        metadata.certainty_present = True
    names = list(obj.vectors) if wanted.vector else list(wanted.vectors)
    for name in names:
        if name in obj.vectors:
            metadata.vectors.append(
                base_pb2.Vectors(
                    name=name,
                    vector_bytes=obj.vectors[name].astype("<f4").tobytes(),
                    type=base_pb2.Vectors.VECTOR_TYPE_SINGLE_FP32,
                )
            )
    if request.HasField("properties"):
        selected = request.properties
        if selected.ref_properties or selected.object_properties:
            raise _unimplemented("fake Weaviate: reference and object properties are not implemented")
        names = list(obj.properties) if selected.return_all_nonref_properties else list(selected.non_ref_properties)
    else:
        names = []
    properties = properties_pb2.Properties(
        fields={name: _property_value(obj.properties[name]) for name in names if name in obj.properties}
    )
    return search_get_pb2.SearchResult(
        metadata=metadata,
        properties=search_get_pb2.PropertiesResult(
            target_collection=stored.schema["class"], non_ref_props=properties, metadata=metadata
        ),
    )


def _property_value(value: Any) -> properties_pb2.Value:
    if value is None:
        return properties_pb2.Value(null_value=0)
    if isinstance(value, bool):
        return properties_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return properties_pb2.Value(int_value=value)
    if isinstance(value, float):
        return properties_pb2.Value(number_value=value)
    if isinstance(value, str):
        return properties_pb2.Value(text_value=value)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return properties_pb2.Value(
            list_value=properties_pb2.ListValue(text_values=properties_pb2.TextValues(values=value))
        )
    raise FakeWeaviateError(f"fake Weaviate: returning {type(value).__name__} properties is not implemented")


Predicate = Callable[[str, StoredObject], bool]
_Op = base_pb2.Filters


def _filter_value(filters: base_pb2.Filters) -> Any:
    """The comparison value of a leaf filter, as a Python value or list."""
    kind = filters.WhichOneof("test_value")
    if kind is None:
        raise FakeWeaviateError("filter has no value", grpc_code=grpc.StatusCode.INVALID_ARGUMENT)
    value = getattr(filters, kind)
    if kind.endswith("_array"):
        return list(value.values)
    if kind == "value_geo":
        raise _unimplemented("fake Weaviate: geo filters are not implemented")
    return value


def _filter_target(filters: base_pb2.Filters) -> str:
    if filters.HasField("target"):
        if filters.target.WhichOneof("target") != "property":
            raise _unimplemented("fake Weaviate: reference filters are not implemented")
        return str(filters.target.property)
    if len(filters.on) != 1:
        raise _unimplemented("fake Weaviate: reference filters are not implemented")
    return str(filters.on[0])


def _filter_predicate(filters: base_pb2.Filters) -> Predicate:
    """A Python predicate equivalent to a gRPC filter tree (text values compared as whole fields)."""
    operator = filters.operator
    if operator in (_Op.OPERATOR_AND, _Op.OPERATOR_OR):
        children = [_filter_predicate(child) for child in filters.filters]
        combine = all if operator == _Op.OPERATOR_AND else any
        return lambda key, obj: combine(child(key, obj) for child in children)
    if operator == _Op.OPERATOR_NOT:
        (child,) = [_filter_predicate(child) for child in filters.filters]
        return lambda key, obj: not child(key, obj)
    target = _filter_target(filters)

    def field_values(key: str, obj: StoredObject) -> list[Any] | None:
        value = key if target == "_id" else obj.properties.get(target)
        if value is None:
            return None
        return value if isinstance(value, list) else [value]

    if operator == _Op.OPERATOR_IS_NULL:
        wanted_null = bool(filters.value_boolean)
        return lambda key, obj: (field_values(key, obj) is None) == wanted_null
    wanted = _filter_value(filters)
    if target == "_id":
        wanted = [str(uuid.UUID(v)) for v in wanted] if isinstance(wanted, list) else str(uuid.UUID(wanted))
    if operator in (_Op.OPERATOR_EQUAL, _Op.OPERATOR_NOT_EQUAL):
        equal = operator == _Op.OPERATOR_EQUAL

        def compare(key: str, obj: StoredObject) -> bool:
            values = field_values(key, obj)
            if values is None:
                return False
            return (wanted in values) == equal

        return compare
    if operator in (_Op.OPERATOR_CONTAINS_ANY, _Op.OPERATOR_CONTAINS_ALL, _Op.OPERATOR_CONTAINS_NONE):
        options = wanted if isinstance(wanted, list) else [wanted]

        def contains(key: str, obj: StoredObject) -> bool:
            values = field_values(key, obj) or []
            found = [option in values for option in options]
            if operator == _Op.OPERATOR_CONTAINS_ANY:
                return any(found)
            if operator == _Op.OPERATOR_CONTAINS_ALL:
                return all(found)
            return not any(found)

        return contains
    raise _unimplemented(f"fake Weaviate: filter operator {_Op.Operator.Name(operator)} is not implemented")


def _authorization(context: grpc.ServicerContext) -> str | None:
    for key, value in context.invocation_metadata():
        if key == "authorization":
            return str(value)
    return None


def _grpc_call(server: FakeWeaviateServer, name: str, handle: Callable[[Any], Any]) -> Callable[[Any, Any], Any]:
    def call(request: Any, context: grpc.ServicerContext) -> Any:
        try:
            server._admit(f"grpc {name}", _authorization(context))
            return handle(request)
        except FakeWeaviateError as e:
            context.abort(e.grpc_code, str(e))

    return call


class _WeaviateServicer(weaviate_pb2_grpc.WeaviateServicer):  # type: ignore[misc]
    def __init__(self, server: FakeWeaviateServer) -> None:
        self.Search = _grpc_call(server, "Search", server.search)
        self.BatchObjects = _grpc_call(server, "BatchObjects", server.batch_objects)
        self.BatchDelete = _grpc_call(server, "BatchDelete", server.batch_delete)
        self.Aggregate = _grpc_call(server, "Aggregate", server.aggregate)


def _health_handler(server: FakeWeaviateServer) -> grpc.GenericRpcHandler:
    def check(request: Any, context: grpc.ServicerContext) -> health_weaviate_pb2.WeaviateHealthCheckResponse:
        with server._lock:
            server.requests.append("grpc Health/Check")
            server.authorizations.append(_authorization(context))
        return health_weaviate_pb2.WeaviateHealthCheckResponse(
            status=health_weaviate_pb2.WeaviateHealthCheckResponse.SERVING
        )

    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": grpc.unary_unary_rpc_method_handler(
                check,
                request_deserializer=health_weaviate_pb2.WeaviateHealthCheckRequest.FromString,
                response_serializer=health_weaviate_pb2.WeaviateHealthCheckResponse.SerializeToString,
            )
        },
    )


def _rest_handler(server: FakeWeaviateServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body leave in separate writes: without this, Nagle + delayed ACK add 40 ms each.
        disable_nagle_algorithm = True

        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            try:
                server._admit(f"{self.command} {self.path}", self.headers.get("Authorization"))
                body = json.loads(raw) if raw else None
                status, payload = server.handle_rest(self.command, self.path, body)
            except FakeWeaviateError as e:
                status, payload = e.http_status, {"error": [{"message": str(e)}]}
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _handle

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler
