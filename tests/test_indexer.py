"""Indexing an image folder: content ids, moves, overlap, crash safety, the bomb guard, `index-info`."""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pytest
from PIL import Image, ImageFile

import imageloop.tools.images as images
import imageloop.tools.indexing.indexer as indexer
from imageloop.cli import main
from imageloop.errors import EmbedderMismatchError, ImageloopError, IndexNotFoundError
from imageloop.protocols import Vector
from imageloop.tools.images import decode_image, open_image
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import IndexingInterrupted, index_folder
from tests.fake_providers import fake_backends
from tests.fakes import FakeHashEmbedder
from tests.image_folders import (
    CAPTIONS,
    PRODUCTS,
    captioned_folder,
    numbered_images,
    product_catalogue,
    sha256,
    write_image,
)

REPO = Path(__file__).resolve().parents[1]


class FakeCaptioner:
    """Captions from the file name; raises the exception given for a file's stem in `fail`."""

    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.calls: list[Path] = []
        self.fail = fail or {}

    def __call__(self, path: Path) -> str:
        self.calls.append(path)
        if path.stem in self.fail:
            raise self.fail[path.stem]
        return f"a picture called {path.stem}"


class RecordingEmbedder(FakeHashEmbedder):
    """Records every batch it embeds (texts, or image sizes), in call order."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.batches: list[list[str]] = []

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        self.batches.append(list(texts))
        return super().embed_texts(texts)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every path the indexer decodes (from any worker thread)."""
    seen: list[Path] = []

    def counting_decode(f: BinaryIO, path: Path, *, shortest_side: int | None = None) -> Image.Image:
        seen.append(path)
        return decode_image(f, path, shortest_side=shortest_side)

    monkeypatch.setattr(indexer, "decode_image", counting_decode)
    return seen


def stored(folder: Path) -> dict[str, dict[str, object]]:
    """Every record's metadata by id."""
    index = open_index(folder)
    try:
        hits = index.store.search(FakeHashEmbedder().embed_texts(["a"])[0], k=1000)
        return {hit.id: dict(hit.metadata) for hit in hits}
    finally:
        index.close()


def stored_captions(folder: Path) -> dict[str, str]:
    return {str(meta["path"]): str(meta["caption"]) for meta in stored(folder).values()}


def count(folder: Path) -> int:
    index = open_index(folder)
    try:
        return index.count()
    finally:
        index.close()


# Indexing


def test_sidecar_captions_are_stored_and_embedded(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    embedder = FakeHashEmbedder()

    summary = index_folder(folder, embedder, None, progress=False)

    assert summary.to_json() == {
        "indexed": 3,
        "skipped": 0,
        "failed": 0,
        "total": 3,
        "moved": 0,
        "retagged": 0,
        "removed": 0,
        "failures": [],
    }
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


def test_a_json_sidecar_adds_its_tags_and_attributes_which_where_filters_on(tmp_path: Path) -> None:
    folder = product_catalogue(tmp_path / "catalogue")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)

    records = {str(meta["path"]): meta for meta in stored(folder).values()}
    assert records["tote.png"]["tags"] == ["bag"] and records["tote.png"]["brand"] == "acme"
    index = open_index(folder)
    try:
        query = FakeHashEmbedder().embed_texts(["canvas"])[0]
        found = index.store.search(query, k=10, where={"tags": "bag", "brand": "acme"})
    finally:
        index.close()
    assert sorted(str(hit.metadata["path"]) for hit in found) == ["backpack.png", "tote.png"]


def test_editing_a_json_sidecar_retags_the_record_without_embedding_again(tmp_path: Path, decodes: list[Path]) -> None:
    folder = product_catalogue(tmp_path / "catalogue")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    (folder / "mug.json").write_text(json.dumps({"tags": ["kitchen", "gift"]}))
    (folder / "tote.json").unlink()
    decodes.clear()
    embedder = FakeHashEmbedder()

    summary = index_folder(folder, embedder, None, progress=False)

    assert (summary.indexed, summary.skipped, summary.retagged, summary.moved) == (0, len(PRODUCTS), 2, 0)
    records = {str(meta["path"]): meta for meta in stored(folder).values()}
    assert records["mug.png"]["tags"] == ["kitchen", "gift"] and "brand" not in records["mug.png"]
    assert set(records["tote.png"]) == {"path", "folder", "caption"}
    assert (embedder.text_calls, decodes) == ([], [])
    assert index_folder(folder, FakeHashEmbedder(), None, progress=False).retagged == 0


@pytest.mark.parametrize(
    ("sidecar", "message"),
    [
        ('{"path": "elsewhere.png"}', "'path' is set by the indexer"),
        ('{"tags": [{"nested": 1}]}', "'tags' must be text, a number, a boolean or a list of them"),
        ('["sneaker"]', "expected a JSON object"),
        ("{not json", "cannot read metadata"),
    ],
)
def test_a_bad_json_sidecar_fails_that_image_only(tmp_path: Path, sidecar: str, message: str) -> None:
    folder = captioned_folder(tmp_path / "images")
    (folder / "car.json").write_text(sidecar)

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.indexed, summary.failed) == (2, 1)
    [(path, reason)] = summary.failures
    assert path == "car.png" and message in reason


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
    captioner = FakeCaptioner(fail={"img01": ImageloopError("captioning endpoint refused")})

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

    assert (summary.indexed, summary.skipped, summary.moved, summary.total) == (0, 3, 0, 3)
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


def test_duplicate_content_is_stored_once_under_the_first_path(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    (folder / "copies").mkdir()
    (folder / "copies" / "bird-again.png").write_bytes((folder / "bird.png").read_bytes())

    summary = index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), progress=False)

    assert (summary.indexed, summary.skipped, summary.total) == (3, 1, 4)
    assert open_index(folder).count() == 3
    assert stored(folder)[sha256(folder / "bird.png")]["path"] == "bird.png"


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


def test_an_embedder_whose_dimension_changed_is_refused_naming_both(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(dim=64), None, progress=False)
    write_image(folder / "new.png", 222)
    (folder / "new.txt").write_text("a new picture")

    with pytest.raises(ImageloopError, match=r"fake:hash returned vectors of shape \(1, 32\).* holds 64-d vectors"):
        index_folder(folder, FakeHashEmbedder(dim=32), None, progress=False)

    assert open_index(folder).count() == 3


def test_bad_batch_and_worker_sizes_are_refused(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")

    with pytest.raises(ImageloopError, match="batch_size must be positive"):
        index_folder(folder, FakeHashEmbedder(), None, batch_size=0, progress=False)
    with pytest.raises(ImageloopError, match="workers must be positive"):
        index_folder(folder, FakeHashEmbedder(), None, workers=0, progress=False)


# Moved files


def test_a_moved_file_gets_its_new_path_without_being_embedded_again(tmp_path: Path, decodes: list[Path]) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    bird = sha256(folder / "bird.png")
    (before,) = open_index(folder).store.get([bird])
    (folder / "birds").mkdir()
    (folder / "bird.png").rename(folder / "birds" / "bird.png")
    decodes.clear()
    embedder = FakeHashEmbedder()

    summary = index_folder(folder, embedder, None, progress=False)

    assert summary.to_json() == {
        "indexed": 0,
        "skipped": 3,
        "failed": 0,
        "total": 3,
        "moved": 1,
        "retagged": 0,
        "removed": 0,
        "failures": [],
    }
    (after,) = open_index(folder).store.get([bird])
    assert (after.metadata["path"], after.metadata["folder"]) == ("birds/bird.png", "birds")
    assert after.metadata["caption"] == CAPTIONS["bird"]
    np.testing.assert_array_equal(after.vector, before.vector)
    assert (embedder.text_calls, decodes) == ([], [])
    assert open_index(folder).count() == 3


def test_a_move_is_recorded_once(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    (folder / "car.png").rename(folder / "vehicle.png")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.skipped, summary.moved) == (3, 0)


def test_a_copy_of_a_file_still_in_place_is_not_a_move(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    (folder / "a-copy.png").write_bytes((folder / "tree.png").read_bytes())

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.indexed, summary.skipped, summary.moved, summary.total) == (0, 4, 0, 4)
    assert stored(folder)[sha256(folder / "tree.png")]["path"] == "tree.png"
    assert open_index(folder).count() == 3


def test_a_moved_file_that_now_appears_twice_takes_the_first_path(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    data = (folder / "car.png").read_bytes()
    (folder / "car.png").unlink()
    write_image(folder / "z" / "car.png", 0).write_bytes(data)
    write_image(folder / "a" / "car.png", 0).write_bytes(data)

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.skipped, summary.moved, summary.total) == (4, 1, 4)
    assert stored(folder)[sha256(folder / "a" / "car.png")]["path"] == "a/car.png"


# Worker threads


def test_workers_decode_the_next_batch_while_the_embedder_works(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    numbered_images(folder, 12)
    decoded: list[Path] = []
    next_batch_decoded = threading.Event()

    def counting_decode(f: BinaryIO, path: Path, *, shortest_side: int | None = None) -> Image.Image:
        image = decode_image(f, path, shortest_side=shortest_side)
        decoded.append(path)
        if len(decoded) >= 8:
            next_batch_decoded.set()
        return image

    waited: list[bool] = []

    class FirstCallWaits(FakeHashEmbedder):
        """The first embedding lasts until the next batch is decoded: a sequential indexer never gets there."""

        def embed_images(self, batch: Sequence[Image.Image]) -> Vector:
            if not waited:
                waited.append(next_batch_decoded.wait(timeout=5))
            return super().embed_images(batch)

    monkeypatch.setattr(indexer, "decode_image", counting_decode)
    embedder = FirstCallWaits(embeds_images=True)

    summary = index_folder(folder, embedder, None, batch_size=4, workers=2, progress=False)

    assert waited == [True]
    assert summary.indexed == 12


def test_workers_run_at_most_a_batch_and_two_files_each_ahead(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "images"
    numbered_images(folder, 40)
    decoded: list[Path] = []
    ahead: list[int] = []

    def counting_decode(f: BinaryIO, path: Path, *, shortest_side: int | None = None) -> Image.Image:
        decoded.append(path)
        return decode_image(f, path, shortest_side=shortest_side)

    class SlowFirstCall(FakeHashEmbedder):
        def embed_images(self, batch: Sequence[Image.Image]) -> Vector:
            if not ahead:
                time.sleep(0.3)  # ample time for the workers to run as far ahead as they may
                ahead.append(len(decoded))
            return super().embed_images(batch)

    monkeypatch.setattr(indexer, "decode_image", counting_decode)

    index_folder(folder, SlowFirstCall(embeds_images=True), None, batch_size=4, workers=2, progress=False)

    # 4 in the batch being embedded, at most 4 + 2 * 2 prepared behind it: never the whole folder.
    assert 8 <= ahead[0] <= 12


def test_results_follow_the_file_order_whatever_the_decode_timing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "images"
    paths = numbered_images(folder, 12)
    (folder / "a").mkdir()
    (folder / "a" / "copy-of-img05.png").write_bytes(paths[5].read_bytes())
    (folder / "img03b.png").write_bytes(b"corrupt")
    (folder / "img09b.png").write_bytes(b"corrupt too")
    delays = iter(np.random.default_rng(0).uniform(0, 0.02, 100))

    def jittered_decode(f: BinaryIO, path: Path, *, shortest_side: int | None = None) -> Image.Image:
        time.sleep(next(delays))  # later files often finish first
        return decode_image(f, path, shortest_side=shortest_side)

    monkeypatch.setattr(indexer, "decode_image", jittered_decode)
    embedder = RecordingEmbedder()

    summary = index_folder(folder, embedder, FakeCaptioner(), batch_size=3, workers=4, progress=False)

    assert [path for path, _ in summary.failures] == ["img03b.png", "img09b.png"]
    embedded = [caption for batch in embedder.batches for caption in batch]
    in_file_order = ["copy-of-img05"] + [f"img{i:02d}" for i in range(12) if i != 5]
    assert embedded == [f"a picture called {name}" for name in in_file_order]
    assert stored(folder)[sha256(paths[5])]["path"] == "a/copy-of-img05.png"


# Interruptions and crashes


def test_an_interrupted_run_keeps_committed_batches_and_a_rerun_completes_it(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    numbered_images(folder, 7)
    interrupting = FakeCaptioner(fail={"img04": KeyboardInterrupt()})

    with pytest.raises(IndexingInterrupted, match="4 newly indexed images in finished batches are saved"):
        index_folder(folder, FakeHashEmbedder(), interrupting, batch_size=2, progress=False)

    assert count(folder) == 4  # two batches; img04 would have started the third
    summary = index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), batch_size=2, progress=False)
    assert (summary.indexed, summary.skipped, summary.total) == (3, 4, 7)
    assert count(folder) == 7


def _index_slowly(folder: Path) -> subprocess.Popen[str]:
    """`imageloop index FOLDER --batch-size 2` in a child process whose embedder takes 0.1 s a batch."""
    env = {**os.environ, "SLOW_EMBED_DELAY_S": "0.1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "tests.slow_index", str(folder), "--batch-size", "2", "--json"]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_count(folder: Path, at_least: int, child: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if count(folder) >= at_least:
                return
        except IndexNotFoundError:
            pass  # the child has not created the index yet
        time.sleep(0.01)
    child.kill()
    raise AssertionError(f"the indexer never committed {at_least} images: {child.communicate()}")


def test_a_kill_9_mid_run_then_a_rerun_stores_every_image_exactly_once(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    paths = numbered_images(folder, 30, captions=True)
    child = _index_slowly(folder)
    _wait_for_count(folder, 6, child)  # the 12 batches left take 1.2 s: the kill lands mid-run

    child.send_signal(signal.SIGKILL)
    child.communicate()

    assert child.returncode == -signal.SIGKILL
    survived = count(folder)
    assert 6 <= survived < 30
    assert survived % 2 == 0  # whole batches of two, never half of one
    summary = index_folder(folder, FakeHashEmbedder(), None, batch_size=2, progress=False)
    assert (summary.indexed, summary.skipped, summary.failed) == (30 - survived, survived, 0)
    assert set(stored(folder)) == {sha256(path) for path in paths}
    assert count(folder) == 30


def test_ctrl_c_keeps_finished_batches_and_the_cli_says_how_many(tmp_path: Path) -> None:
    folder = tmp_path / "images"
    numbered_images(folder, 30, captions=True)
    child = _index_slowly(folder)
    _wait_for_count(folder, 4, child)

    child.send_signal(signal.SIGINT)
    stdout, stderr = child.communicate()

    assert child.returncode == 130
    assert stdout == ""  # no summary: the run did not finish
    last_line = stderr.strip().splitlines()[-1]
    saved = count(folder)
    assert last_line == (
        f"imageloop: interrupted; {saved} newly indexed images in finished batches are saved; "
        "run the same command again to add the rest"
    )
    summary = index_folder(folder, FakeHashEmbedder(), None, batch_size=2, progress=False)
    assert (summary.indexed, summary.skipped) == (30 - saved, saved)


# The decompression-bomb guard


def png_header(width: int, height: int) -> bytes:
    """A tiny PNG that declares `width`x`height` pixels and holds none: what a decompression bomb looks like."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.fixture
def pixel_loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every image whose pixels Pillow starts decoding."""
    loads: list[str] = []
    real_load = ImageFile.ImageFile.load

    def recording_load(self: ImageFile.ImageFile) -> object:
        loads.append(str(self.filename))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    return loads


@pytest.mark.parametrize(
    ("width", "height"),
    [(9_000, 9_000), (100_000, 100_000)],
    ids=["over-our-64-mpx-limit", "over-pillows-own-limit"],
)
def test_an_image_declaring_too_many_pixels_is_refused_before_decoding(
    tmp_path: Path, pixel_loads: list[str], width: int, height: int
) -> None:
    folder = captioned_folder(tmp_path / "images")
    (folder / "bomb.png").write_bytes(png_header(width, height))
    pixel_loads.clear()

    summary = index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), progress=False)

    assert (summary.indexed, summary.failed) == (3, 1)
    ((path, reason),) = summary.failures
    assert path == "bomb.png"
    assert "exceeds the 64,000,000-pixel limit; not decoded" in reason
    assert not any(loaded.endswith("bomb.png") for loaded in pixel_loads)


def test_a_file_larger_than_the_byte_limit_is_refused_before_decoding(
    tmp_path: Path, pixel_loads: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = captioned_folder(tmp_path / "images")
    write_image(folder / "big.png", 99, size=256)
    monkeypatch.setattr(images, "MAX_FILE_BYTES", (folder / "big.png").stat().st_size - 1)
    pixel_loads.clear()

    summary = index_folder(folder, FakeHashEmbedder(), FakeCaptioner(), progress=False)

    ((path, reason),) = summary.failures
    assert path == "big.png"
    assert "-byte limit; not decoded" in reason
    assert not any(loaded.endswith("big.png") for loaded in pixel_loads)


# imageloop index-info


def test_index_info_prints_count_embedder_dim_and_store_as_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(dim=32, model_id="fake:small"), None, progress=False)

    assert main(["index-info", str(folder), "--json"]) == 0

    info = json.loads(capsys.readouterr().out)
    assert info == {
        "count": 3,
        "embedder": "fake:small",
        "dim": 32,
        "store": "embedded",
        "route": "caption",
        "root": str(folder.resolve()),
        "ann": "exact",
    }


def test_index_records_the_search_engine_asked_for_and_index_info_says_how_the_index_searches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "images")
    with fake_backends(monkeypatch):
        command = ["index", str(folder), "--embedder", "fake:hash", "--ann", "quantized", "--threads", "1"]
        assert main(command) == 0
        capsys.readouterr()
        assert main(["index-info", str(folder), "--json"]) == 0

    assert json.loads(capsys.readouterr().out)["ann"] == "exact"  # 3 images: searched exactly up to 100,000
    index = open_index(folder)
    assert index.store.get_meta()["ann_engine"] == "quantized"
    index.close()


def test_index_info_accepts_the_imageloop_directory_and_reads_as_prose(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(embeds_images=True), None, progress=False)

    assert main(["index-info", str(folder / ".imageloop")]) == 0

    assert capsys.readouterr().out.splitlines() == [
        f"{folder.resolve()}: 3 images",
        "  embedder: fake:hash (64-d, image route)",
        "  store:    embedded store",
    ]


@pytest.mark.parametrize("what", ["folder-without-index", "missing-path", "a-file"])
def test_index_info_on_something_that_is_not_an_index_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], what: str
) -> None:
    path = {"folder-without-index": captioned_folder(tmp_path / "images"), "missing-path": tmp_path / "nothing"}.get(
        what, tmp_path / "file.png"
    )
    if what == "a-file":
        write_image(path, 3)

    assert main(["index-info", str(path), "--json"]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"imageloop: error: no imageloop index at {path}: index {path.resolve()} first\n"


@pytest.mark.parametrize("content", [b"garbage, not a database", b""], ids=["not-sqlite", "empty-file"])
def test_index_info_on_a_store_directory_holding_something_else_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    folder = captioned_folder(tmp_path / "images")
    (folder / ".imageloop").mkdir()
    (folder / ".imageloop" / "index.sqlite").write_bytes(content)

    assert main(["index-info", str(folder / ".imageloop")]) == 2

    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("imageloop: error: ") and err.count("\n") == 1
    assert str(folder.resolve() / ".imageloop") in err


def test_a_symlink_leading_out_of_the_folder_is_not_indexed(tmp_path: Path) -> None:
    outside = write_image(tmp_path / "private" / "secret.png", 200)
    folder = tmp_path / "photos"
    write_image(folder / "inside.png", 10)
    (folder / "link_out.png").symlink_to(outside)
    (folder / "link_in.png").symlink_to(folder / "inside.png")
    summary = index_folder(folder, FakeHashEmbedder(embeds_images=True), None, progress=False)
    assert (summary.indexed, summary.skipped, summary.total) == (1, 1, 2)  # the inner link is a duplicate


def test_a_file_deleted_from_the_folder_is_pruned_on_reindex(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    (folder / "car.png").unlink()

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.removed, summary.total, count(folder)) == (1, 2, 2)
    assert "car.png" not in stored_captions(folder)


def test_a_file_edited_in_place_keeps_one_record_under_its_path(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    write_image(folder / "bird.png", 250)  # new bytes under the same name: a new id

    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.indexed, summary.removed, count(folder)) == (1, 1, 3)
    assert [path for path in stored_captions(folder)].count("bird.png") == 1


def test_a_file_that_cannot_be_read_this_time_keeps_its_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    real_open = indexer.open_regular

    def unreadable_car(path: Path) -> io.BufferedReader:
        if path.name == "car.png":
            raise PermissionError("permission denied")
        return real_open(path)

    monkeypatch.setattr(indexer, "open_regular", unreadable_car)
    summary = index_folder(folder, FakeHashEmbedder(), None, progress=False)

    assert (summary.failed, summary.removed, count(folder)) == (1, 0, 3)
