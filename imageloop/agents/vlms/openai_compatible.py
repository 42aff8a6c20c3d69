"""A VisionLanguageModel over any OpenAI-compatible chat completions endpoint (OpenAI, vLLM, Ollama...)."""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from PIL import Image

from imageloop.config import Endpoint
from imageloop.errors import BackendError, MalformedOutputError
from imageloop.openai_client import (
    DEFAULT_ENDPOINT,
    accepted_extras,
    make_client,
    refuse_extra,
    request_slots,
    server_message,
    translated_errors,
)
from imageloop.protocols import GREEDY, ChatAnswer, Decoding, Message, TokenUsage
from imageloop.tools.images import open_image, png_bytes

if TYPE_CHECKING:
    import openai
    from openai.types.chat import ChatCompletion, ChatCompletionMessageParam
    from openai.types.shared_params import ResponseFormatJSONSchema


def image_data_uri(path: Path, max_image_side: int) -> str:
    """The image at `path` as a PNG data URI, downscaled so its long side is at most `max_image_side`."""
    image = open_image(path)
    # Larger images cost tokens and upload time without helping a critic judge content and style.
    image.thumbnail((max_image_side, max_image_side), Image.Resampling.LANCZOS)
    return "data:image/png;base64," + base64.b64encode(png_bytes(image)).decode("ascii")


def _rejects_response_format(error: openai.APIStatusError) -> bool:
    """Whether the endpoint refused the request because it cannot constrain output to a JSON schema."""
    text = f"{server_message(error)} {error.message}".lower()
    return error.status_code in (400, 422) and ("response_format" in text or "json_schema" in text)


class OpenAIVisionLanguageModel:
    """Chat with text and images through `chat.completions`, asking for schema-constrained JSON when possible."""

    def __init__(
        self,
        model: str,
        endpoint: Endpoint = DEFAULT_ENDPOINT,
        *,
        max_tokens: int = 1024,
        max_image_side: int = 1024,
        client: openai.OpenAI | None = None,
    ) -> None:
        self.model = model
        self.model_id = f"openai:{model}"
        self.max_tokens = max_tokens
        self.max_image_side = max_image_side
        self._client = client if client is not None else make_client(endpoint)
        self._slots = request_slots(str(self._client.base_url), endpoint.max_concurrent_requests)
        # Many local servers reject `response_format`; after one refusal we stop sending it, and
        # imageloop.agents.structured still validates and repairs the plain answers.
        self.supports_response_format = True

    def _message_param(self, message: Message) -> ChatCompletionMessageParam:
        """One Message in the chat API's shape: its text first, then its images in order."""
        if not message.images:
            return cast("ChatCompletionMessageParam", {"role": message.role, "content": message.text})
        parts: list[dict[str, Any]] = [{"type": "text", "text": message.text}]
        parts += [
            {"type": "image_url", "image_url": {"url": image_data_uri(path, self.max_image_side)}}
            for path in message.images
        ]
        return cast("ChatCompletionMessageParam", {"role": message.role, "content": parts})

    def _complete(
        self, messages: list[ChatCompletionMessageParam], json_schema: Mapping[str, Any] | None, decoding: Decoding
    ) -> ChatCompletion:
        """One completion, with the JSON schema and the sampling extras the endpoint accepts; a 400 refusing
        either is answered by asking again without it."""
        import openai

        base_url = str(self._client.base_url)
        sampling: dict[str, Any] = {"temperature": decoding.temperature, "max_tokens": self.max_tokens}
        if not decoding.greedy:
            sampling["top_p"] = decoding.top_p
        if decoding.seed is not None:
            sampling["seed"] = decoding.seed
        # Not OpenAI parameters: vLLM and other local servers read them from the body's extras, and
        # api.openai.com refuses them with a 400, after which that endpoint is sent them no more.
        extras = {"repetition_penalty": decoding.repetition_penalty} if decoding.repetition_penalty != 1.0 else {}
        while True:
            request = dict(sampling)
            if sendable := accepted_extras(base_url, extras):
                request["extra_body"] = sendable
            if json_schema is not None and self.supports_response_format:
                # The schema comes from imageloop.agents.structured.json_schema_for, already in this shape.
                request["response_format"] = cast(
                    "ResponseFormatJSONSchema", {"type": "json_schema", "json_schema": dict(json_schema)}
                )
            try:
                return cast(
                    "ChatCompletion",
                    self._client.chat.completions.create(model=self.model, messages=messages, **request),
                )
            except openai.APIStatusError as e:
                if refuse_extra(base_url, e, sendable):
                    continue
                if "response_format" not in request or not _rejects_response_format(e):
                    raise
                self.supports_response_format = False

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        """Send `messages` (images as PNG data URIs after each text) and return the answer text."""
        params = [self._message_param(m) for m in messages]
        with self._slots, translated_errors(f"chat with {self.model_id}", self._client):
            completion = self._complete(params, json_schema, decoding)
            if not completion.choices:
                raise BackendError(f"{self.model_id} returned no choices")
            answer = completion.choices[0].message
            refusal, content = answer.refusal, answer.content
            if not isinstance(content, (str, type(None))) or not isinstance(refusal, (str, type(None))):
                raise TypeError(f"message content is {type(content).__name__}, not text")
        if refusal:
            raise MalformedOutputError(f"{self.model_id} refused to answer: {refusal}")
        usage = completion.usage  # what the provider counted (some compatible servers send none)
        counted = TokenUsage(usage.prompt_tokens, usage.completion_tokens) if usage is not None else None
        return ChatAnswer(content or "", counted)
