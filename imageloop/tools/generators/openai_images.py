"""An ImageGenerator over the OpenAI Images API: `images.generate` from text, `images.edit` with references.

The edit endpoint sees the references in order, and the prompt points at them as "image 1", "image 2"
(ImageRAG's in-context wording, each after its retrieval caption), or is the user's own (verbatim).
"""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from PIL import Image

from imageloop.config import Endpoint
from imageloop.errors import BackendError
from imageloop.openai_client import DEFAULT_ENDPOINT, make_client, request_slots, translated_errors
from imageloop.protocols import GenerationRequest, GenerationResult, ReferenceImage
from imageloop.tools.generators.references import in_context_prompt, render
from imageloop.tools.images import png_bytes

if TYPE_CHECKING:
    import openai
    from openai.types import ImagesResponse


def numbered_prompt(request: GenerationRequest, references: Sequence[ReferenceImage]) -> str:
    """ImageRAG's in-context prompt pointing at the edit's images as "image 1", "image 2", ... in order."""
    return in_context_prompt(request, references, [f"image {i}" for i in range(1, len(references) + 1)])


class OpenAIImageGenerator:
    """Text-to-image via `images.generate`; with references, `images.edit` sees them as in-context examples."""

    # gpt-image-1 accepts up to 16 input images per edit.
    max_references = 16

    def __init__(
        self,
        model: str = "gpt-image-1",
        endpoint: Endpoint = DEFAULT_ENDPOINT,
        *,
        size: str | None = None,
        quality: str | None = None,
        client: openai.OpenAI | None = None,
    ) -> None:
        self.model = model
        self.model_id = f"openai:{model}"
        self.size = size
        self.quality = quality
        self._client = client if client is not None else make_client(endpoint)
        self._slots = request_slots(str(self._client.base_url), endpoint.max_concurrent_requests)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Draw `request`; references go in order as image 1, image 2, ... named in the prompt."""
        import openai

        rendered = render(request, self.max_references, self.model_id, numbered_prompt)
        size = f"{request.size[0]}x{request.size[1]}" if request.size else self.size
        size_option = size if size is not None else openai.omit
        # The server validates quality; the client's Literal sets differ between generate and edit.
        quality_option: Any = self.quality if self.quality is not None else openai.omit
        notes = rendered.notes
        if request.seed is not None:
            notes += (f"seed ignored by {self.model_id}",)
        with self._slots, translated_errors(f"image generation with {self.model_id}", self._client):
            if not rendered.images:
                response = self._client.images.generate(
                    model=self.model, prompt=rendered.prompt, n=1, size=size_option, quality=quality_option
                )
            else:
                # Always PNG, whatever the file's format: the API takes PNG, WebP and JPEG only.
                images = [
                    (f"image_{i}.png", png_bytes(image), "image/png")
                    for i, image in enumerate(rendered.images, start=1)
                ]
                response = self._client.images.edit(
                    model=self.model,
                    image=images,
                    prompt=rendered.prompt,
                    n=1,
                    size=size_option,
                    quality=quality_option,
                )
            image = self._decode(response)
        return GenerationResult(image, rendered.prompt, notes)

    def _decode(self, response: ImagesResponse) -> Image.Image:
        """The one image in `response`, decoded to RGB, or a BackendError saying what came back instead."""
        if not response.data:
            raise BackendError(f"{self.model_id} returned no image")
        first = response.data[0]
        if first.b64_json is None:
            if first.url:
                raise BackendError(
                    f"{self.model_id} returned an image URL, not image data: use a model or server "
                    "that answers with b64_json (gpt-image-1 does)"
                )
            raise BackendError(f"{self.model_id} returned an image entry without data")
        try:
            with Image.open(io.BytesIO(base64.b64decode(first.b64_json))) as image:
                return image.convert("RGB")
        except (binascii.Error, OSError, ValueError) as e:
            raise BackendError(f"{self.model_id} returned undecodable image data: {e}") from e
