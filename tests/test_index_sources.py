"""`imageloop index` over the data researchers have: WebDataset shards (as img2dataset writes LAION subsets) and
parquet tables of image paths and captions, read back through the one image reader, resumable and confined."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from imageloop.cli import main
from imageloop.errors import ImageDecodeError, ImageloopError, IndexNotFoundError
from imageloop.tools.images import content_id, open_image
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.sources import expand_braces, resolve_source
from tests.fake_providers import fake_backends
from tests.fakes import FakeHashEmbedder

REPO = Path(__file__).resolve().parents[1]


def jpeg(shade: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), (shade, 255 - shade, (7 * shade) % 256)).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def add(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def write_shards(folder: Path, shards: int, per_shard: int) -> dict[str, bytes]:
    """`{00000..}.tar` as img2dataset writes them: each sample a `jpg`, its caption `txt` and its `json`."""
    folder.mkdir(parents=True, exist_ok=True)
    pictures: dict[str, bytes] = {}
    for shard in range(shards):
        with tarfile.open(folder / f"{shard:05d}.tar", "w") as archive:
            for sample in range(per_shard):
                key = f"{shard:05d}{sample:04d}"
                picture = jpeg(10 * (shard * per_shard + sample) + 5)
                meta = {"url": f"https://example.com/{key}.jpg", "key": key, "status": "success", "width": 24,
                        "error_message": None, "caption": "kept in txt", "exif": {"Make": "x"}}  # fmt: skip
                add(archive, f"{key}.jpg", picture)
                add(archive, f"{key}.txt", f"photo number {key} of a red sneaker".encode())
                add(archive, f"{key}.json", json.dumps(meta).encode())
                pictures[f"{shard:05d}.tar#{key}.jpg"] = picture
    return pictures


def records(folder: Path) -> dict[str, dict[str, Any]]:
    """Every record's metadata, by its path."""
    index = open_index(folder)
    try:
        found = index.store.get(index.store.ids())
        return {str(r.metadata["path"]): dict(r.metadata) for r in found}
    finally:
        index.close()


def index(capsys: pytest.CaptureFixture[str], *sources: str) -> dict[str, Any]:
    code = main(["index", *sources, "--embedder", "fake:hash", "--json", "-q"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    answer: dict[str, Any] = json.loads(captured.out.strip().splitlines()[-1])
    return answer


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Any:
    with fake_backends(monkeypatch) as backends:
        yield backends


def test_brace_patterns_expand_as_webdataset_writes_them() -> None:
    assert expand_braces("d/{00000..00002}.tar") == ["d/00000.tar", "d/00001.tar", "d/00002.tar"]
    assert expand_braces("{a,b}-{1..2}.tar") == ["a-1.tar", "a-2.tar", "b-1.tar", "b-2.tar"]


def test_shards_index_each_sample_with_its_caption_and_tags_addressed_inside_its_tar(
    tmp_path: Path, fakes: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    pictures = write_shards(tmp_path / "laion", shards=2, per_shard=3)
    summary = index(capsys, str(tmp_path / "laion" / "{00000..00001}.tar"))
    assert (summary["indexed"], summary["total"], summary["failed"]) == (6, 6, 0)
    stored = records(tmp_path / "laion")
    assert set(stored) == set(pictures)
    first = stored["00000.tar#000000000.jpg"]
    assert first["caption"] == "photo number 000000000 of a red sneaker"
    assert first["folder"] == "00000.tar"
    assert (first["url"], first["width"], first["status"]) == ("https://example.com/000000000.jpg", 24, "success")
    assert "error_message" not in first and "exif" not in first  # null and nested values are no tags


def test_an_address_inside_a_tar_reads_back_through_the_one_image_reader(tmp_path: Path) -> None:
    pictures = write_shards(tmp_path / "laion", shards=1, per_shard=2)
    address = tmp_path / "laion" / "00000.tar#000000001.jpg"
    expected = Image.open(io.BytesIO(pictures["00000.tar#000000001.jpg"])).convert("RGB")
    assert np.array_equal(np.asarray(open_image(address)), np.asarray(expected))
    assert content_id(address) == __import__("hashlib").sha256(pictures["00000.tar#000000001.jpg"]).hexdigest()


def test_a_query_answers_paths_a_face_can_open(tmp_path: Path, fakes: Any, capsys: pytest.CaptureFixture[str]) -> None:
    write_shards(tmp_path / "laion", shards=1, per_shard=3)
    index(capsys, str(tmp_path / "laion" / "00000.tar"))
    assert main(["query", str(tmp_path / "laion"), "red sneaker 000000002", "--embedder", "fake:hash", "--json"]) == 0
    results = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]
    assert results[0]["path"].endswith("00000.tar#000000002.jpg")
    assert open_image(Path(results[0]["path"])).size == (24, 16)


def test_a_rerun_adds_new_shards_only_and_drops_the_shards_no_longer_named(
    tmp_path: Path, fakes: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    write_shards(tmp_path / "laion", shards=3, per_shard=2)
    index(capsys, str(tmp_path / "laion" / "{00000..00001}.tar"))
    grown = index(capsys, str(tmp_path / "laion" / "{00000..00002}.tar"))
    assert (grown["indexed"], grown["skipped"]) == (2, 4)
    shrunk = index(capsys, str(tmp_path / "laion" / "00002.tar"))
    assert (shrunk["indexed"], shrunk["removed"]) == (0, 4)
    assert {path.split("#")[0] for path in records(tmp_path / "laion")} == {"00002.tar"}


@pytest.mark.parametrize("name", ["../escape.jpg", "/etc/escape.jpg", "link.jpg"])
def test_a_member_that_could_leave_its_tar_is_reported_and_never_read(
    tmp_path: Path, fakes: Any, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as archive:
        add(archive, "good.jpg", jpeg(40))
        add(archive, "good.txt", b"a good picture")
        if name == "link.jpg":
            link = tarfile.TarInfo(name)
            link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
            archive.addfile(link)
        else:
            add(archive, name, jpeg(90))
    summary = index(capsys, str(folder / "00000.tar"))
    assert (summary["indexed"], summary["failed"]) == (1, 1)
    assert "not read" in summary["failures"][0]["reason"]
    with pytest.raises(ImageDecodeError, match=r"not read|unsafe"):
        open_image(folder / f"00000.tar#{name}")


def test_a_kill_9_mid_run_then_a_rerun_stores_every_sample_exactly_once(tmp_path: Path) -> None:
    pictures = write_shards(tmp_path / "laion", shards=3, per_shard=10)
    pattern = str(tmp_path / "laion" / "{00000..00002}.tar")
    env = {**os.environ, "SLOW_EMBED_DELAY_S": "0.1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-m", "tests.slow_index", pattern, "--batch-size", "2", "--json"]
    child = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and child.poll() is None:
        try:
            if len(records(tmp_path / "laion")) >= 6:
                break
        except IndexNotFoundError:
            pass  # the child has not created the index yet
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    survived = len(records(tmp_path / "laion"))
    assert 6 <= survived < 30 and survived % 2 == 0  # whole batches only

    summary = index_folder(resolve_source([pattern]), FakeHashEmbedder(), None, batch_size=2, progress=False)
    assert (summary.indexed, summary.skipped, summary.failed) == (30 - survived, survived, 0)
    assert set(records(tmp_path / "laion")) == set(pictures)


def test_a_parquet_table_indexes_its_paths_with_their_captions_and_columns_as_tags(
    tmp_path: Path, fakes: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    folder = tmp_path / "coco"
    (folder / "images").mkdir(parents=True)
    for n in range(3):
        (folder / "images" / f"{n}.jpg").write_bytes(jpeg(60 * n + 10))
    rows = {"image_path": [f"images/{n}.jpg" for n in range(3)] + ["../outside.jpg"],
            "caption": [f"a cup number {n}" for n in range(4)], "split": ["train"] * 4}  # fmt: skip
    pq.write_table(pa.table(rows), folder / "captions.parquet")
    summary = index(capsys, str(folder / "captions.parquet"))
    assert (summary["indexed"], summary["failed"]) == (3, 1)
    assert "outside" in summary["failures"][0]["reason"]
    stored = records(folder)
    assert stored["images/1.jpg"]["caption"] == "a cup number 1" and stored["images/1.jpg"]["split"] == "train"


def test_a_folder_indexed_from_one_kind_of_source_refuses_another(
    tmp_path: Path, fakes: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    write_shards(tmp_path / "laion", shards=1, per_shard=2)
    (tmp_path / "laion" / "loose.jpg").write_bytes(jpeg(200))
    (tmp_path / "laion" / "loose.txt").write_text("a loose picture")
    index(capsys, str(tmp_path / "laion" / "00000.tar"))
    code = main(["index", str(tmp_path / "laion"), "--embedder", "fake:hash"])
    assert code == 2 and "was built from webdataset 00000.tar" in capsys.readouterr().err


def test_shards_in_two_folders_are_refused(tmp_path: Path) -> None:
    write_shards(tmp_path / "a", shards=1, per_shard=1)
    write_shards(tmp_path / "b", shards=1, per_shard=1)
    with pytest.raises(ImageloopError, match="shards must lie in one folder"):
        resolve_source([tmp_path / "a" / "00000.tar", tmp_path / "b" / "00000.tar"])
