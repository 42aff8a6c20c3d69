"""Retrieval over an image folder's index: the step ImageRAG, RAGE and GenIR call `retrieve`.

Three kinds of query, each answered best first with a cosine similarity per hit:

- text→image (`search`, `search_many`) on an **image-route** index: the text is embedded in the
  embedder's text tower and compared with the images' pixel embeddings (CLIP-like embedders);
- the **caption route** (`search`, `search_many` on a caption-route index): the same call, compared
  with the text embeddings of the images' captions, because queries and captions share one space;
- image→image (`search_image`) on an image-route index, with an embedder that embeds images.

`similarity_threshold` drops hits below that cosine after the top-k cut, so a query may return
fewer than `k` images; `where` filters on stored metadata, e.g. `{"folder": "birds"}`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageloop.errors import ImageloopError
from imageloop.protocols import Embedder, RetrievedImage, SearchHit, Vector
from imageloop.tools.images import open_image, reduce_image
from imageloop.tools.indexing.image_index import ImageIndex, Route
from imageloop.tools.indexing.indexer import prepared_side
from imageloop.tools.indexing.sources import tar_address

Where = Mapping[str, Any]


class Retriever:
    """An `ImageRetriever` (and GenIR's image-query retriever) over an index, with the embedder that built it."""

    def __init__(self, index: ImageIndex, embedder: Embedder) -> None:
        # Refused up front: vectors from another model are a different space, and an empty index
        # would make every later retrieval silently return nothing.
        index.require_embedder(embedder.model_id)
        if index.count() == 0:
            raise ImageloopError(f"index at {index.root} is empty: add images and index the folder again")
        self.index = index
        self.embedder = embedder
        self._real_root = index.root.resolve()

    @property
    def route(self) -> Route:
        """What the index's vectors embed: "image" (pixels) or "caption" (text of the captions)."""
        return self.index.route

    def search(
        self, text: str, k: int, similarity_threshold: float | None = None, where: Where | None = None
    ) -> list[RetrievedImage]:
        """The top-`k` images for `text`, best first, without hits below `similarity_threshold`."""
        return self.search_many([text], k, similarity_threshold, where)[0]

    def search_many(
        self, texts: Sequence[str], k: int, similarity_threshold: float | None = None, where: Where | None = None
    ) -> list[list[RetrievedImage]]:
        """`search` for each text, embedding all texts in one batch (one model call per fan-out)."""
        if not texts:
            return []
        return self._search_vectors(self.embedder.embed_texts(list(texts)), k, similarity_threshold, where)

    def search_image(
        self,
        image: Image.Image | Path,
        k: int,
        similarity_threshold: float | None = None,
        where: Where | None = None,
    ) -> list[RetrievedImage]:
        """The top-`k` indexed images most like `image` (a picture or a file), best first."""
        if self.index.route != "image":
            raise ImageloopError(
                f"index at {self.index.root} is on the caption route (it holds text embeddings of captions, "
                f"built with {self.index.embedder_id}): image queries need an image-route index built with an "
                "embedder that embeds images; query it with text instead"
            )
        if not self.embedder.embeds_images:
            raise ImageloopError(f"embedder {self.embedder.model_id} does not embed images: image queries need one")
        # Reduced as the indexer reduced the indexed pictures, so the same file embeds the same way.
        side = prepared_side(self.embedder)
        picture = (
            open_image(image, shortest_side=side)
            if isinstance(image, Path)
            else reduce_image(image.convert("RGB"), side)
        )
        return self._search_vectors(self.embedder.embed_images([picture]), k, similarity_threshold, where)[0]

    def search_vector(
        self, vector: Vector, k: int, similarity_threshold: float | None = None, where: Where | None = None
    ) -> list[RetrievedImage]:
        """The top-`k` images for a query vector already in the index's space (a composed or fused query)."""
        return self._search_vectors(
            np.asarray(vector, dtype=np.float32).reshape(1, -1), k, similarity_threshold, where
        )[0]

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, Vector]:
        """The indexed vectors of those `ids` the index holds (an image's id is the sha256 of its file)."""
        return {record.id: record.vector for record in self.index.store.get(list(ids))}

    def _search_vectors(
        self, vectors: Vector, k: int, similarity_threshold: float | None, where: Where | None
    ) -> list[list[RetrievedImage]]:
        """Top-`k` hits per query vector, with the store's batched search when it has one."""
        if k <= 0:
            raise ImageloopError(f"k must be a positive number of results, got {k}")
        if vectors.ndim != 2 or vectors.shape[1] != self.index.dim:
            got = vectors.shape[-1] if vectors.ndim else "scalar"
            raise ImageloopError(
                f"dimension mismatch: embedder {self.embedder.model_id} gives {got}-d vectors but the index at "
                f"{self.index.root} holds {self.index.dim}-d vectors; re-index with this embedder or configure "
                f"the one that built it ({self.index.embedder_id})"
            )
        store = self.index.store
        batched = getattr(store, "search_many", None)
        depth = k
        while True:
            hit_lists: list[list[SearchHit]]
            if batched is not None:
                hit_lists = batched(vectors, depth, where)
            else:
                hit_lists = [store.search(vector, depth, where) for vector in vectors]
            found = [self._usable(hits, k, similarity_threshold) for hits in hit_lists]
            # A hit whose file is gone leaves a gap the next hit fills: search deeper while a query is short of
            # k and its store may hold more above the threshold.
            if not any(
                len(usable) < k and len(hits) == depth and _above(hits[-1], similarity_threshold)
                for usable, hits in zip(found, hit_lists, strict=True)
            ):
                return found
            depth *= 2

    def _usable(self, hits: list[SearchHit], k: int, similarity_threshold: float | None) -> list[RetrievedImage]:
        """The first `k` hits above the threshold whose files are still there, best first."""
        usable: list[RetrievedImage] = []
        for hit in hits:
            if not _above(hit, similarity_threshold):
                continue
            image = self._retrieved(hit)
            if image is not None:
                usable.append(image)
            if len(usable) == k:
                break
        return usable

    def _retrieved(self, hit: SearchHit) -> RetrievedImage | None:
        """The hit as a result, or None when its file now resolves outside the index's folder or is gone.

        The indexer never indexes a symlink that leaves the folder; a file (or folder) replaced by one
        afterwards is dropped here, so no caller (a confined server among them) is handed a file from elsewhere.
        A file deleted since indexing, or replaced by something that is no regular file (a FIFO would block
        whoever opens it), is dropped too: the next `imageloop index` prunes it. An image inside a shard
        (`shard.tar#key.jpg`) is checked by its tar file.
        """
        path = self.index.root / hit.metadata["path"]
        address = tar_address(path)
        try:
            real = (address[0] if address is not None else path).resolve(strict=True)
        except (OSError, RuntimeError):
            return None
        if not real.is_relative_to(self._real_root) or not real.is_file():
            return None
        return RetrievedImage(id=hit.id, path=path, caption=hit.metadata.get("caption", ""), score=hit.score)


def _above(hit: SearchHit, similarity_threshold: float | None) -> bool:
    return similarity_threshold is None or hit.score >= similarity_threshold


class FilteredRetriever:
    """A retriever whose every search keeps only images whose metadata matches `where` (e.g. one folder)."""

    def __init__(self, retriever: Retriever, where: Where) -> None:
        self.retriever = retriever
        self.where = where
        self.index = retriever.index

    @property
    def route(self) -> Route:
        """The index's route (see `Retriever.route`)."""
        return self.retriever.route

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        """`Retriever.search` within the filter."""
        return self.retriever.search(text, k, similarity_threshold, self.where)

    def search_image(
        self, image: Image.Image | Path, k: int, similarity_threshold: float | None = None
    ) -> list[RetrievedImage]:
        """`Retriever.search_image` within the filter."""
        return self.retriever.search_image(image, k, similarity_threshold, self.where)


# RetrievedImage is defined next to the ImageRetriever protocol that graphs depend on; it is
# re-exported because it is what this module returns.
__all__ = ["FilteredRetriever", "RetrievedImage", "Retriever"]
