"""Opening an index and retrieving from it: text→image, caption route, image→image, batched queries."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imageloop.errors import EmbedderMismatchError, ImageloopError, IndexNotFoundError
from imageloop.protocols import ImageRetriever, SearchHit, Vector
from imageloop.tools.images import open_image
from imageloop.tools.indexing.image_index import create_or_open_index, open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever
from tests.fakes import FakeHashEmbedder
from tests.image_folders import CAPTIONS, captioned_folder, write_image


@pytest.fixture
def retriever(tmp_path: Path) -> Retriever:
    """A caption-route index of bird, car and tree."""
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    return Retriever(open_index(folder), FakeHashEmbedder())


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """An image-route index of bird, car and tree, with birds/sparrow.png in a subfolder."""
    folder = captioned_folder(tmp_path / "pictures")
    write_image(folder / "birds" / "sparrow.png", 130)
    index_folder(folder, FakeHashEmbedder(embeds_images=True), None, progress=False)
    return folder


# Opening an index


def test_open_index_on_a_folder_without_an_index_raises_and_creates_nothing(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    before = sorted(folder.rglob("*"))

    with pytest.raises(IndexNotFoundError, match=r"no imageloop index at .*: index .* first"):
        open_index(folder)

    assert sorted(folder.rglob("*")) == before


def test_open_index_accepts_the_folder_or_its_imageloop_directory(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)

    by_folder = open_index(folder)
    by_index_dir = open_index(folder / ".imageloop")

    assert by_folder.root == by_index_dir.root == folder.resolve()
    assert by_index_dir.count() == 3


def test_an_index_follows_its_folder_when_moved(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    moved = folder.rename(tmp_path / "moved")

    (hit,) = Retriever(open_index(moved), FakeHashEmbedder()).search("red bird", k=1)

    assert hit.path == moved.resolve() / "bird.png"
    assert hit.path.is_file()


# Text queries (the caption route here; the image route below)


def test_a_retriever_is_an_image_retriever(retriever: Retriever) -> None:
    assert isinstance(retriever, ImageRetriever)
    assert retriever.route == "caption"


def test_search_returns_the_best_matching_image_first_with_its_absolute_path(retriever: Retriever) -> None:
    hits = retriever.search("a red bird", k=3)

    assert hits[0].caption == CAPTIONS["bird"]
    assert hits[0].path == retriever.index.root / "bird.png"
    assert hits[0].path.is_absolute()
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_search_returns_at_most_k_images(retriever: Retriever) -> None:
    assert len(retriever.search("a picture", k=2)) == 2
    assert len(retriever.search("a picture", k=10)) == 3


def test_k_must_be_positive(retriever: Retriever) -> None:
    with pytest.raises(ImageloopError, match="k must be a positive number of results, got 0"):
        retriever.search("a picture", k=0)


def test_a_hit_whose_file_is_gone_is_replaced_by_the_next_one(retriever: Retriever) -> None:
    best = retriever.search("a red bird", k=1)[0]
    best.path.unlink()  # deleted since indexing

    hits = retriever.search("a red bird", k=2)

    assert len(hits) == 2 and best.path not in [hit.path for hit in hits]


def test_search_drops_hits_below_the_similarity_threshold(retriever: Retriever) -> None:
    all_hits = retriever.search("red bird branch", k=3)
    threshold = (all_hits[0].score + all_hits[1].score) / 2

    hits = retriever.search("red bird branch", k=3, similarity_threshold=threshold)

    assert [hit.caption for hit in hits] == [CAPTIONS["bird"]]


def test_search_filters_on_metadata(image_folder: Path) -> None:
    retriever = Retriever(open_index(image_folder), FakeHashEmbedder(embeds_images=True))

    hits = retriever.search("anything", k=10, where={"folder": "birds"})

    assert [hit.path.name for hit in hits] == ["sparrow.png"]


def test_search_many_embeds_all_texts_in_one_batch(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    embedder = FakeHashEmbedder()

    results = Retriever(open_index(folder), embedder).search_many(["red bird", "blue car"], k=1)

    assert embedder.text_calls == [["red bird", "blue car"]]
    assert [hits[0].caption for hits in results] == [CAPTIONS["bird"], CAPTIONS["car"]]


def test_search_many_applies_k_and_the_threshold_to_each_query(retriever: Retriever) -> None:
    alone = [retriever.search(text, k=2, similarity_threshold=0.2) for text in ("red bird", "green tree", "zebra")]

    together = retriever.search_many(["red bird", "green tree", "zebra"], k=2, similarity_threshold=0.2)

    assert together == alone
    assert all(len(hits) <= 2 for hits in together)
    assert retriever.search_many([], k=2) == []


class SpyStore:
    """Wraps a store; records batched searches; `batched=False` hides `search_many` as an older store would."""

    def __init__(self, inner: Any, batched: bool) -> None:
        self.inner = inner
        self.calls: list[tuple[str, int]] = []
        if batched:
            self.search_many = self._search_many

    def _search_many(self, vectors: Vector, k: int, where: Mapping[str, Any] | None = None) -> list[list[SearchHit]]:
        self.calls.append(("search_many", len(vectors)))
        return [self.inner.search(vector, k, where) for vector in vectors]

    def search(self, vector: Vector, k: int, where: Mapping[str, Any] | None = None) -> list[SearchHit]:
        self.calls.append(("search", 1))
        return list(self.inner.search(vector, k, where))

    def count(self) -> int:
        return int(self.inner.count())


@pytest.mark.parametrize(("batched", "expected_calls"), [(True, [("search_many", 3)]), (False, [("search", 1)] * 3)])
def test_search_many_uses_the_stores_batched_search_when_it_has_one(
    retriever: Retriever, batched: bool, expected_calls: list[tuple[str, int]]
) -> None:
    expected = retriever.search_many(["red bird", "blue car", "green tree"], k=2)
    spy = SpyStore(retriever.index.store, batched)
    retriever.index.store = spy  # type: ignore[assignment]

    results = retriever.search_many(["red bird", "blue car", "green tree"], k=2)

    assert spy.calls == expected_calls
    assert results == expected


# Image queries


def test_text_queries_on_the_image_route_compare_with_pixel_embeddings(image_folder: Path) -> None:
    embedder = FakeHashEmbedder(embeds_images=True)
    retriever = Retriever(open_index(image_folder), embedder)

    hits = retriever.search("red bird", k=4)

    assert retriever.route == "image"
    assert embedder.text_calls == [["red bird"]]
    assert len(hits) == 4


def test_search_image_finds_the_same_picture_first_from_a_path_or_an_image(image_folder: Path) -> None:
    retriever = Retriever(open_index(image_folder), FakeHashEmbedder(embeds_images=True))

    by_path = retriever.search_image(image_folder / "car.png", k=2)
    by_image = retriever.search_image(Image.open(image_folder / "car.png"), k=2)

    assert by_path == by_image
    assert by_path[0].path == image_folder.resolve() / "car.png"
    assert by_path[0].score == pytest.approx(1.0, abs=1e-5)
    assert len(by_path) == 2


def test_search_image_applies_the_threshold_and_the_filter(image_folder: Path) -> None:
    retriever = Retriever(open_index(image_folder), FakeHashEmbedder(embeds_images=True))
    query = open_image(image_folder / "tree.png")

    assert [hit.path.name for hit in retriever.search_image(query, k=4, similarity_threshold=0.9999)] == ["tree.png"]
    assert [hit.path.name for hit in retriever.search_image(query, k=4, where={"folder": "birds"})] == ["sparrow.png"]


def test_search_image_on_a_caption_route_index_is_refused_naming_the_route(retriever: Retriever) -> None:
    with pytest.raises(ImageloopError, match=r"is on the caption route .*image queries need an image-route index"):
        retriever.search_image(Image.new("RGB", (8, 8)), k=1)


def test_search_image_needs_an_embedder_that_embeds_images(image_folder: Path) -> None:
    retriever = Retriever(open_index(image_folder), FakeHashEmbedder(embeds_images=False))

    with pytest.raises(ImageloopError, match=r"embedder fake:hash does not embed images"):
        retriever.search_image(Image.new("RGB", (8, 8)), k=1)


def test_search_image_on_an_unreadable_file_is_a_clear_error(image_folder: Path, tmp_path: Path) -> None:
    retriever = Retriever(open_index(image_folder), FakeHashEmbedder(embeds_images=True))
    (tmp_path / "broken.png").write_bytes(b"not a png")

    with pytest.raises(ImageloopError, match=r"broken.png: not a readable image"):
        retriever.search_image(tmp_path / "broken.png", k=1)


# Refusals


def test_a_retriever_refuses_another_embedder_naming_both(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(model_id="fake:a"), None, progress=False)

    with pytest.raises(EmbedderMismatchError, match=r"fake:a.*fake:b"):
        Retriever(open_index(folder), FakeHashEmbedder(model_id="fake:b"))


def test_a_dimension_mismatch_is_a_clear_error_naming_both_dimensions(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(dim=64), None, progress=False)
    retriever = Retriever(open_index(folder), FakeHashEmbedder(dim=32))

    with pytest.raises(ImageloopError, match=r"dimension mismatch: embedder fake:hash gives 32-d vectors .* 64-d"):
        retriever.search("red bird", k=1)


class NoImages(FakeHashEmbedder):
    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        return np.zeros((len(images), self.dim + 1), dtype=np.float32)


def test_a_dimension_mismatch_on_an_image_query_is_caught_too(image_folder: Path) -> None:
    retriever = Retriever(open_index(image_folder), NoImages(embeds_images=True))

    with pytest.raises(ImageloopError, match=r"gives 65-d vectors but the index at .* holds 64-d vectors"):
        retriever.search_image(Image.new("RGB", (8, 8)), k=1)


def test_a_retriever_refuses_an_empty_index(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    index = create_or_open_index(folder, FakeHashEmbedder())

    with pytest.raises(ImageloopError, match=r"index at .* is empty"):
        Retriever(index, FakeHashEmbedder())
