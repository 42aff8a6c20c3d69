"""ChromaVectorStore beyond the store contract: indexes on Chroma, no downloads, filters, the extra, processes.

`tests/test_store_contract.py` holds what every store must do; these tests cover what is Chroma's own.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from imageloop.cli import main
from imageloop.errors import ConfigError, ImageloopError, IndexNotFoundError
from imageloop.protocols import VectorRecord
from imageloop.tools.indexing.image_index import create_or_open_index, open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever
from imageloop.tools.stores.chroma_store import COLLECTION_NAME, LOCK_FILENAME, ChromaVectorStore
from imageloop.tools.stores.embedded import EmbeddedVectorStore
from tests.fake_providers import captioned_folder, fake_backends
from tests.fakes import FakeHashEmbedder

needs_chromadb = pytest.mark.skipif(
    importlib.util.find_spec("chromadb") is None, reason="the chroma extra is not installed"
)


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[ChromaVectorStore]:
    opened = ChromaVectorStore(tmp_path / "chroma")
    yield opened
    opened.close()


# Indexes on Chroma


@needs_chromadb
def test_an_index_on_chroma_lives_in_the_folder_and_reopens_for_retrieval(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False, store="chroma")

    assert json.loads((folder / ".imageloop" / "store.json").read_text()) == {"store": "chroma"}
    assert (folder / ".imageloop" / "chroma").is_dir()
    assert not (folder / ".imageloop" / "index.sqlite").exists()
    index = open_index(folder)
    try:
        hits = Retriever(index, FakeHashEmbedder()).search_many(["a blue jay", "a tabby cat"], k=1)
        assert (index.location.kind, index.count(), index.route) == ("chroma", 3, "caption")
        assert [hit.path for (hit,) in hits] == [folder.resolve() / "jay.png", folder.resolve() / "cat.png"]
    finally:
        index.close()


@needs_chromadb
def test_an_index_on_chroma_cannot_silently_change_store(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    create_or_open_index(folder, FakeHashEmbedder(), store="chroma").close()

    with pytest.raises(ConfigError, match=r"keeps its vectors in the Chroma store in \.imageloop/chroma: to move it"):
        create_or_open_index(folder, FakeHashEmbedder(), store="embedded")

    reopened = create_or_open_index(folder, FakeHashEmbedder())  # no store option: the recorded one
    assert reopened.location.kind == "chroma"
    reopened.close()


@needs_chromadb
def test_an_index_on_chroma_refuses_the_embedded_stores_search_options(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")

    with pytest.raises(ConfigError, match=r"`ann` and `threads` choose the embedded store's search index; the Chroma"):
        create_or_open_index(folder, FakeHashEmbedder(), store="chroma", ann="quantized")


@needs_chromadb
def test_an_index_whose_chroma_folder_was_removed_is_not_found_and_not_recreated(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False, store="chroma")
    shutil.rmtree(folder / ".imageloop" / "chroma")

    with pytest.raises(IndexNotFoundError, match=r"Chroma store in \.imageloop/chroma does not exist; index .* again"):
        open_index(folder)

    assert not (folder / ".imageloop" / "chroma").exists()


@needs_chromadb
def test_imageloop_store_chroma_in_the_environment_makes_the_cli_index_into_chroma(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "images")
    monkeypatch.setenv("IMAGELOOP_STORE", "chroma")
    with fake_backends(monkeypatch):
        assert main(["index", str(folder), "--embedder", "fake:hash", "--json"]) == 0
        monkeypatch.delenv("IMAGELOOP_STORE")  # the index keeps its store
        capsys.readouterr()
        assert main(["index-info", str(folder), "--json"]) == 0

    assert {key: value for key, value in json.loads(capsys.readouterr().out).items() if key in ("count", "store")} == {
        "count": 3,
        "store": "chroma",
    }


# Nothing downloaded, no embedding function


@needs_chromadb
def test_chroma_never_constructs_its_default_embedding_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from chromadb.api.types import DefaultEmbeddingFunction
    from chromadb.utils.embedding_functions.onnx_mini_lm_l6_v2 import ONNXMiniLM_L6_V2

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("Chroma tried to load (and download) its default ONNX embedding model")

    monkeypatch.setattr(ONNXMiniLM_L6_V2, "__init__", refuse)
    monkeypatch.setattr(DefaultEmbeddingFunction, "__call__", refuse)
    folder = captioned_folder(tmp_path / "images")

    index_folder(folder, FakeHashEmbedder(), None, progress=False, store="chroma")
    index = open_index(folder)
    try:
        assert Retriever(index, FakeHashEmbedder()).search("a blue jay", k=3)
    finally:
        index.close()


@needs_chromadb
def test_the_collection_records_no_embedding_function(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    ChromaVectorStore(tmp_path / "chroma").close()

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    try:
        configuration = client.get_collection(COLLECTION_NAME, embedding_function=None).configuration_json
    finally:
        client.close()
    # A collection made with Chroma's default would record {"type": "known", "name": "default", ...}.
    assert "name" not in configuration["embedding_function"]
    assert configuration["hnsw"]["space"] == "cosine"


# The extra


def test_without_the_chroma_extra_the_store_is_a_config_error_naming_the_pip_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "chromadb", None)  # `import chromadb` now raises ImportError
    folder = captioned_folder(tmp_path / "images")

    with pytest.raises(
        ConfigError, match=r"the Chroma store needs the chroma extra: pip install 'imageloop\[chroma\]'"
    ):
        create_or_open_index(folder, FakeHashEmbedder(), store="chroma")

    assert not (folder / ".imageloop" / "store.json").exists()


# The store itself


@needs_chromadb
@pytest.mark.parametrize(
    "where",
    [
        {"tags": "bird"},
        {"tags": ["car", "red"]},
        {"tags": 1.0},
        {"tags": True},
        {"tags": "1"},
        {"tags": None},
        {"tags": "nested"},
        {"n": 2},
        {"n": [2.0, "x"], "tags": "bird"},
    ],
    ids=repr,
)
def test_list_values_and_value_types_filter_as_in_the_embedded_store(
    tmp_path: Path, store: ChromaVectorStore, where: dict[str, Any]
) -> None:
    records = [
        VectorRecord("red-bird", unit(1, 0), {"tags": ["red", "bird"], "n": 2}),
        VectorRecord("mixed", unit(1, 0.1), {"tags": [1, "1", True], "n": 2.0}),
        VectorRecord("null", unit(1, 0.2), {"tags": [None, {"nested": 1}], "n": "2"}),
        VectorRecord("object", unit(1, 0.3), {"tags": {"nested": "bird"}, "n": [2, 3]}),
        VectorRecord("empty", unit(1, 0.4), {"tags": [], "n": []}),
    ]
    embedded = EmbeddedVectorStore(tmp_path / "embedded.sqlite")
    embedded.upsert(records)
    store.upsert(records)

    expected = [hit.id for hit in embedded.search(unit(1, 0), k=10, where=where)]
    embedded.close()

    assert [hit.id for hit in store.search(unit(1, 0), k=10, where=where)] == expected


@needs_chromadb
def test_search_many_answers_each_query_as_search_does(store: ChromaVectorStore) -> None:
    store.upsert(
        [VectorRecord(name, unit(*vector), {"folder": name}) for name, vector in {"x": (1, 0), "y": (0, 1)}.items()]
    )
    queries = [unit(1, 0.2), unit(0.2, 1)]

    assert store.search_many(queries, k=2) == [store.search(query, k=2) for query in queries]
    assert store.search_many(np.stack(queries), k=2, where={"folder": "y"}) == [
        store.search(query, k=2, where={"folder": "y"}) for query in queries
    ]


@needs_chromadb
def test_opening_without_create_does_not_create_a_missing_store(tmp_path: Path) -> None:
    with pytest.raises(IndexNotFoundError, match="no Chroma store at"):
        ChromaVectorStore(tmp_path / "chroma", create=False)

    assert not (tmp_path / "chroma").exists()


@needs_chromadb
def test_a_collection_that_imageloop_did_not_create_is_refused(tmp_path: Path) -> None:
    import chromadb
    from chromadb.config import Settings

    client = chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=Settings(anonymized_telemetry=False))
    client.create_collection(COLLECTION_NAME, configuration={"hnsw": {"space": "l2"}}, embedding_function=None)
    client.close()

    with pytest.raises(ConfigError, match=r"was not created by imageloop \(it needs cosine distance\)"):
        ChromaVectorStore(tmp_path / "chroma")


# Processes take turns: Chroma's local client does not see another process's writes


@pytest.fixture
def another_process_lock(tmp_path: Path) -> Iterator[Any]:
    """The store folder's lock file opened separately: flock treats it as another process's."""
    ChromaVectorStore(tmp_path / "chroma").close()
    with (tmp_path / "chroma" / LOCK_FILENAME).open("a") as other:
        yield other


@needs_chromadb
def test_a_folder_another_process_has_open_can_be_read_but_not_written(
    tmp_path: Path, another_process_lock: Any
) -> None:
    fcntl.flock(another_process_lock.fileno(), fcntl.LOCK_SH)
    store = ChromaVectorStore(tmp_path / "chroma")
    try:
        assert store.search(unit(1, 0), k=1) == []
        with pytest.raises(ImageloopError, match="is open in another process"):
            store.upsert([VectorRecord("a", unit(1, 0), {})])
        fcntl.flock(another_process_lock.fileno(), fcntl.LOCK_UN)

        store.upsert([VectorRecord("a", unit(1, 0), {})])  # once the other one is gone
        assert store.count() == 1
    finally:
        store.close()


@needs_chromadb
def test_a_folder_another_process_writes_cannot_be_opened(tmp_path: Path, another_process_lock: Any) -> None:
    fcntl.flock(another_process_lock.fileno(), fcntl.LOCK_EX)

    with pytest.raises(ImageloopError, match="is being written by another process"):
        ChromaVectorStore(tmp_path / "chroma")


@needs_chromadb
def test_another_process_cannot_open_the_folder_while_this_one_writes(tmp_path: Path) -> None:
    store = ChromaVectorStore(tmp_path / "chroma")
    store.upsert([VectorRecord("a", unit(1, 0), {})])
    reader = (
        "import sys; from pathlib import Path; from imageloop.tools.stores.chroma_store import ChromaVectorStore; "
        "ChromaVectorStore(Path(sys.argv[1]))"
    )
    try:
        refused = subprocess.run(
            [sys.executable, "-c", reader, str(tmp_path / "chroma")], capture_output=True, text=True, timeout=120
        )
    finally:
        store.close()

    assert refused.returncode != 0
    assert "is being written by another process" in refused.stderr
