"""EmbeddedVectorStore: the default on-disk vector store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from imageloop.errors import ImageloopError
from imageloop.protocols import VectorRecord, VectorStore
from imageloop.tools.embedded_store import EmbeddedVectorStore


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


def record(record_id: str, *values: float, **metadata: object) -> VectorRecord:
    return VectorRecord(record_id, unit(*values), metadata)


@pytest.fixture
def store(tmp_path: Path) -> EmbeddedVectorStore:
    return EmbeddedVectorStore(tmp_path / "store.sqlite")


def test_implements_the_vector_store_protocol(store: EmbeddedVectorStore) -> None:
    assert isinstance(store, VectorStore)


def test_search_returns_hits_by_descending_cosine_similarity(store: EmbeddedVectorStore) -> None:
    store.upsert([record("x", 1, 0, 0), record("xy", 1, 1, 0), record("y", 0, 1, 0), record("-x", -1, 0, 0)])

    hits = store.search(unit(1, 0, 0), k=4)

    assert [hit.id for hit in hits] == ["x", "xy", "y", "-x"]
    assert [hit.score for hit in hits] == pytest.approx([1.0, np.sqrt(0.5), 0.0, -1.0], abs=1e-6)


def test_search_returns_at_most_k_hits(store: EmbeddedVectorStore) -> None:
    store.upsert([record(str(i), 1, i, 0) for i in range(10)])

    hits = store.search(unit(1, 0, 0), k=3)

    assert [hit.id for hit in hits] == ["0", "1", "2"]


def test_search_scores_are_cosines_even_for_unnormalised_vectors(store: EmbeddedVectorStore) -> None:
    store.upsert([VectorRecord("long", np.asarray([3.0, 4.0], dtype=np.float32), {})])

    (hit,) = store.search(np.asarray([0.0, 10.0], dtype=np.float32), k=1)

    assert hit.score == pytest.approx(0.8)


def test_search_on_an_empty_store_finds_nothing(store: EmbeddedVectorStore) -> None:
    assert store.search(unit(1, 0), k=5) == []


def test_search_returns_the_stored_metadata(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0, path="birds/a.png", caption="a bird")])

    (hit,) = store.search(unit(1, 0), k=1)

    assert hit.metadata == {"path": "birds/a.png", "caption": "a bird"}


def test_where_keeps_only_records_whose_metadata_equals_the_value(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0, folder="birds"), record("b", 1, 0.1, folder="cars"), record("c", 0, 1)])

    hits = store.search(unit(1, 0), k=10, where={"folder": "cars"})

    assert [hit.id for hit in hits] == ["b"]


def test_where_with_a_list_accepts_any_of_its_values(store: EmbeddedVectorStore) -> None:
    store.upsert(
        [record("a", 1, 0, folder="birds"), record("b", 1, 0.1, folder="cars"), record("c", 1, 1, folder="trees")]
    )

    hits = store.search(unit(1, 0), k=10, where={"folder": ["birds", "trees"]})

    assert [hit.id for hit in hits] == ["a", "c"]


def test_where_requires_every_key_to_match(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0, folder="birds", kind="photo"), record("b", 1, 0, folder="birds", kind="art")])

    hits = store.search(unit(1, 0), k=10, where={"folder": "birds", "kind": "art"})

    assert [hit.id for hit in hits] == ["b"]


def test_get_returns_records_in_the_order_asked_and_leaves_out_unknown_ids(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0, n=1), record("b", 0, 1, n=2)])

    got = store.get(["b", "missing", "a"])

    assert [r.id for r in got] == ["b", "a"]
    np.testing.assert_allclose(got[0].vector, unit(0, 1))
    assert got[0].vector.dtype == np.float32
    assert got[1].metadata == {"n": 1}


def test_upsert_replaces_an_existing_id(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0, version=1)])
    store.upsert([record("a", 0, 1, version=2)])

    assert store.count() == 1
    (hit,) = store.search(unit(0, 1), k=1)
    assert hit.score == pytest.approx(1.0)
    assert hit.metadata == {"version": 2}


def test_delete_removes_records_and_ignores_unknown_ids(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0), record("b", 0, 1)])

    store.delete(["a", "missing"])

    assert store.count() == 1
    assert [hit.id for hit in store.search(unit(1, 0), k=5)] == ["b"]


def test_records_and_meta_persist_across_reopening(tmp_path: Path) -> None:
    first = EmbeddedVectorStore(tmp_path / "store.sqlite")
    first.upsert([record("a", 1, 0, caption="kept")])
    first.set_meta({"embedder_id": "fake:hash"})
    first.close()

    reopened = EmbeddedVectorStore(tmp_path / "store.sqlite")

    assert reopened.count() == 1
    assert reopened.search(unit(1, 0), k=1)[0].metadata == {"caption": "kept"}
    assert reopened.get_meta()["embedder_id"] == "fake:hash"
    assert reopened.get_meta()["dim"] == 2


def test_search_sees_writes_made_through_another_store_object(tmp_path: Path) -> None:
    reader = EmbeddedVectorStore(tmp_path / "store.sqlite")
    writer = EmbeddedVectorStore(tmp_path / "store.sqlite")
    writer.upsert([record("a", 1, 0)])
    assert [hit.id for hit in reader.search(unit(1, 0), k=5)] == ["a"]  # the reader's matrix is now cached

    writer.upsert([record("b", 1, 0.1)])
    writer.delete(["a"])

    assert [hit.id for hit in reader.search(unit(1, 0), k=5)] == ["b"]


def test_a_vector_of_another_dimension_is_refused_naming_both(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0, 0)])

    with pytest.raises(ImageloopError, match=r"dimension 2 .*dimension 3"):
        store.upsert([record("b", 1, 0)])
    with pytest.raises(ImageloopError, match=r"dimension 4 .*dimension 3"):
        store.search(unit(1, 0, 0, 0), k=1)


def test_an_upsert_that_fails_midway_leaves_nothing_visible(tmp_path: Path) -> None:
    store = EmbeddedVectorStore(tmp_path / "store.sqlite")
    store.upsert([record("before", 1, 0)])
    batch = [record("a", 1, 0), record("b", 0, 1), record("bad", 1, 1, payload=object()), record("c", 1, 0)]

    with pytest.raises(TypeError):
        store.upsert(batch)

    other = EmbeddedVectorStore(tmp_path / "store.sqlite")
    for view in (store, other):
        assert view.count() == 1
        assert view.get(["a", "b"]) == []
        assert [hit.id for hit in view.search(unit(1, 0), k=5)] == ["before"]


def test_the_dimension_is_not_fixed_by_a_failed_first_upsert(store: EmbeddedVectorStore) -> None:
    with pytest.raises(ImageloopError):
        store.upsert([record("a", 1, 0), VectorRecord("zero", np.zeros(2, dtype=np.float32), {})])

    store.upsert([record("b", 1, 0, 0)])

    assert store.get_meta()["dim"] == 3


def test_set_meta_refuses_to_change_the_dimension(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0)])

    with pytest.raises(ImageloopError, match=r"dimension 5 .*dimension 2"):
        store.set_meta({"dim": 5})


def test_k_must_be_positive(store: EmbeddedVectorStore) -> None:
    store.upsert([record("a", 1, 0)])

    with pytest.raises(ImageloopError, match="k must be"):
        store.search(unit(1, 0), k=0)
