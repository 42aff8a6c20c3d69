"""Text-to-image retrieval over an image folder's index, the step ImageRAG and RAGE call `retrieve`."""

from __future__ import annotations

from collections.abc import Sequence

from imageloop.errors import ImageloopError
from imageloop.protocols import Embedder, RetrievedImage
from imageloop.tools.image_index import ImageIndex


class Retriever:
    """An `ImageRetriever` over an index, querying it with the embedder that built it."""

    def __init__(self, index: ImageIndex, embedder: Embedder) -> None:
        # Refused up front: vectors from another model are a different space, and an empty index
        # would make every later retrieval silently return nothing.
        index.require_embedder(embedder.model_id)
        if index.count() == 0:
            raise ImageloopError(f"index at {index.root} is empty: add images and run `imageloop index`")
        self.index = index
        self.embedder = embedder

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        """The top-`k` images for `text`, best first, without hits below `similarity_threshold`."""
        return self.search_many([text], k, similarity_threshold)[0]

    def search_many(
        self, texts: Sequence[str], k: int, similarity_threshold: float | None = None
    ) -> list[list[RetrievedImage]]:
        """`search` for each text, embedding all texts in one batch (one model call per fan-out)."""
        if not texts:
            return []
        vectors = self.embedder.embed_texts(list(texts))
        results = []
        for vector in vectors:
            hits = self.index.store.search(vector, k)
            results.append(
                [
                    RetrievedImage(
                        id=hit.id,
                        path=self.index.root / hit.metadata["path"],
                        caption=hit.metadata.get("caption", ""),
                        score=hit.score,
                    )
                    for hit in hits
                    if similarity_threshold is None or hit.score >= similarity_threshold
                ]
            )
        return results


# RetrievedImage is defined next to the ImageRetriever protocol that graphs depend on; it is
# re-exported because it is what this module returns.
__all__ = ["RetrievedImage", "Retriever"]
