"""A text Embedder over any OpenAI-compatible `/embeddings` endpoint; images enter through their captions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from imageloop.config import Endpoint
from imageloop.errors import BackendError, ConfigError
from imageloop.openai_client import DEFAULT_ENDPOINT, make_client, request_slots, translated_errors
from imageloop.protocols import Vector

if TYPE_CHECKING:
    import openai

# Native widths of OpenAI's models; any other model's width is learned from one probe call.
KNOWN_DIMS = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072, "text-embedding-ada-002": 1536}


class OpenAITextEmbedder:
    """Embeds texts in batches into unit float32 vectors; `model_id` names the model and any reduced width."""

    embeds_images = False

    def __init__(
        self,
        model: str = "text-embedding-3-small",
        endpoint: Endpoint = DEFAULT_ENDPOINT,
        *,
        dimensions: int | None = None,
        batch_size: int = 256,
        client: openai.OpenAI | None = None,
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"embedding batch_size must be at least 1, got {batch_size}")
        self.model = model
        self.dimensions = dimensions
        self.batch_size = batch_size
        # An index built at a reduced width must refuse queries at another, so the width is in the id.
        self.model_id = f"openai:{model}" if dimensions is None else f"openai:{model}@{dimensions}"
        self._dim = dimensions or KNOWN_DIMS.get(model)
        self._client = client if client is not None else make_client(endpoint)
        self._slots = request_slots(str(self._client.base_url), endpoint.max_concurrent_requests)

    @property
    def dim(self) -> int:
        """The vector width, from the model's name or `dimensions`, else measured once on the endpoint."""
        if self._dim is None:
            self._dim = self.embed_texts(["dimension probe"]).shape[1]
        return self._dim

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        """Unit vectors for `texts`, one row each in input order, fetched `batch_size` at a time."""
        import openai

        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        rows: list[list[float]] = []
        with self._slots, translated_errors(f"embeddings with {self.model_id}", self._client):
            for start in range(0, len(texts), self.batch_size):
                batch = list(texts[start : start + self.batch_size])
                response = self._client.embeddings.create(
                    model=self.model,
                    input=batch,
                    dimensions=self.dimensions if self.dimensions is not None else openai.omit,
                )
                if len(response.data) != len(batch):
                    raise BackendError(
                        f"{self.model_id} returned {len(response.data)} embeddings for {len(batch)} texts"
                    )
                # The API may answer out of order; `index` is the position in this batch.
                rows += [item.embedding for item in sorted(response.data, key=lambda item: item.index)]
            vectors = np.asarray(rows, dtype=np.float32)  # a ragged or non-numeric answer fails here, translated
            if vectors.ndim != 2:
                raise ValueError(f"embeddings of shape {vectors.shape}")
        if self._dim is not None and vectors.shape[1] != self._dim:
            raise BackendError(f"{self.model_id} returned {vectors.shape[1]}-d vectors, expected {self._dim}")
        self._dim = vectors.shape[1]
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit: Vector = vectors / np.maximum(norms, 1e-12)
        return unit

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        """Refuse: this embedder has no image tower, so callers index images by their captions instead."""
        raise ConfigError(
            f"{self.model_id} embeds text only: images enter the index through their captions "
            "(the caption route); choose an image embedder to embed pixels"
        )
