"""WeaviateVectorStore beyond the store contract: connection, faults, auth, naming, and indexes on Weaviate.

The server is FakeWeaviateServer (REST + gRPC on 127.0.0.1) spoken to by the real weaviate-client;
`tests/test_store_contract.py` holds what every store must do.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("weaviate", reason="the weaviate extra is not installed")

import weaviate

from imageloop.cli import main
from imageloop.errors import BackendError, ConfigError, ImageloopError, IndexNotFoundError
from imageloop.protocols import VectorRecord
from imageloop.tools.indexing.image_index import create_or_open_index, open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever
from imageloop.tools.stores import weaviate_store
from imageloop.tools.stores.weaviate_store import (
    WeaviateVectorStore,
    collection_name_for,
    metadata_property,
    record_uuid,
)
from tests.fake_providers import captioned_folder, fake_backends
from tests.fake_weaviate_server import FakeWeaviateServer
from tests.fakes import FakeHashEmbedder

WEAVIATE_VARIABLES = (
    "WEAVIATE_API_KEY",
    "IMAGELOOP_WEAVIATE_API_KEY",
    "IMAGELOOP_WEAVIATE_URL",
    "IMAGELOOP_WEAVIATE_GRPC_PORT",
    "IMAGELOOP_STORE",
)


def unit(*values: float) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeWeaviateServer]:
    for name in WEAVIATE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with FakeWeaviateServer() as fake:
        yield fake
    assert fake.unhandled == [], "the client called REST endpoints the fake does not implement"


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The store's backoff sleeps, recorded instead of slept (the client's own sleeps are left alone)."""
    recorded: list[float] = []
    monkeypatch.setattr(weaviate_store, "_pause", recorded.append)
    return recorded


def open_store(server: FakeWeaviateServer, collection: str = "Photos", **options: Any) -> WeaviateVectorStore:
    return WeaviateVectorStore(server.url, collection, grpc_port=server.grpc_port, **options)


def free_port() -> int:
    """A local port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Faults: retries with backoff, then one clear line


def test_an_unreachable_url_is_retried_with_backoff_then_a_backend_error_naming_it(sleeps: list[float]) -> None:
    url = f"http://127.0.0.1:{free_port()}"

    with pytest.raises(BackendError) as caught:
        WeaviateVectorStore(url, "Photos", attempts=3, backoff_s=0.5)

    assert sleeps == [0.5, 1.0]
    message = str(caught.value)
    assert message.startswith(f"cannot reach Weaviate at {url} (3 attempts)")
    assert "\n" not in message


def test_an_unreachable_grpc_port_is_named_in_the_error(server: FakeWeaviateServer, sleeps: list[float]) -> None:
    port = free_port()

    with pytest.raises(BackendError, match=rf"gRPC port at 127\.0\.0\.1:{port} for {server.url}"):
        WeaviateVectorStore(server.url, "Photos", grpc_port=port, attempts=2)

    assert sleeps == [0.5]


def test_a_failing_server_is_retried_and_the_call_succeeds_when_it_recovers(
    server: FakeWeaviateServer, sleeps: list[float]
) -> None:
    store = open_store(server, attempts=3, backoff_s=0.1)
    store.upsert([VectorRecord("a", unit(1, 0), {})])

    server.fail_next(2)  # gRPC INTERNAL twice, then the count answers

    assert store.count() == 1
    assert sleeps == [0.1, 0.2]
    store.close()


def test_a_server_returning_500_becomes_one_line_naming_the_url_and_the_operation(
    server: FakeWeaviateServer, sleeps: list[float]
) -> None:
    store = open_store(server, attempts=3)
    server.fail_next(100)

    with pytest.raises(BackendError) as caught:
        store.get_meta()

    message = str(caught.value)
    assert message.startswith(f"Weaviate at {server.url} failed to read the index meta (3 attempts): ")
    assert "500" in message and "\n" not in message
    assert len(sleeps) == 2
    store.close()


def test_a_grpc_error_on_search_becomes_a_backend_error(server: FakeWeaviateServer, sleeps: list[float]) -> None:
    store = open_store(server, attempts=2)
    store.upsert([VectorRecord("a", unit(1, 0), {})])
    server.fail_next(100)

    with pytest.raises(BackendError, match=rf"Weaviate at {server.url} failed to search \(2 attempts\): .*injected"):
        store.search(unit(1, 0), k=1)
    store.close()


def test_a_server_that_refuses_a_record_is_a_backend_error_not_a_silent_loss(server: FakeWeaviateServer) -> None:
    store = open_store(server)
    store.upsert([VectorRecord("a", unit(1, 0), {"folder": "x"})])
    server.classes["Photos"].schema["properties"] = [
        prop for prop in server.classes["Photos"].schema["properties"] if prop["name"] != "m_folder"
    ]

    with pytest.raises(BackendError, match=r"refused 1 of 2 records: no such prop with name 'm_folder'"):
        store.upsert([VectorRecord("b", unit(1, 0), {}), VectorRecord("c", unit(0, 1), {"folder": "y"})])
    store.close()


# Authentication


def test_the_api_key_is_sent_as_a_bearer_token_on_rest_and_grpc(monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeWeaviateServer(api_key="secret-key") as server:
        store = open_store(server, api_key="secret-key")
        store.upsert([VectorRecord("a", unit(1, 0), {"folder": "x"})])
        assert [hit.id for hit in store.search(unit(1, 0), k=1, where={"folder": "x"})] == ["a"]
        store.close()

    assert {request.split()[0] for request in server.requests} >= {"GET", "POST", "grpc"}
    # The gRPC health check is the one call the client makes without credentials, as servers expect.
    sent = zip(server.requests, server.authorizations, strict=True)
    assert {authorization for request, authorization in sent if request != "grpc Health/Check"} == {"Bearer secret-key"}


def test_a_wrong_api_key_is_refused_at_once_with_a_hint(sleeps: list[float]) -> None:
    with FakeWeaviateServer(api_key="secret-key") as server, pytest.raises(BackendError) as caught:
        open_store(server, api_key="wrong", attempts=3)

    assert "HTTP 401" in str(caught.value) and "WEAVIATE_API_KEY" in str(caught.value)
    assert sleeps == []


def test_weaviate_cloud_urls_connect_through_the_cloud_helper_with_the_key(
    monkeypatch: pytest.MonkeyPatch, sleeps: list[float]
) -> None:
    calls: list[dict[str, Any]] = []

    def connect_to_weaviate_cloud(**kwargs: Any) -> None:
        calls.append(kwargs)
        raise weaviate.exceptions.WeaviateStartUpError("offline test")

    monkeypatch.setattr(weaviate, "connect_to_weaviate_cloud", connect_to_weaviate_cloud)

    with pytest.raises(BackendError, match=r"cannot reach Weaviate at https://abc\.weaviate\.cloud"):
        WeaviateVectorStore("https://abc.weaviate.cloud", "Photos", api_key="cloud-key", attempts=1)

    (call,) = calls
    assert call["cluster_url"] == "https://abc.weaviate.cloud"
    assert call["auth_credentials"].api_key == "cloud-key"


def test_weaviate_cloud_without_an_api_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs an API key"):
        WeaviateVectorStore("https://abc.weaviate.cloud", "Photos")


# Collections and objects


def test_a_new_collection_has_self_provided_cosine_hnsw_vectors(server: FakeWeaviateServer) -> None:
    open_store(server).close()

    schema = server.classes["Photos"].schema
    assert schema["vectorConfig"]["default"]["vectorizer"] == {"none": {}}
    assert schema["vectorConfig"]["default"]["vectorIndexType"] == "hnsw"
    assert schema["vectorConfig"]["default"]["vectorIndexConfig"]["distance"] == "cosine"


def test_metadata_keys_become_exact_match_filterable_properties(server: FakeWeaviateServer) -> None:
    store = open_store(server)
    store.upsert([VectorRecord("a", unit(1, 0), {"folder": "birds", "Camera Model": "Z9"})])
    store.close()

    properties = {prop["name"]: prop for prop in server.classes["Photos"].schema["properties"]}
    for key in ("folder", "Camera Model"):
        prop = properties[metadata_property(key)]
        assert (prop["tokenization"], prop["indexFilterable"], prop["indexSearchable"]) == ("field", True, False)
    assert metadata_property("folder") == "m_folder"
    assert metadata_property("Camera Model").startswith("mh_")


def test_record_uuids_are_derived_from_record_ids(server: FakeWeaviateServer) -> None:
    store = open_store(server)
    store.upsert([VectorRecord("birds/a.png", unit(1, 0), {})])
    store.close()

    assert list(server.classes["Photos"].objects) == [record_uuid("birds/a.png")]
    assert record_uuid("birds/a.png") == record_uuid("birds/a.png") != record_uuid("birds/b.png")


def test_the_index_meta_lives_in_the_collection_description(server: FakeWeaviateServer) -> None:
    store = open_store(server)
    store.set_meta({"embedder_id": "fake:hash", "route": "caption"})
    store.close()

    assert json.loads(server.classes["Photos"].schema["description"]) == {
        "embedder_id": "fake:hash",
        "route": "caption",
    }


def test_opening_without_create_does_not_create_a_missing_collection(server: FakeWeaviateServer) -> None:
    with pytest.raises(IndexNotFoundError, match=rf"no collection Photos at {server.url}"):
        open_store(server, create=False)

    assert server.classes == {}


def test_a_collection_that_imageloop_did_not_create_is_refused(server: FakeWeaviateServer) -> None:
    client = weaviate.connect_to_local(port=server.http_port, grpc_port=server.grpc_port, skip_init_checks=True)
    try:
        client.collections.create("Articles", vector_config=weaviate.classes.config.Configure.Vectors.self_provided())
    finally:
        client.close()

    with pytest.raises(ConfigError, match=r"collection Articles at .* was not created by imageloop"):
        open_store(server, "Articles")


def test_collection_names_are_valid_readable_and_distinct_per_folder(tmp_path: Path) -> None:
    one = collection_name_for(tmp_path / "my photos")
    other = collection_name_for(tmp_path / "elsewhere" / "my photos")

    assert one.startswith("Imageloop_my_photos_") and other.startswith("Imageloop_my_photos_")
    assert one != other
    assert one == collection_name_for(tmp_path / "my photos")


@pytest.mark.parametrize("name", ["photos", "My-Photos", "", "Ünïcode"])
def test_an_invalid_collection_name_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match="invalid Weaviate collection name"):
        WeaviateVectorStore("http://127.0.0.1:1", name)


@pytest.mark.parametrize("url", ["localhost:8080", "ftp://weaviate.example", "http://weaviate.example:8080/v1"])
def test_a_url_that_is_not_http_host_and_port_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match="invalid Weaviate URL"):
        WeaviateVectorStore(url, "Photos")


def test_a_batch_mixing_dimensions_is_refused_before_anything_is_written(server: FakeWeaviateServer) -> None:
    store = open_store(server)

    with pytest.raises(ImageloopError, match=r"dimension 2 but the batch also holds dimension 3"):
        store.upsert([VectorRecord("a", unit(1, 0), {}), VectorRecord("b", unit(1, 0, 0), {})])

    assert store.count() == 0 and "dim" not in store.get_meta()
    store.close()


def test_steady_state_writes_and_searches_are_single_grpc_calls(server: FakeWeaviateServer) -> None:
    store = open_store(server)
    store.upsert([VectorRecord("a", unit(1, 0), {"folder": "x"})])
    before = len(server.requests)

    store.upsert([VectorRecord("b", unit(0, 1), {"folder": "y"})])
    store.search(unit(1, 0), k=2, where={"folder": "y"})

    assert server.requests[before:] == ["grpc BatchObjects", "grpc Search"]
    store.close()


# Indexes on Weaviate


def weaviate_options(server: FakeWeaviateServer, **extra: Any) -> dict[str, Any]:
    return {"store": "weaviate", "weaviate_url": server.url, "weaviate_grpc_port": server.grpc_port, **extra}


def test_an_index_on_weaviate_records_where_its_vectors_are_but_never_the_key(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    with FakeWeaviateServer(api_key="secret-key") as server:
        index_folder(
            folder, FakeHashEmbedder(), None, progress=False, **weaviate_options(server, weaviate_api_key="secret-key")
        )

        record = json.loads((folder / ".imageloop" / "store.json").read_text())
        assert record == {
            "store": "weaviate",
            "url": server.url,
            "collection": collection_name_for(folder),
            "grpc_port": server.grpc_port,
        }
        assert not (folder / ".imageloop" / "index.sqlite").exists()
        assert all(b"secret-key" not in path.read_bytes() for path in (folder / ".imageloop").iterdir())
        assert server.classes[collection_name_for(folder)].objects


def test_an_index_on_weaviate_reopens_from_its_folder_with_the_key_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = captioned_folder(tmp_path / "images")
    with FakeWeaviateServer(api_key="secret-key") as server:
        options = weaviate_options(server, weaviate_api_key="secret-key")
        index_folder(folder, FakeHashEmbedder(), None, progress=False, **options)
        monkeypatch.setenv("WEAVIATE_API_KEY", "secret-key")

        index = open_index(folder)
        try:
            (hit,) = Retriever(index, FakeHashEmbedder()).search("a blue jay", k=1)
            assert (index.location.kind, index.count(), hit.path) == ("weaviate", 3, folder.resolve() / "jay.png")
        finally:
            index.close()


def test_an_index_cannot_silently_change_store(tmp_path: Path, server: FakeWeaviateServer) -> None:
    folder = captioned_folder(tmp_path / "images")
    create_or_open_index(folder, FakeHashEmbedder()).close()

    with pytest.raises(ConfigError, match=r"keeps its vectors in the embedded store: to move it, delete"):
        create_or_open_index(folder, FakeHashEmbedder(), **weaviate_options(server))

    assert server.classes == {}


def test_an_index_on_weaviate_cannot_silently_change_collection(tmp_path: Path, server: FakeWeaviateServer) -> None:
    folder = captioned_folder(tmp_path / "images")
    create_or_open_index(folder, FakeHashEmbedder(), **weaviate_options(server)).close()

    with pytest.raises(
        ConfigError, match=rf"keeps its vectors in the Weaviate collection {collection_name_for(folder)}"
    ):
        create_or_open_index(folder, FakeHashEmbedder(), **weaviate_options(server, weaviate_collection="Other"))

    reopened = create_or_open_index(folder, FakeHashEmbedder())  # no store option: the recorded one
    assert reopened.location.collection == collection_name_for(folder)
    reopened.close()


def test_the_weaviate_store_needs_a_url(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")

    with pytest.raises(ConfigError, match="`store` weaviate needs a server: pass `weaviate_url`"):
        create_or_open_index(folder, FakeHashEmbedder(), store="weaviate")

    assert not (folder / ".imageloop").exists()


def test_an_index_whose_collection_was_dropped_is_not_found(tmp_path: Path, server: FakeWeaviateServer) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False, **weaviate_options(server))
    server.classes.clear()

    with pytest.raises(IndexNotFoundError, match=r"Weaviate collection Imageloop_images_\w+ at .* does not exist"):
        open_index(folder)

    assert server.classes == {}


def test_an_embedded_index_records_its_store_and_an_older_one_without_the_record_still_opens(tmp_path: Path) -> None:
    folder = captioned_folder(tmp_path / "images")
    index_folder(folder, FakeHashEmbedder(), None, progress=False)
    assert json.loads((folder / ".imageloop" / "store.json").read_text()) == {"store": "embedded"}

    (folder / ".imageloop" / "store.json").unlink()

    index = open_index(folder)
    assert (index.location.kind, index.count()) == ("embedded", 3)
    index.close()


def test_the_cli_indexes_into_weaviate(
    tmp_path: Path, server: FakeWeaviateServer, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = captioned_folder(tmp_path / "images")
    monkeypatch.setenv("IMAGELOOP_WEAVIATE_GRPC_PORT", str(server.grpc_port))
    with fake_backends(monkeypatch):
        code = main(
            [
                "index",
                str(folder),
                "--embedder",
                "fake:hash",
                "--store",
                "weaviate",
                "--weaviate-url",
                server.url,
                "--json",
            ]
        )

    assert code == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["indexed"] == 3
    assert len(server.classes[collection_name_for(folder)].objects) == 3


def test_the_cli_reports_an_unreachable_weaviate_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], sleeps: list[float]
) -> None:
    folder = captioned_folder(tmp_path / "images")
    url = f"http://127.0.0.1:{free_port()}"
    with fake_backends(monkeypatch):
        code = main([
            "index", str(folder), "--embedder", "fake:hash", "--store", "weaviate", "--weaviate-url", url,
            "--max-retries", "2",
        ])  # fmt: skip

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"imageloop: error: cannot reach Weaviate at {url} (3 attempts)")  # --max-retries 2
    assert len(err.strip().splitlines()) == 1
