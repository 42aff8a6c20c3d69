"""Indexing an image folder, opening its index, and retrieving from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import imageloop.tools.indexer as indexer
from imageloop.errors import EmbedderMismatchError, ImageloopError, IndexNotFoundError
from imageloop.protocols import ImageRetriever
from imageloop.tools.image_index import create_or_open_index, open_index
from imageloop.tools.images import open_image
from imageloop.tools.indexer import index_folder
from imageloop.tools.retriever import Retriever
from tests.fakes import FakeHashEmbedder

CAPTIONS = {
    "bird": "a red bird on a branch",
    "car": "a blue car in the street",
    "tree": "a green tree in a park",
}


def write_image(path: Path, shade: int, size: int = 16) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (shade, 255 - shade, (shade * 7) % 256)).save(path)
    return path


def captioned_folder(root: Path) -> Path:
    """bird.png, car.png, tree.png, each with a sidecar caption."""
    for shade, (name, caption) in enumerate(CAPTIONS.items()):
        write_image(root / f"{name}.png", 40 * (shade + 1))
        (root / f"{name}.txt").write_text(caption)
    return root


def numbered_images(root: Path, n: int) -> list[Path]:
    return [write_image(root / f"img{i:02d}.png", 10 * (i + 1)) for i in range(n)]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class FakeCaptioner:
    """Captions from the file name; raises `fail_with` on the `fail_on`-th call (1-based)."""

    def __init__(self, fail_on: int | None = None, fail_with: BaseException | None = None) -> None:
        self.calls: list[Path] = []
        self.fail_on = fail_on
        self.fail_with = fail_with

    def __call__(self, path: Path) -> str:
        self.calls.append(path)
        if self.fail_with is not None and len(self.calls) == self.fail_on:
            raise self.fail_with
        return f"a picture called {path.stem}"


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path the indexer decodes, in order."""
    seen: list[Path] = []

    def counting_open_image(path: Path) -> Image.Image:
        seen.append(path)
        return open_image(path)

    monkeypatch.setattr(indexer, "open_image", counting_open_image)
    return seen


def stored_captions(folder: Path) -> dict[str, str]:
    index = open_index(folder)
    hits = index.store.search(FakeHashEmbedder().embed_texts(["a"])[0], k=100)
    return {hit.metadata["path"]: hit.metadata["caption"] for hit in hits}


# Indexing


def test_sidecar_captions_are_stored_and_embedded(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    embedder = FakeHashEmbedder()

    summary = index_folder(folder, embedder, None, progress=False)

    assert summary.to_json() == {"indexed": 3, "skipped": 0, "failed": 0, "total": 3, "failures": []}
    assert stored_captions(folder) == {f"{name}.png": caption for name, caption in CAPTIONS.items()}
    (record,) = open_index(folder).store.get([sha256(folder / "bird.png")])
    np.testing.assert_allclose(record.vector, embedder.embed_texts([CAPTIONS["bird"]])[0])


def test_records_carry_the_relative_path_and_folder(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    write_image(folder / "birds" / "sparrows" / "one.png", 10)

    index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), progress=False)

    (record,) = open_index(folder).store.get([sha256(folder / "birds" / "sparrows" / "one.png")])
    assert record.metadata["path"] == "birds/sparrows/one.png"
    assert record.metadata["folder"] == "birds/sparrows"


def test_the_captioner_is_called_only_for_images_without_a_sidecar(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    write_image(folder / "uncaptioned.jpg", 200)
    captioner = FakeCaptioner()

    index_folder(folder, FakeHashEmbedder(), captioner, progress=False)

    assert captioner.calls == [folder.resolve() / "uncaptioned.jpg"]
    assert stored_captions(folder)["uncaptioned.jpg"] == "a picture called uncaptioned"


def test_the_caption_route_without_caption_or_captioner_reports_the_file(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    write_image(folder / "uncaptioned.png", 200)

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.indexed, summary.failed) == (3, 1)
    assert summary.failures == [("uncaptioned.png", "no caption: add uncaptioned.txt or configure a captioner")]


def test_a_captioner_error_fails_that_file_only(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    numbered_images(folder, 3)
    captioner = FakeCaptioner(fail_on=2, fail_with=ImageloopError("captioning endpoint refused"))

    summary = index_folder(folder, FakeHashEmbedder(), captioner, progress=False)

    assert (summary.indexed, summary.failed) == (2, 1)
    assert summary.failures == [("img01.png", "captioning endpoint refused")]


def test_a_corrupt_image_and_a_truncated_png_are_reported_and_skipped(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    (folder / "corrupt.jpg").write_bytes(b"this is not a jpeg")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(folder / "truncated.png")
    data = (folder / "truncated.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])

    summary = index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), progress=False)

    assert (summary.indexed, summary.skipped, summary.failed, summary.total) == (3, 0, 2, 5)
    assert [path for path, _ in summary.failures] == ["corrupt.jpg", "truncated.png"]
    assert all("not a readable image" in reason for _, reason in summary.failures)
    assert open_index(folder).count() == 3


def test_hidden_folders_and_non_images_are_not_walked(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    write_image(folder / ".cache" / "hidden.png", 9)
    write_image(folder / "._bird.png", 9)
    (folder / "notes.md").write_text("not an image")

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert summary.total == 3


def test_rerunning_adds_nothing_and_decodes_nothing(tmp_path: Path, decodes: list[Path]) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    decodes.clear()

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.indexed, summary.skipped, summary.total) == (0, 3, 3)
    assert decodes == []
    assert open_index(folder).count() == 3


def test_a_file_added_later_is_the_only_one_indexed(tmp_path: Path, decodes: list[Path]) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    decodes.clear()
    write_image(folder / "later" / "new.png", 222)
    (folder / "later" / "new.txt").write_text("a new picture")

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.indexed, summary.skipped, summary.total) == (1, 3, 4)
    assert decodes == [folder.resolve() / "later" / "new.png"]
    assert open_index(folder).count() == 4


def test_duplicate_content_is_stored_once(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    (folder / "copies").mkdir()
    (folder / "copies" / "bird-again.png").write_bytes((folder / "bird.png").read_bytes())

    summary = index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), progress=False)

    assert (summary.indexed, summary.skipped, summary.total) == (3, 1, 4)
    assert open_index(folder).count() == 3


def test_the_image_route_embeds_pixels(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    embedder = FakeHashEmbedder(embeds_images=True)

    index_folder(folder, embedder, None, progress=False)

    index = open_index(folder)
    assert index.route == "image"
    assert embedder.text_calls == []
    (record,) = index.store.get([sha256(folder / "car.png")])
    np.testing.assert_allclose(record.vector, embedder.embed_images([open_image(folder / "car.png")])[0])
    assert record.metadata["caption"] == CAPTIONS["car"]


def test_the_image_route_needs_no_caption(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    numbered_images(folder, 2)

    summary = index_folder(folder, FakeHashEmbedder(embeds_images=True), None, progress=False)

    assert (summary.indexed, summary.failed) == (2, 0)


def test_an_index_records_what_built_it(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")

    index_folder(folder, FakeHashEmbedder(dim=32, model_id="fake:thirty-two"), None, progress=False)

    index = open_index(folder)
    assert (index.embedder_id, index.dim, index.route) == ("fake:thirty-two", 32, "caption")
    assert index.root == folder.resolve()


def test_indexing_with_another_embedder_is_refused_naming_both(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(model_id="fake:a"), None, progress=False)

    with pytest.raises(EmbedderMismatchError, match=r"built with fake:a; the configured embedder is fake:b"):
        index_folder(folder, FakeHashEmbedder(model_id="fake:b"), None, progress=False)


def test_an_interrupted_run_keeps_committed_batches_and_a_rerun_completes_it(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    numbered_images(folder, 7)
    interrupting = FakeCaptioner(fail_on=4, fail_with=KeyboardInterrupt())

    with pytest.raises(KeyboardInterrupt):
        index_folder(folder, FakeHashEmbedder(), interrupting, batch_size=2, progress=False)

    assert open_index(folder).count() == 2  # the first batch; the half-filled second one is lost
    summary = index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), batch_size=2, progress=False)
    assert (summary.indexed, summary.skipped, summary.total) == (5, 2, 7)
    assert open_index(folder).count() == 7


# Opening an index


def test_open_index_on_a_folder_without_an_index_raises_and_creates_nothing(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    before = sorted(folder.rglob("*"))

    with pytest.raises(IndexNotFoundError, match=r"no imageloop index at .*run `imageloop index"):
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


# Retrieving


@pytest.fixture
def retriever(tmp_path: Path) -> Retriever:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    return Retriever(open_index(folder), FakeHashEmbedder())


def test_a_retriever_is_an_image_retriever(retriever: Retriever) -> None:
    assert isinstance(retriever, ImageRetriever)


def test_search_returns_the_best_matching_image_first_with_its_absolute_path(retriever: Retriever) -> None:
    hits = retriever.search("a red bird", k=3)

    assert hits[0].caption == CAPTIONS["bird"]
    assert hits[0].path == retriever.index.root / "bird.png"
    assert hits[0].path.is_absolute()
    assert [hit.score for hit in hits] == sorted((hit.score for hit in hits), reverse=True)


def test_search_returns_at_most_k_images(retriever: Retriever) -> None:
    assert len(retriever.search("a picture", k=2)) == 2
    assert len(retriever.search("a picture", k=10)) == 3


def test_search_drops_hits_below_the_similarity_threshold(retriever: Retriever) -> None:
    all_hits = retriever.search("red bird branch", k=3)
    threshold = (all_hits[0].score + all_hits[1].score) / 2

    hits = retriever.search("red bird branch", k=3, similarity_threshold=threshold)

    assert [hit.caption for hit in hits] == [CAPTIONS["bird"]]


def test_search_many_embeds_all_texts_in_one_batch(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    embedder = FakeHashEmbedder()

    results = Retriever(open_index(folder), embedder).search_many(["red bird", "blue car"], k=1)

    assert embedder.text_calls == [["red bird", "blue car"]]
    assert [hits[0].caption for hits in results] == [CAPTIONS["bird"], CAPTIONS["car"]]


def test_a_retriever_refuses_another_embedder_naming_both(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(model_id="fake:a"), None, progress=False)

    with pytest.raises(EmbedderMismatchError, match=r"fake:a.*fake:b"):
        Retriever(open_index(folder), FakeHashEmbedder(model_id="fake:b"))


def test_a_retriever_refuses_an_empty_index(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    index = create_or_open_index(folder, FakeHashEmbedder())

    with pytest.raises(ImageloopError, match=r"index at .* is empty"):
        Retriever(index, FakeHashEmbedder())
