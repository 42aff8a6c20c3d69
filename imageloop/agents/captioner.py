"""Captions images for the caption route of indexing (text embedders see images only through these)."""

from __future__ import annotations

from pathlib import Path

from imageloop.errors import BackendError
from imageloop.prompts import CAPTIONER_PROMPT
from imageloop.protocols import Message, VisionLanguageModel


class VLMCaptioner:
    """A callable `path -> caption` backed by a VLM."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.vlm = vlm

    def __call__(self, image: Path) -> str:
        """Caption one image; an empty answer is an error, not an empty caption."""
        caption = self.vlm.chat([Message("user", CAPTIONER_PROMPT, (image,))]).strip()
        if not caption:
            raise BackendError(f"{self.vlm.model_id} returned an empty caption for {image.name}")
        return caption
