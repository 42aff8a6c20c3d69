"""The vector store contract: every store an index can live in passes this one suite.

It runs against the embedded SQLite store once per search engine (exact; and "hnsw" and "quantized",
with every store past the exact-search threshold and filters left to the graph); the Chroma store
(Chroma's persistent local client, in a temporary folder); the Weaviate store on FakeWeaviateServer
(Weaviate's REST and gRPC wire protocol on 127.0.0.1, spoken to by the real weaviate-client); and the Weaviate
store on a real server when `WEAVIATE_URL` is set (with `WEAVIATE_API_KEY` and
`WEAVIATE_GRPC_PORT` when needed; each test uses, then drops, its own collection):

    WEAVIATE_URL=http://localhost:8080 pytest tests/test_store_contract.py
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imageloop.errors import ImageloopError
from imageloop.protocols import VectorRecord, VectorStore
from imageloop.tools.indexing.image_index import IndexStore
from imageloop.tools.stores import ann_index
from imageloop.tools.stores.embedded import EmbeddedVectorStore

BACKENDS = ["embedded", "embedded-hnsw", "embedded-quantized", "chroma", "weaviate-fake", "weaviate-real"]


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def record(record_id: str, *values: float, **metadata: object) -> VectorRecord:
    return VectorRecord(record_id, unit(*values), metadata)


@dataclass
class Backend:
    """Opens handles on one fresh store; every handle it opened is closed after the test."""

    name: str
    opener: Callable[[], IndexStore]
    handles: list[IndexStore] = field(default_factory=list)

    def open(self) -> IndexStore:
        handle = self.opener()
        self.handles.append(handle)
        return handle


@pytest.fixture(scope="module")
def fake_weaviate() -> Iterator[Any]:
    pytest.importorskip("weaviate", reason="the weaviate extra is not installed")
    from tests.fake_weaviate_server import FakeWeaviateServer

    with FakeWeaviateServer() as server:
        yield server
    assert server.unhandled == [], "the client called REST endpoints the fake does not implement"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    collection = f"Contract_{uuid.uuid4().hex[:12]}"
    if request.param == "embedded":
        backend = Backend(request.param, lambda: EmbeddedVectorStore(tmp_path / "store.sqlite"))
    elif request.param.startswith("embedded-"):
        if ann_index.faiss_module() is None:
            pytest.skip("faiss is not installed (the ann extra)")
        engine = request.param.removeprefix("embedded-")
        defaults = ann_index.HnswSettings() if engine == "hnsw" else ann_index.QUANTIZED_SETTINGS
        graph_only = {engine: replace(defaults, exact_below=0)}
        backend = Backend(
            request.param,
            lambda: EmbeddedVectorStore(tmp_path / "store.sqlite", ann_threshold=0, ann=engine, **graph_only),  # type: ignore[arg-type]
        )
    elif request.param == "chroma":
        pytest.importorskip("chromadb", reason="the chroma extra is not installed")
        from imageloop.tools.stores.chroma_store import ChromaVectorStore

        backend = Backend(request.param, lambda: ChromaVectorStore(tmp_path / "chroma"))
    elif request.param == "weaviate-fake":
        from imageloop.tools.stores.weaviate_store import WeaviateVectorStore

        server = request.getfixturevalue("fake_weaviate")
        backend = Backend(
            request.param,
            lambda: WeaviateVectorStore(server.url, collection, grpc_port=server.grpc_port, backoff_s=0.01),
        )
    else:
        url = os.environ.get("WEAVIATE_URL")
        if not url:
            pytest.skip("WEAVIATE_URL is not set: no real Weaviate server to run the contract against")
        pytest.importorskip("weaviate", reason="the weaviate extra is not installed")
        from imageloop.tools.stores.weaviate_store import WeaviateVectorStore

        grpc_port = int(os.environ["WEAVIATE_GRPC_PORT"]) if os.environ.get("WEAVIATE_GRPC_PORT") else None
        backend = Backend(
            request.param,
            lambda: WeaviateVectorStore(
                url, collection, api_key=os.environ.get("WEAVIATE_API_KEY") or None, grpc_port=grpc_port
            ),
        )
    yield backend
    for handle in backend.handles:
        handle.close()
    if request.param == "weaviate-real" and backend.handles:
        cleaner = backend.opener()
        cleaner.drop()  # type: ignore[attr-defined]
        cleaner.close()


@pytest.fixture
def store(backend: Backend) -> IndexStore:
    return backend.open()


# What a store is


def test_implements_the_vector_store_protocol(store: IndexStore) -> None:
    assert isinstance(store, VectorStore)
    assert all(callable(getattr(store, name)) for name in ("get_meta", "set_meta", "close"))


# Searching


def test_search_returns_hits_by_descending_cosine_similarity(store: IndexStore) -> None:
    store.upsert([record("x", 1, 0, 0), record("xy", 1, 1, 0), record("y", 0, 1, 0), record("-x", -1, 0, 0)])

    hits = store.search(unit(1, 0, 0), k=4)

    assert [hit.id for hit in hits] == ["x", "xy", "y", "-x"]
    assert [hit.score for hit in hits] == pytest.approx([1.0, np.sqrt(0.5), 0.0, -1.0], abs=1e-6)


def test_search_returns_at_most_k_hits(store: IndexStore) -> None:
    store.upsert([record(str(i), 1, i, 0) for i in range(10)])

    hits = store.search(unit(1, 0, 0), k=3)

    assert [hit.id for hit in hits] == ["0", "1", "2"]


def test_search_scores_are_cosines_even_for_unnormalised_vectors(store: IndexStore) -> None:
    store.upsert([VectorRecord("long", np.asarray([3.0, 4.0], dtype=np.float32), {})])

    (hit,) = store.search(np.asarray([0.0, 10.0], dtype=np.float32), k=1)

    assert hit.score == pytest.approx(0.8, abs=1e-6)


def test_search_on_an_empty_store_finds_nothing(store: IndexStore) -> None:
    assert store.search(unit(1, 0), k=5) == []


def test_search_returns_the_stored_metadata(store: IndexStore) -> None:
    metadata = {"path": "birds/a.png", "caption": "a bird", "n": 3, "tags": ["x", "y"], "extra": {"w": 1.5}}
    store.upsert([VectorRecord("a", unit(1, 0), metadata)])

    (hit,) = store.search(unit(1, 0), k=1)

    assert hit.metadata == metadata


def test_k_must_be_positive(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0)])

    with pytest.raises(ImageloopError, match="k must be"):
        store.search(unit(1, 0), k=0)


# Filtering with `where`


def test_where_keeps_only_records_whose_metadata_equals_the_value(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, folder="birds"), record("b", 1, 0.1, folder="cars"), record("c", 0, 1)])

    hits = store.search(unit(1, 0), k=10, where={"folder": "cars"})

    assert [hit.id for hit in hits] == ["b"]


def test_where_with_a_list_accepts_any_of_its_values(store: IndexStore) -> None:
    store.upsert(
        [record("a", 1, 0, folder="birds"), record("b", 1, 0.1, folder="cars"), record("c", 1, 1, folder="trees")]
    )

    hits = store.search(unit(1, 0), k=10, where={"folder": ["birds", "trees"]})

    assert [hit.id for hit in hits] == ["a", "c"]


def test_where_requires_every_key_to_match(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, folder="birds", kind="photo"), record("b", 1, 0, folder="birds", kind="art")])

    hits = store.search(unit(1, 0), k=10, where={"folder": "birds", "kind": "art"})

    assert [hit.id for hit in hits] == ["b"]


def test_where_on_a_key_no_record_has_finds_nothing(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, folder="birds")])

    assert store.search(unit(1, 0), k=10, where={"album": "birds"}) == []


def test_where_with_an_empty_list_finds_nothing(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, folder="birds")])

    assert store.search(unit(1, 0), k=10, where={"folder": []}) == []


def test_where_compares_values_not_their_spelling(store: IndexStore) -> None:
    store.upsert([record("int", 1, 0, n=1), record("text", 1, 0.1, n="1"), record("float", 1, 0.2, n=2.5)])

    assert [hit.id for hit in store.search(unit(1, 0), k=10, where={"n": 1.0})] == ["int"]
    assert [hit.id for hit in store.search(unit(1, 0), k=10, where={"n": "1"})] == ["text"]
    assert [hit.id for hit in store.search(unit(1, 0), k=10, where={"n": [2.5, 7]})] == ["float"]


def test_where_matches_exact_text_only(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, caption="a red bird"), record("b", 1, 0.1, caption="a red bird on a branch")])

    hits = store.search(unit(1, 0), k=10, where={"caption": "a red bird"})

    assert [hit.id for hit in hits] == ["a"]


def test_where_works_on_keys_that_are_not_identifiers(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, **{"Camera Model": "X100"}), record("b", 1, 0.1, **{"Camera Model": "Z9"})])

    hits = store.search(unit(1, 0), k=10, where={"Camera Model": "Z9"})

    assert [hit.id for hit in hits] == ["b"]


# Reading, replacing, deleting


def test_get_returns_records_in_the_order_asked_and_leaves_out_unknown_ids(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, n=1), record("b", 0, 1, n=2)])

    got = store.get(["b", "missing", "a"])

    assert [r.id for r in got] == ["b", "a"]
    np.testing.assert_allclose(got[0].vector, unit(0, 1))
    assert got[0].vector.dtype == np.float32
    assert got[1].metadata == {"n": 1}


def test_ids_are_kept_verbatim(store: IndexStore) -> None:
    ids = ["9f86d081884c7d659a2feaa0c55ad015", "birds/sparrows/one.png", "été ✓", "A", "a"]
    store.upsert([record(record_id, 1, i) for i, record_id in enumerate(ids)])

    assert [r.id for r in store.get(ids)] == ids
    assert sorted(hit.id for hit in store.search(unit(1, 0), k=10)) == sorted(ids)


def test_upsert_replaces_an_existing_id(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, version=1)])
    store.upsert([record("a", 0, 1, version=2)])

    assert store.count() == 1
    (hit,) = store.search(unit(0, 1), k=1)
    assert hit.score == pytest.approx(1.0, abs=1e-6)
    assert hit.metadata == {"version": 2}


def test_a_replaced_record_no_longer_matches_its_old_metadata(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, folder="birds")])
    store.upsert([record("a", 1, 0, album="summer")])

    assert store.search(unit(1, 0), k=10, where={"folder": "birds"}) == []
    assert [hit.id for hit in store.search(unit(1, 0), k=10, where={"album": "summer"})] == ["a"]


def test_delete_removes_records_and_ignores_unknown_ids(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0), record("b", 0, 1)])

    store.delete(["a", "missing"])

    assert store.count() == 1
    assert [hit.id for hit in store.search(unit(1, 0), k=5)] == ["b"]
    assert store.get(["a"]) == []


def test_ids_lists_every_stored_record_across_pages(store: IndexStore) -> None:
    store.upsert([record(f"img{i:04d}", 1.0, float(i)) for i in range(1100)])  # over two pages of 500
    store.delete(["img0007"])
    ids = store.ids()
    assert sorted(ids) == sorted(f"img{i:04d}" for i in range(1100) if i != 7)


def test_batches_larger_than_one_request_are_written_read_and_deleted_whole(store: IndexStore) -> None:
    rng = np.random.default_rng(0)
    records = [VectorRecord(f"r{i:04d}", rng.normal(size=8).astype(np.float32), {"i": i}) for i in range(700)]

    store.upsert(records)

    assert store.count() == 700
    assert [r.id for r in store.get([r.id for r in records])] == [r.id for r in records]
    store.delete([r.id for r in records[:650]])
    assert store.count() == 50


# Meta, persistence, and other handles


def test_set_meta_merges_values_that_get_meta_returns(store: IndexStore) -> None:
    store.set_meta({"embedder_id": "fake:hash", "route": "caption"})
    store.set_meta({"root": "/images", "sizes": [1, 2]})

    meta = store.get_meta()

    assert {key: meta[key] for key in ("embedder_id", "route", "root", "sizes")} == {
        "embedder_id": "fake:hash",
        "route": "caption",
        "root": "/images",
        "sizes": [1, 2],
    }


def test_records_and_meta_persist_across_reopening(backend: Backend) -> None:
    first = backend.open()
    first.upsert([record("a", 1, 0, caption="kept")])
    first.set_meta({"embedder_id": "fake:hash"})
    first.close()

    reopened = backend.open()

    assert reopened.count() == 1
    assert reopened.search(unit(1, 0), k=1)[0].metadata == {"caption": "kept"}
    assert reopened.get_meta()["embedder_id"] == "fake:hash"
    assert reopened.get_meta()["dim"] == 2


def test_search_sees_writes_made_through_another_store_object(backend: Backend) -> None:
    reader = backend.open()
    writer = backend.open()
    writer.upsert([record("a", 1, 0)])
    assert [hit.id for hit in reader.search(unit(1, 0), k=5)] == ["a"]

    writer.upsert([record("b", 1, 0.1, folder="new")])
    writer.delete(["a"])

    assert [hit.id for hit in reader.search(unit(1, 0), k=5)] == ["b"]
    assert [hit.id for hit in reader.search(unit(1, 0), k=5, where={"folder": "new"})] == ["b"]


# Bad input


def test_a_vector_of_another_dimension_is_refused_naming_both(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0, 0)])

    with pytest.raises(ImageloopError, match=r"dimension 2 .*dimension 3"):
        store.upsert([record("b", 1, 0)])
    with pytest.raises(ImageloopError, match=r"dimension 4 .*dimension 3"):
        store.search(unit(1, 0, 0, 0), k=1)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        (VectorRecord("bad", np.asarray([np.nan, 1.0], dtype=np.float32), {}), ImageloopError),
        (VectorRecord("bad", np.zeros(2, dtype=np.float32), {}), ImageloopError),
        (VectorRecord("bad", unit(1, 1), {"payload": object()}), TypeError),
    ],
    ids=["nan", "zero", "unserialisable-metadata"],
)
def test_a_batch_with_an_invalid_record_writes_nothing(
    store: IndexStore, bad: VectorRecord, error: type[Exception]
) -> None:
    store.upsert([record("before", 1, 0)])

    with pytest.raises(error):
        store.upsert([record("a", 1, 0), record("b", 0, 1), bad, record("c", 1, 0)])

    assert store.count() == 1
    assert store.get(["a", "b", "c"]) == []


def test_the_dimension_is_not_fixed_by_a_failed_first_upsert(store: IndexStore) -> None:
    with pytest.raises(ImageloopError):
        store.upsert([record("a", 1, 0), VectorRecord("zero", np.zeros(2, dtype=np.float32), {})])

    store.upsert([record("b", 1, 0, 0)])

    assert store.get_meta()["dim"] == 3


def test_set_meta_refuses_to_change_the_dimension(store: IndexStore) -> None:
    store.upsert([record("a", 1, 0)])

    with pytest.raises(ImageloopError, match=r"dimension 5 .*dimension 2"):
        store.set_meta({"dim": 5})
