"""A VisionLanguageModel over any langchain-core chat model (`BaseChatModel`): Anthropic, Gemini, Ollama, Bedrock...

Images travel as OpenAI-style `image_url` content blocks holding PNG data URIs, which langchain-core
1.x reads as standard image blocks and every multimodal integration translates for its provider.
With a JSON schema the adapter asks for `with_structured_output(method="json_schema")` where the
model supports it and returns the parsed object as JSON text; otherwise it returns the plain answer,
and `imageloop.agents.structured` validates and repairs, as for every backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, cast

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage

from imageloop.agents.vlms.openai_compatible import image_data_uri
from imageloop.errors import BackendError, ConfigError, MalformedOutputError
from imageloop.protocols import GREEDY, ChatAnswer, Decoding, Message, TokenUsage

if TYPE_CHECKING:
    from langchain_core.language_models import BaseChatModel


def _install_hint(provider: str) -> str:
    return f"pip install langchain langchain-{provider.replace('_', '-')}"


class LangChainVisionLanguageModel:
    """Chat with text and images through a langchain-core chat model, with structured output where it has it."""

    def __init__(self, chat_model: BaseChatModel, *, model_id: str | None = None, max_image_side: int = 1024) -> None:
        self.chat_model = chat_model
        self.model_id = model_id or f"langchain:{type(chat_model).__name__}"
        self.max_image_side = max_image_side
        # Models without structured output raise when asked for it; after that we send plain requests.
        self.supports_structured_output = True

    def _message(self, message: Message) -> BaseMessage:
        """One Message as a langchain-core message: its text first, then its images in order."""
        if message.role == "system":
            return SystemMessage(content=message.text)
        if message.role == "assistant":
            return AIMessage(content=message.text)
        if not message.images:
            return HumanMessage(content=message.text)
        content: list[str | dict[str, Any]] = [{"type": "text", "text": message.text}]
        content += [
            {"type": "image_url", "image_url": {"url": image_data_uri(path, self.max_image_side)}}
            for path in message.images
        ]
        return HumanMessage(content=content)

    def _model(self, decoding: Decoding) -> BaseChatModel:
        """The chat model with `decoding`'s temperature and top_p, where its integration has those fields."""
        if decoding.greedy:
            return self.chat_model
        wanted = {"temperature": decoding.temperature, "top_p": decoding.top_p, "seed": decoding.seed}
        fields = type(self.chat_model).model_fields
        return self.chat_model.model_copy(update={k: v for k, v in wanted.items() if k in fields and v is not None})

    def _structured(
        self, model: BaseChatModel, messages: list[BaseMessage], json_schema: Mapping[str, Any]
    ) -> str | None:
        """The answer as JSON text from the model's structured output; None when the model has none."""
        # json_schema_for's {"name", "schema", "strict"} is OpenAI's wrapper; integrations take the bare
        # JSON schema and name the output after its title.
        schema = {"title": json_schema.get("name", "Answer"), **json_schema.get("schema", json_schema)}
        try:
            runnable = model.with_structured_output(schema, method="json_schema", include_raw=True)
        except (NotImplementedError, TypeError, ValueError):
            self.supports_structured_output = False
            return None
        result = cast("dict[str, Any]", runnable.invoke(messages))  # include_raw: raw, parsed, parsing_error
        raw, parsed = result["raw"], result.get("parsed")
        refusal = raw.additional_kwargs.get("refusal") if isinstance(raw, BaseMessage) else None
        if refusal:
            raise MalformedOutputError(f"{self.model_id} refused to answer: {refusal}")
        usage = _usage(raw)
        if isinstance(parsed, dict):
            return ChatAnswer(json.dumps(parsed), usage)
        # Unparseable structured output: hand the raw text to validation and repair.
        return ChatAnswer(raw.text if isinstance(raw, BaseMessage) else str(raw), usage)

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        """Send `messages` (images as PNG data URIs after each text) and return the answer text."""
        converted = [self._message(m) for m in messages]
        model = self._model(decoding)
        try:
            if json_schema is not None and self.supports_structured_output:
                structured = self._structured(model, converted, json_schema)
                if structured is not None:
                    return structured
            answer = model.invoke(converted)
            return ChatAnswer(answer.text, _usage(answer))
        except MalformedOutputError:
            raise
        except Exception as e:
            # Integrations raise their own SDK's errors (network, auth, rate limits): one line, cause kept.
            first_line = (str(e).splitlines() or [""])[0][:300]
            raise BackendError(f"chat with {self.model_id} failed: {type(e).__name__}: {first_line}") from e


def _usage(message: Any) -> TokenUsage | None:
    """The tokens an integration reported on its answer (`AIMessage.usage_metadata`), if it did."""
    usage = getattr(message, "usage_metadata", None)
    return TokenUsage(usage["input_tokens"], usage["output_tokens"]) if usage else None


def langchain_vlm(spec: str) -> LangChainVisionLanguageModel:
    """`langchain:PROVIDER:MODEL`: the chat model LangChain's `init_chat_model` builds, at temperature 0."""
    provider, _, model = spec.partition(":")
    if not provider or not model:
        raise ConfigError(
            f"langchain:{spec}: expected langchain:PROVIDER:MODEL, e.g. langchain:anthropic:claude-sonnet-4-5"
        )
    try:
        from langchain.chat_models import init_chat_model  # type: ignore[import-not-found, unused-ignore]
    except ImportError:
        raise ConfigError(
            f"langchain:{spec} needs LangChain and its {provider} integration: {_install_hint(provider)}"
        ) from None
    try:
        chat_model = init_chat_model(model, model_provider=provider, temperature=0)
    except ImportError:
        raise ConfigError(
            f"langchain:{spec} needs LangChain's {provider} integration: {_install_hint(provider)}"
        ) from None
    except ValueError as e:
        raise ConfigError(f"langchain:{spec}: {str(e).splitlines()[0][:300]}") from None
    return LangChainVisionLanguageModel(chat_model, model_id=f"langchain:{spec}")
