"""The ImageRAG evaluation's metrics: CLIP and SigLIP text-image similarity, DINO image-image similarity
to the real images of the prompt's class, and a VLM judge's score.

- `clip`, `siglip`: the cosine between the prompt's and the image's embeddings, from any image-text
  embedder the settings can build (`open_clip:`, `transformers:`, `tiny:clip`).
- `dino`: the mean cosine between the image's DINO features and each real image's (`transformers:` a
  DINOv2 or DINO ViT backbone); None for a prompt without real images.
- `vlmscore`: a VLM asked how well the image matches the prompt, 0 to 100, read as a fraction (0..1), in
  the manner of the GPTScore judge text-to-image papers report; None when the answer holds no number.

The models load lazily, once per process, through the same factories as the loop's own backends.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from imageloop.agents.structured import ask_text
from imageloop.errors import ConfigError, MalformedOutputError
from imageloop.eval.imagerag import PromptCase, real_image_files
from imageloop.prompts import JUDGE_PROMPT
from imageloop.protocols import GREEDY, Embedder, Message, VisionLanguageModel
from imageloop.tools.images import open_image

if TYPE_CHECKING:
    from imageloop.config import Settings

_NUMBER = re.compile(r"\d+(?:\.\d+)?")


class TextImageScorer:
    """Cosine between the prompt and the image in an image-text embedder's joint space (CLIP, SigLIP)."""

    def __init__(self, name: str, embedder: Embedder) -> None:
        if not embedder.embeds_images:
            raise ConfigError(f"{name}: {embedder.model_id} does not embed images; choose an image-text model")
        self.name = name
        self.embedder = embedder

    def score(self, case: PromptCase, image: Path) -> float | None:
        """The text-image cosine, in -1..1."""
        text = self.embedder.embed_texts([case.prompt])[0]
        picture = self.embedder.embed_images([open_image(image)])[0]
        return round(float(np.dot(text, picture)), 6)


class DinoScorer:
    """Mean cosine between the image's features and those of its class's real images (cached per class)."""

    name = "dino"

    def __init__(self, encoder: Embedder) -> None:
        self.encoder = encoder
        self._real: dict[Path, np.ndarray] = {}
        self._lock = threading.Lock()

    def _real_features(self, case: PromptCase) -> np.ndarray | None:
        files = real_image_files(case)
        if not files or case.real_images is None:
            return None
        with self._lock:
            if case.real_images not in self._real:
                self._real[case.real_images] = self.encoder.embed_images([open_image(f) for f in files])
            return self._real[case.real_images]

    def score(self, case: PromptCase, image: Path) -> float | None:
        """The mean cosine to the real images, or None without any."""
        real = self._real_features(case)
        if real is None:
            return None
        feature = self.encoder.embed_images([open_image(image)])[0]
        return round(float(np.mean(real @ feature)), 6)


class VLMJudge:
    """A VLM's 0-100 rating of how well the image matches the prompt, as a fraction; None if it gives no number."""

    name = "vlmscore"

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.vlm = vlm

    def score(self, case: PromptCase, image: Path) -> float | None:
        """The rating / 100, clamped to 0..1 (greedy, so a rerun gives the same score)."""
        try:
            answer = ask_text(self.vlm, [Message("user", JUDGE_PROMPT.format(prompt=case.prompt), (image,))], GREEDY)
        except MalformedOutputError:
            return None
        match = _NUMBER.search(answer)
        return None if match is None else round(min(max(float(match.group()) / 100.0, 0.0), 1.0), 6)


def dino_encoder(spec: str, settings: Settings) -> Embedder:
    """The DINO backbone named `transformers:ID_OR_DIR`, on the settings' device and dtype."""
    provider, _, model = spec.partition(":")
    if provider.strip().lower() != "transformers" or not model.strip():
        raise ConfigError(f"`eval_dino` {spec!r}: expected transformers:MODEL (e.g. transformers:facebook/dinov2-base)")
    from imageloop.tools.embedders.local import ImageFeatureEncoder

    return ImageFeatureEncoder(model.strip(), device=settings.device, dtype=settings.dtype)
