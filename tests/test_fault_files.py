"""Filesystem faults: a FIFO or a symlink loop named like an image, files deleted, edited or replaced while
indexed, a full disk (an injected ENOSPC and a real small tmpfs), read-only folders (a real read-only
mount), `.imageloop` being a file, `--out` where no folder can be made, and page-level index damage.
Each ends in a one-line error that says what to do, or in the work carrying on without the bad file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import pytest
from PIL import Image

from imageloop.cli import main
from imageloop.errors import ImageDecodeError
from imageloop.tools.images import decode_image, open_image
from imageloop.tools.indexing import indexer
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.stores.embedded import EmbeddedVectorStore
from tests.fake_openai_server import FakeOpenAIServer
from tests.fake_providers import FAKE_SETTINGS, FakeBackends, captioned_folder, fake_backends
from tests.fakes import FakeHashEmbedder
from tests.filesystem_faults import imageloop_in_namespace, namespaces_available

FAKE = [option for role, model in FAKE_SETTINGS.items() for option in (f"--{role}", model)]
ALIGNED = {"aligned": True, "missing_concepts": []}
needs_namespaces = pytest.mark.skipif(not namespaces_available(), reason="no private mount namespaces here")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeBackends]:
    with fake_backends(monkeypatch) as made:
        yield made


def error_line(err: str) -> str:
    assert "Traceback" not in err, err
    [line] = [line for line in err.splitlines() if line.startswith("imageloop: error:")]
    return line


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    # index-info builds no model; query runs the embedder alone.
    models = {"index-info": [], "query": ["--embedder", FAKE_SETTINGS["embedder"]]}.get(args[0], FAKE)
    code = main([*args, *models])
    out, err = capsys.readouterr()
    return code, out, err


def indexed(folder: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    code, out, err = cli(capsys, "index", str(folder), "--json")
    assert code == 0, err
    summary: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    return summary


def paths_in_index(folder: Path) -> list[str]:
    index = open_index(folder)
    try:
        return sorted(str(record.metadata["path"]) for record in index.store.get(index.store.ids()))
    finally:
        index.close()


# Special files.


def test_a_fifo_named_like_an_image_is_refused_at_once_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageDecodeError, match=r"x\.png: not a regular file \(a FIFO\); not read"):
        open_image(fifo)  # a blocking open would wait here forever for a writer


def test_indexing_skips_a_fifo_and_a_symlink_loop_and_finishes(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    os.mkfifo(folder / "x.png")
    (folder / "a.png").symlink_to(folder / "b.png")
    (folder / "b.png").symlink_to(folder / "a.png")
    summaries: list[dict[str, Any]] = []
    worker = threading.Thread(target=lambda: summaries.append(indexed(folder, capsys)), daemon=True)

    worker.start()
    worker.join(timeout=60)

    assert not worker.is_alive(), "indexing hung on the FIFO"
    [summary] = summaries
    assert (summary["indexed"], summary["failed"], summary["total"]) == (3, 0, 3)


def test_an_mcp_server_indexing_a_folder_with_a_fifo_answers_later_calls(fakes: FakeBackends, tmp_path: Path) -> None:
    from tests.test_mcp_server import in_process, memory_client, structured

    captioned_folder(tmp_path / "photos")
    os.mkfifo(tmp_path / "photos" / "x.png")
    with in_process(tmp_path) as (_, open_session), memory_client(open_session) as client:
        first = structured(client.call("index_images", {"folder": "photos", "wait_seconds": 30}))
        again = structured(client.call("index_images", {"folder": "photos", "wait_seconds": 30}))
        found = structured(client.call("retrieve_images", {"index": "photos", "query": "a blue jay", "k": 1}))

    assert first["status"] == again["status"] == "done" and first["result"]["indexed"] == 3
    assert found["results"][0]["path"].endswith("jay.png")


# Files that change under the index.


def test_a_deleted_file_is_no_longer_retrieved_and_reindexing_prunes_it(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    indexed(folder, capsys)
    (folder / "jay.png").unlink()

    code, out, _ = cli(capsys, "query", str(folder), "a blue jay", "--json", "--k", "3")
    found = [Path(r["path"]).name for r in json.loads(out)["results"]]
    summary = indexed(folder, capsys)

    assert code == 0 and "jay.png" not in found and len(found) == 2
    assert summary["removed"] == 1 and paths_in_index(folder) == ["cat.png", "snow.png"]


def test_a_file_edited_in_place_keeps_one_record_with_its_new_content(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    indexed(folder, capsys)
    Image.new("RGB", (24, 24), (1, 2, 3)).save(folder / "jay.png")  # new bytes, same path

    summary = indexed(folder, capsys)

    assert (summary["indexed"], summary["removed"]) == (1, 1)
    assert paths_in_index(folder) == ["cat.png", "jay.png", "snow.png"]  # the path appears once
    index = open_index(folder)
    try:
        assert hashlib.sha256((folder / "jay.png").read_bytes()).hexdigest() in index.store.ids()
    finally:
        index.close()


def test_a_file_replaced_while_it_is_indexed_is_stored_as_one_whole_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (24, 24), (200, 10, 10)).save(folder / "red.png")
    original = (folder / "red.png").read_bytes()
    replacement = tmp_path / "blue.png"
    Image.new("RGB", (24, 24), (10, 10, 200)).save(replacement)

    def replaced_before_decoding(f: BinaryIO, path: Path, *, shortest_side: int | None = None) -> Image.Image:
        os.replace(replacement, path)  # the file is swapped after it was hashed, before it is decoded
        return decode_image(f, path, shortest_side=shortest_side)

    monkeypatch.setattr(indexer, "decode_image", replaced_before_decoding)
    embedder = FakeHashEmbedder(embeds_images=True)

    index_folder(folder, embedder, None, progress=False)

    index = open_index(folder)
    try:
        [record] = index.store.get(index.store.ids())
    finally:
        index.close()
    assert record.id == hashlib.sha256(original).hexdigest()  # the id of the red version...
    red = Image.new("RGB", (24, 24), (200, 10, 10))
    np.testing.assert_allclose(record.vector, embedder.embed_images([red])[0], atol=1e-6)  # ...and its pixels


def test_a_reference_replaced_by_a_fifo_after_indexing_is_dropped_and_the_run_finishes(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    indexed(folder, capsys)
    (folder / "jay.png").unlink()
    os.mkfifo(folder / "jay.png")
    fakes.vlm.answers.extend([{"aligned": False, "missing_concepts": ["blue jay"]}] + [ALIGNED] * 3)
    out = tmp_path / "run"
    done: list[int] = []
    worker = threading.Thread(
        target=lambda: done.append(main(["generate", "a blue jay", "--index", str(folder), "--out", str(out), *FAKE])),
        daemon=True,
    )

    worker.start()
    worker.join(timeout=60)

    assert not worker.is_alive(), "the run blocked on the FIFO"
    record = json.loads((out / "run.json").read_text())
    assert done == [0] and record["error"] is None
    assert all(Path(ref["path"]).name != "jay.png" for ref in record["references"])


# A full disk.


def test_disk_full_mid_index_is_one_line_and_keeps_the_finished_batches(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    upsert = EmbeddedVectorStore.upsert
    batches: list[int] = []

    def filling_up(self: EmbeddedVectorStore, records: Any) -> None:
        batches.append(len(records))
        if len(batches) > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        upsert(self, records)

    monkeypatch.setattr(EmbeddedVectorStore, "upsert", filling_up)

    code, _, err = cli(capsys, "index", str(folder), "--batch-size", "1")

    assert code == 2
    line = error_line(err)
    assert "disk full while writing the index of" in line and "free some space and try again" in line
    assert len(paths_in_index(folder)) == 1  # the batch committed before the disk filled up


@needs_namespaces
def test_a_really_full_disk_while_indexing_is_one_line(openai_server: FakeOpenAIServer, tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for i in range(40):  # 80 small files: ~320 KiB of tmpfs pages, leaving too little for the index
        Image.new("RGB", (8, 8), (i, 255 - i, 7)).save(source / f"p{i:03d}.png")
        (source / f"p{i:03d}.txt").write_text(f"picture number {i}")
    small = tmp_path / "small"
    small.mkdir()
    env = {"OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test"}

    done = imageloop_in_namespace(
        ["index", str(small), "--profile", "openai", "--batch-size", "8"], tmpfs=(small, "512k", source), env=env
    )

    assert done.returncode == 2, done.stderr
    assert "disk full" in error_line(done.stderr) and "free some space" in error_line(done.stderr)


@needs_namespaces
def test_a_full_disk_where_a_run_folder_is_made_is_one_line(openai_server: FakeOpenAIServer, tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "photos")
    env = {"OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test"}
    assert imageloop_in_namespace(["index", str(folder), "--profile", "openai"], env=env).returncode == 0
    filled, disk = tmp_path / "filled", tmp_path / "disk"
    filled.mkdir()
    disk.mkdir()
    (filled / "filler").write_bytes(b"x" * 60_000)  # the 64 KiB disk keeps room for a folder, not a database

    done = imageloop_in_namespace(
        ["generate", "a jay", "--index", str(folder), "--out", str(disk / "run"), "--profile", "openai"],
        tmpfs=(disk, "64k", filled),
        env=env,
    )

    assert done.returncode == 2
    line = error_line(done.stderr)
    assert f"disk full while writing the run in {disk / 'run'}" in line and "run the same command again" in line


NOT_ALIGNED = {"aligned": False, "missing_concepts": ["blue jay"]}
CAPTIONS = {"captions": [{"concept": "blue jay", "caption": "a blue jay with a blue crest on a branch"}]}


def test_disk_full_mid_run_is_one_line_recorded_in_the_run_which_resumes(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from imageloop.tools.artifacts import ArtifactStore

    folder = captioned_folder(tmp_path / "photos")
    indexed(folder, capsys)
    put = ArtifactStore.put
    stored: list[str] = []

    def filling_up(self: ArtifactStore, image: Any) -> str:
        if stored:  # the draft is stored; the drawing with references finds the disk full
            raise OSError(errno.ENOSPC, "No space left on device")
        stored.append(put(self, image))
        return stored[-1]

    monkeypatch.setattr(ArtifactStore, "put", filling_up)
    fakes.vlm.answers.extend([NOT_ALIGNED, CAPTIONS])
    out = tmp_path / "run"

    code, _, err = cli(capsys, "generate", "a blue jay", "--index", str(folder), "--out", str(out))

    line = error_line(err)
    assert code == 2 and f"continue with: imageloop generate --resume {out}" in line
    record = json.loads((out / "run.json").read_text())
    assert (record["status"], record["stop_reason"]) == ("error", "error")
    assert f"imageloop: error: {record['error']}" == line and record["draft_image"]
    monkeypatch.setattr(ArtifactStore, "put", put)  # some space freed
    fakes.vlm.answers.append(ALIGNED)

    assert cli(capsys, "generate", "--resume", str(out))[0] == 0
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert sum(not request.references for request in fakes.generator.requests) == 1  # the draft, drawn once


# Read-only folders.


@needs_namespaces
def test_indexing_a_read_only_folder_is_one_line(openai_server: FakeOpenAIServer, tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "photos")
    env = {"OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test"}

    done = imageloop_in_namespace(["index", str(folder), "--profile", "openai"], read_only=[folder], env=env)

    assert done.returncode == 2
    assert "read-only" in error_line(done.stderr) and not (folder / ".imageloop").exists()


@needs_namespaces
def test_a_healthy_index_on_a_read_only_mount_can_be_read_and_rechecked(
    openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    env = {"OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test"}
    assert imageloop_in_namespace(["index", str(folder), "--profile", "openai"], env=env).returncode == 0

    info = imageloop_in_namespace(["index-info", str(folder), "--json"], read_only=[folder], env=env)
    query = imageloop_in_namespace(
        ["query", str(folder), "a blue jay", "--profile", "openai", "--json"], read_only=[folder], env=env
    )
    again = imageloop_in_namespace(["index", str(folder), "--profile", "openai", "--json"], read_only=[folder], env=env)

    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["count"] == 3
    assert query.returncode == 0, query.stderr
    assert Path(json.loads(query.stdout.splitlines()[-1])["results"][0]["path"]).name == "jay.png"
    assert again.returncode == 0, again.stderr  # nothing new: nothing to write
    assert json.loads(again.stdout.splitlines()[-1])["skipped"] == 3


# Things in the way.


def test_an_imageloop_file_in_place_of_the_index_folder_is_one_line(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    (folder / ".imageloop").write_text("not a folder")

    index_code, _, index_err = cli(capsys, "index", str(folder))
    query_code, _, query_err = cli(capsys, "query", str(folder), "a jay")

    for code, err in ((index_code, index_err), (query_code, query_err)):
        assert code == 2 and "is a file, not an imageloop index folder: move or delete it" in error_line(err)


@pytest.mark.parametrize("where", ["at a file", "under a file"])
def test_out_where_no_folder_can_be_made_is_one_line(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    indexed(folder, capsys)
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file")
    out = blocker if where == "at a file" else blocker / "run"

    code, _, err = cli(capsys, "generate", "a jay", "--index", str(folder), "--out", str(out))

    assert code == 2 and str(blocker) in error_line(err)
    assert "is a file, not a folder" in error_line(err) or "a file stands where a folder is needed" in error_line(err)


@needs_namespaces
def test_out_on_a_read_only_disk_is_one_line(openai_server: FakeOpenAIServer, tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "photos")
    env = {"OPENAI_BASE_URL": openai_server.base_url, "OPENAI_API_KEY": "sk-test"}
    assert imageloop_in_namespace(["index", str(folder), "--profile", "openai"], env=env).returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()

    done = imageloop_in_namespace(
        ["generate", "a jay", "--index", str(folder), "--out", str(disk / "run"), "--profile", "openai"],
        read_only=[disk],
        env=env,
    )

    assert done.returncode == 2 and "read-only" in error_line(done.stderr) and str(disk / "run") in done.stderr


# Damage.


def damage_page(folder: Path, name: str) -> None:
    """Overwrite the root page of the store's table or index `name` with garbage; the others stay intact."""
    store = folder / ".imageloop" / "index.sqlite"
    with sqlite3.connect(store) as conn:
        (root_page,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (name,)).fetchone()
        (page_size,) = conn.execute("PRAGMA page_size").fetchone()
    conn.close()
    with store.open("r+b") as f:
        f.seek((root_page - 1) * page_size)
        f.write(np.random.default_rng(0).integers(0, 256, page_size, dtype=np.uint8).tobytes())


def test_page_level_damage_is_one_line_saying_to_reindex_and_index_info_gives_no_stale_count(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    indexed(folder, capsys)
    damage_page(folder, "records")  # the records' rows; the index b-trees that count them stay intact

    info = cli(capsys, "index-info", str(folder), "--json")
    query = cli(capsys, "query", str(folder), "a blue jay")

    for code, out, err in (info, query):
        assert code == 2 and out == ""  # no count, no results
        line = error_line(err)
        assert "is damaged" in line and f"delete {folder / '.imageloop'} and re-index" in line


def test_indexing_again_over_a_damaged_index_is_one_line_not_a_run_that_found_nothing_new(
    fakes: FakeBackends, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "photos")
    indexed(folder, capsys)
    damage_page(folder, "records_by_generation")  # a page no lookup of known images reads

    code, out, err = cli(capsys, "index", str(folder), "--json")

    assert code == 2 and out == "" and "is damaged" in error_line(err)


def test_an_unreadable_image_is_named_by_its_path_not_by_a_file_object(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")

    with pytest.raises(ImageDecodeError) as refused:
        open_image(bad)

    assert str(refused.value).startswith(f"{bad}: not a readable image") and "_io." not in str(refused.value)
