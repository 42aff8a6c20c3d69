"""The on-disk index of an image folder: `<folder>/.imageloop/index.sqlite`.

The index lives inside the folder it describes, so the same path names both (`imageloop index
./my_images`, then `--index ./my_images`), and moving the folder moves its index along.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from imageloop.errors import EmbedderMismatchError, ImageloopError, IndexNotFoundError
from imageloop.protocols import Embedder
from imageloop.tools.embedded_store import EmbeddedVectorStore

INDEX_DIRNAME = ".imageloop"
INDEX_FILENAME = "index.sqlite"

Route = Literal["image", "caption"]


class ImageIndex:
    """An image folder's vectors plus what built them: embedder id, dimension and route."""

    def __init__(self, root: Path, store: EmbeddedVectorStore) -> None:
        meta = store.get_meta()
        # The root comes from where the index sits, not from the recorded "root": a moved or
        # mounted-elsewhere folder keeps working.
        self.root = root
        self.store = store
        self.embedder_id: str = meta["embedder_id"]
        self.dim: int = meta["dim"]
        # "image": vectors are image embeddings; "caption": text embeddings of the captions.
        self.route: Route = meta["route"]

    def count(self) -> int:
        """How many images the index holds."""
        return self.store.count()

    def require_embedder(self, model_id: str) -> None:
        """Refuse an embedder other than the one that built the index: its vectors live elsewhere."""
        if model_id != self.embedder_id:
            raise EmbedderMismatchError(
                f"index at {self.root} was built with {self.embedder_id}; the configured embedder is "
                f"{model_id}: pass --embedder {self.embedder_id}, or delete {self.root / INDEX_DIRNAME} "
                f"and re-index with --embedder {model_id}"
            )

    def close(self) -> None:
        """Release the index's database connection."""
        self.store.close()


def open_index(path: Path) -> ImageIndex:
    """Open the index of an image folder (or of its `.imageloop` directory); never creates one."""
    given = Path(path)
    resolved = given.resolve()
    if resolved.name == INDEX_DIRNAME:
        root, index_dir = resolved.parent, resolved
    else:
        root, index_dir = resolved, resolved / INDEX_DIRNAME
    missing = IndexNotFoundError(f"no imageloop index at {given}: run `imageloop index {root}` first")
    if not (index_dir / INDEX_FILENAME).is_file():
        raise missing
    store = EmbeddedVectorStore(index_dir / INDEX_FILENAME)
    # A file without meta is an index whose creation was interrupted before it held anything.
    if "embedder_id" not in store.get_meta():
        store.close()
        raise missing
    return ImageIndex(root, store)


def create_or_open_index(folder: Path, embedder: Embedder) -> ImageIndex:
    """The index the indexer writes to: created for `embedder`, or reopened if `embedder` built it."""
    root = Path(folder).resolve()
    if not root.is_dir():
        raise ImageloopError(f"{folder} is not a folder")
    store = EmbeddedVectorStore(root / INDEX_DIRNAME / INDEX_FILENAME)
    if "embedder_id" not in store.get_meta():
        route: Route = "image" if embedder.embeds_images else "caption"
        store.set_meta({"embedder_id": embedder.model_id, "dim": embedder.dim, "route": route, "root": str(root)})
    index = ImageIndex(root, store)
    try:
        index.require_embedder(embedder.model_id)
    except EmbedderMismatchError:
        index.close()
        raise
    return index
