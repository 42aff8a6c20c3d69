"""The index of an image folder: `<folder>/.imageloop/`, whatever store holds its vectors.

The index lives inside the folder it describes, so the same path names both (`imageloop index
./my_images`, then `--index ./my_images`), and moving the folder moves its index along. The
`.imageloop/` folder is always local; `store.json` in it records which store holds the vectors:

- `embedded` (default): `.imageloop/index.sqlite`, exact search, no server.
- `chroma`: `.imageloop/chroma/`, one collection of a local Chroma database (`pip install
  imageloop[chroma]`), no server.
- `weaviate`: a collection on a Weaviate server, recorded by URL and collection name. The API key
  is never written to disk: it comes from the caller, `WEAVIATE_API_KEY` or
  `IMAGELOOP_WEAVIATE_API_KEY` each time the index is opened.

An index made before `store.json` existed is an `index.sqlite` alone, and reads as embedded.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol, TypedDict

from imageloop.config import STORE_KINDS, StoreKind
from imageloop.errors import ConfigError, EmbedderMismatchError, ImageloopError, IndexNotFoundError
from imageloop.files import write_json_atomic
from imageloop.protocols import Embedder, VectorStore
from imageloop.tools.stores.chroma_store import ChromaVectorStore
from imageloop.tools.stores.embedded import EmbeddedVectorStore
from imageloop.tools.stores.engines import AnnEngine

INDEX_DIRNAME = ".imageloop"
INDEX_FILENAME = "index.sqlite"
STORE_FILENAME = "store.json"
CHROMA_DIRNAME = "chroma"
API_KEY_VARIABLES = ("WEAVIATE_API_KEY", "IMAGELOOP_WEAVIATE_API_KEY")

Route = Literal["image", "caption"]


class IndexStore(VectorStore, Protocol):
    """A `VectorStore` that also keeps the index meta (what built the vectors) and can be closed."""

    def get_meta(self) -> dict[str, Any]: ...

    def ids(self) -> list[str]: ...

    def set_meta(self, values: Mapping[str, Any]) -> None: ...

    def close(self) -> None: ...


class StoreOptions(TypedDict, total=False):
    """The store choice for a new index, as `create_or_open_index` keywords (see there)."""

    store: StoreKind | None
    weaviate_url: str | None
    weaviate_api_key: str | None
    weaviate_collection: str | None
    weaviate_grpc_port: int | None
    request_timeout: float | None
    max_retries: int | None
    ann: AnnEngine | None
    threads: int | None


@dataclass(frozen=True)
class StoreLocation:
    """Where an index keeps its vectors, as recorded in `.imageloop/store.json` (no secrets)."""

    kind: StoreKind = "embedded"
    url: str | None = None
    collection: str | None = None
    grpc_port: int | None = None

    def describe(self) -> str:
        """One phrase for messages and `index-info`, such as `embedded store` or `Weaviate collection C at URL`."""
        if self.kind == "weaviate":
            return f"Weaviate collection {self.collection} at {self.url}"
        if self.kind == "chroma":
            return f"Chroma store in {INDEX_DIRNAME}/{CHROMA_DIRNAME}"
        return "embedded store"

    def to_json(self) -> dict[str, Any]:
        """The `store.json` content; None fields are left out."""
        fields = {"store": self.kind, "url": self.url, "collection": self.collection, "grpc_port": self.grpc_port}
        return {key: value for key, value in fields.items() if value is not None}

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: Path) -> StoreLocation:
        """Parse `store.json`; a file that does not say where the vectors are is a ConfigError."""
        kind = data.get("store")
        if kind == "embedded":
            return cls()
        if kind == "chroma":
            return cls("chroma")
        if kind == "weaviate" and isinstance(data.get("url"), str) and isinstance(data.get("collection"), str):
            port = data.get("grpc_port")
            return cls("weaviate", data["url"], data["collection"], int(port) if port is not None else None)
        raise ConfigError(
            f"{source} does not name a known store: expected embedded, chroma, or weaviate with url and collection"
        )


class ImageIndex:
    """An image folder's vectors plus what built them: embedder id, dimension and route."""

    def __init__(self, root: Path, store: IndexStore, location: StoreLocation | None = None) -> None:
        meta = store.get_meta()
        # The root comes from where the index sits, not from the recorded "root": a moved or
        # mounted-elsewhere folder keeps working.
        self.root = root
        self.store = store
        self.location = location or StoreLocation()
        self.embedder_id: str = meta["embedder_id"]
        self.dim: int = meta["dim"]
        # "image": vectors are image embeddings; "caption": text embeddings of the captions.
        self.route: Route = meta["route"]

    def count(self) -> int:
        """How many images the index holds."""
        return self.store.count()

    def search_engine(self) -> str | None:
        """How the embedded store searches now ("exact", "hnsw" or "quantized"); None for a server's store."""
        engine = getattr(self.store, "search_engine", None)
        return None if engine is None else str(engine())

    def require_embedder(self, model_id: str) -> None:
        """Refuse an embedder other than the one that built the index: its vectors live elsewhere."""
        if model_id != self.embedder_id:
            raise EmbedderMismatchError(
                f"index at {self.root} was built with {self.embedder_id}; the configured embedder is "
                f"{model_id}: pass `embedder` {self.embedder_id}, or delete {self.root / INDEX_DIRNAME} "
                f"and re-index with `embedder` {model_id}"
            )

    def check(self) -> None:
        """Verify the store's own files where the store can (the embedded store reads every page).

        `index-info` calls it, so a damaged index is reported as damaged rather than by a count that an
        intact part of it still gives.
        """
        check = getattr(self.store, "check", None)
        if check is not None:
            check()

    def close(self) -> None:
        """Release the store's connection."""
        self.store.close()


def _refuse_a_file_in_its_place(index_dir: Path) -> None:
    """`.imageloop` must be a folder (or absent): a file of that name is in the way, said in one line."""
    if index_dir.exists() and not index_dir.is_dir():
        raise ImageloopError(
            f"{index_dir} is a file, not an imageloop index folder: move or delete it, then index the folder"
        )


def open_index(
    path: Path,
    *,
    weaviate_api_key: str | None = None,
    request_timeout: float | None = None,
    max_retries: int | None = None,
) -> ImageIndex:
    """Open the index of an image folder (or of its `.imageloop` directory); never creates one.

    `request_timeout` and `max_retries` bound each call to a remote store (Weaviate).
    """
    given = Path(path)
    resolved = given.resolve()
    if resolved.name == INDEX_DIRNAME and resolved.is_dir():
        root, index_dir = resolved.parent, resolved
    else:
        root, index_dir = resolved, resolved / INDEX_DIRNAME
    _refuse_a_file_in_its_place(index_dir)
    missing = IndexNotFoundError(f"no imageloop index at {given}: index {root} first")
    location = _recorded_location(index_dir)
    if location is None:
        raise missing
    if location.kind == "embedded" and not (index_dir / INDEX_FILENAME).is_file():
        raise missing
    try:
        store = _open_store(
            index_dir, location, weaviate_api_key, create=False, patience=(request_timeout, max_retries)
        )
    except IndexNotFoundError:
        raise IndexNotFoundError(
            f"no imageloop index at {given}: {location.describe()} does not exist; index {root} again"
        ) from None
    # A store without meta is an index whose creation was interrupted before it held anything.
    if "embedder_id" not in store.get_meta():
        store.close()
        raise missing
    return ImageIndex(root, store, location)


def route_of(embedder: Embedder) -> Route:
    """How an index built with `embedder` finds images: by their pixels (an image embedder) or their captions."""
    return "image" if embedder.embeds_images else "caption"


def create_or_open_index(
    folder: Path,
    embedder: Embedder,
    *,
    store: StoreKind | None = None,
    weaviate_url: str | None = None,
    weaviate_api_key: str | None = None,
    weaviate_collection: str | None = None,
    weaviate_grpc_port: int | None = None,
    request_timeout: float | None = None,
    max_retries: int | None = None,
    ann: AnnEngine | None = None,
    threads: int | None = None,
) -> ImageIndex:
    """The index the indexer writes to: created for `embedder`, or reopened if `embedder` built it.

    `store` chooses where a new index keeps its vectors (default embedded); the `weaviate_*` options
    say how to reach Weaviate (the collection defaults to one named after the folder). An existing
    index keeps its recorded store: asking for another one is an error, not a silent move. `ann`
    (recorded) and `threads` choose how the embedded store builds its approximate search index.
    """
    root = Path(folder).resolve()
    if not root.is_dir():
        raise ImageloopError(f"{folder} is not a folder")
    if store is not None and store not in STORE_KINDS:
        raise ConfigError(f"unknown store {store!r}; known: {', '.join(STORE_KINDS)}")
    index_dir = root / INDEX_DIRNAME
    _refuse_a_file_in_its_place(index_dir)
    recorded = _recorded_location(index_dir)
    if recorded is None:
        location = _new_location(root, store, weaviate_url, weaviate_collection, weaviate_grpc_port)
    else:
        _refuse_another_store(recorded, root, store, weaviate_url, weaviate_collection)
        location = recorded
    if location.kind != "embedded" and (ann is not None or threads is not None):
        raise ConfigError(
            f"`ann` and `threads` choose the embedded store's search index; the {location.describe()} has its own"
        )
    vectors = _open_store(
        index_dir, location, weaviate_api_key, create=True, patience=(request_timeout, max_retries),
        ann=ann, threads=threads,
    )  # fmt: skip
    try:
        if "embedder_id" not in vectors.get_meta():
            meta = {"embedder_id": embedder.model_id, "dim": embedder.dim, "route": route_of(embedder)}
            vectors.set_meta({**meta, "root": str(root)})
        if not (index_dir / STORE_FILENAME).is_file():
            _write_location(index_dir, location)
        index = ImageIndex(root, vectors, location)
        index.require_embedder(embedder.model_id)
    except BaseException:
        vectors.close()
        raise
    return index


def _recorded_location(index_dir: Path) -> StoreLocation | None:
    """What `store.json` records; an `index.sqlite` without it is an older embedded index; else None."""
    record = index_dir / STORE_FILENAME
    if record.is_file():
        try:
            data = json.loads(record.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConfigError(f"{record} is unreadable ({e}): delete {index_dir} and re-index") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{record} is not a JSON object: delete {index_dir} and re-index")
        return StoreLocation.from_json(data, record)
    if (index_dir / INDEX_FILENAME).is_file():
        return StoreLocation()
    return None


def _new_location(
    root: Path, store: StoreKind | None, url: str | None, collection: str | None, grpc_port: int | None
) -> StoreLocation:
    if store == "chroma":
        return StoreLocation("chroma")
    if store != "weaviate":
        return StoreLocation()
    if not url:
        raise ConfigError("`store` weaviate needs a server: pass `weaviate_url` URL or set IMAGELOOP_WEAVIATE_URL")
    weaviate_store = _weaviate_store_module()
    name = weaviate_store.check_collection_name(collection) if collection else weaviate_store.collection_name_for(root)
    return StoreLocation("weaviate", url.rstrip("/"), name, grpc_port)


def _refuse_another_store(
    recorded: StoreLocation, root: Path, store: StoreKind | None, url: str | None, collection: str | None
) -> None:
    """An existing index stays where it is: a different explicit store, URL or collection is an error."""
    wanted_kind = store or recorded.kind
    differs = wanted_kind != recorded.kind or (
        recorded.kind == "weaviate"
        and (
            (url is not None and url.rstrip("/") != recorded.url) or (collection and collection != recorded.collection)
        )
    )
    if differs:
        raise ConfigError(
            f"index at {root} keeps its vectors in the {recorded.describe()}: to move it, delete "
            f"{root / INDEX_DIRNAME} and re-index"
        )


def _open_store(
    index_dir: Path,
    location: StoreLocation,
    api_key: str | None,
    *,
    create: bool,
    patience: tuple[float | None, int | None] = (None, None),
    ann: AnnEngine | None = None,
    threads: int | None = None,
) -> IndexStore:
    if location.kind == "embedded":
        return EmbeddedVectorStore(index_dir / INDEX_FILENAME, ann=ann, threads=threads)
    if location.kind == "chroma":
        return ChromaVectorStore(index_dir / CHROMA_DIRNAME, create=create)
    assert location.url is not None and location.collection is not None
    timeout, retries = patience
    waits: dict[str, Any] = {"timeout_s": timeout} if timeout is not None else {}
    if retries is not None:
        waits["attempts"] = retries + 1
    store: IndexStore = _weaviate_store_module().WeaviateVectorStore(
        location.url,
        location.collection,
        api_key=api_key or next((os.environ[name] for name in API_KEY_VARIABLES if os.environ.get(name)), None),
        grpc_port=location.grpc_port,
        create=create,
        **waits,
    )
    return store


def _weaviate_store_module() -> ModuleType:
    """`imageloop.tools.stores.weaviate_store`, imported on first use (weaviate-client is an optional extra)."""
    try:
        from imageloop.tools.stores import weaviate_store
    except ImportError as e:
        raise ConfigError(
            f"the Weaviate store needs the weaviate extra: pip install 'imageloop[weaviate]' ({e})"
        ) from e
    return weaviate_store


def _write_location(index_dir: Path, location: StoreLocation) -> None:
    """Write `store.json` atomically: a crash leaves the old file or the new one, never half of one."""
    write_json_atomic(index_dir / STORE_FILENAME, location.to_json())
