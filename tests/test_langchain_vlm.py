"""The LangChain adapter: our Messages as langchain-core messages, structured output, and `langchain:PROVIDER:MODEL`."""

from __future__ import annotations

import base64
import io
import json
import sys
import types
from pathlib import Path
from typing import Any, cast

import pytest
from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda
from PIL import Image
from pydantic import Field

from imageloop.agents.critic import CriticVerdict
from imageloop.agents.structured import ask_structured
from imageloop.agents.vlms.langchain_chat import LangChainVisionLanguageModel
from imageloop.backends import VLM_PROVIDERS, Placement
from imageloop.config import Endpoint
from imageloop.errors import BackendError, ConfigError, MalformedOutputError
from imageloop.protocols import Decoding, Message

VERDICT = {"aligned": False, "missing_concepts": ["Cyanocitta cristata"]}


class ScriptedVisionChatModel(BaseChatModel):
    """Replays `answers` (text, an AIMessage, or an exception to raise) and records every request.

    Its structured output behaves like a provider's native JSON-schema mode: the raw message plus the
    parsed JSON, or a parsing error.
    """

    answers: list[Any]
    received: list[list[BaseMessage]] = Field(default_factory=list)
    structured_requests: list[dict[str, Any]] = Field(default_factory=list)

    @property
    def _llm_type(self) -> str:
        return "scripted-vision"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        self.received.append(list(messages))
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        message = answer if isinstance(answer, AIMessage) else AIMessage(content=answer)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def with_structured_output(  # type: ignore[override]
        self, schema: dict[str, Any], *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[Any, dict[str, Any]]:
        self.structured_requests.append({"schema": schema, "include_raw": include_raw, **kwargs})

        def parse(raw: AIMessage) -> dict[str, Any]:
            try:
                return {"raw": raw, "parsed": json.loads(raw.text), "parsing_error": None}
            except json.JSONDecodeError as e:
                return {"raw": raw, "parsed": None, "parsing_error": e}

        return self | RunnableLambda(parse)


def picture(tmp_path: Path, name: str, size: tuple[int, int], colour: tuple[int, int, int]) -> Path:
    path = tmp_path / name
    Image.new("RGB", size, colour).save(path)
    return path


def decoded_image(block: dict[str, Any]) -> Image.Image:
    assert block["type"] == "image_url"
    header, data = block["image_url"]["url"].split(",", 1)
    assert header == "data:image/png;base64"
    return Image.open(io.BytesIO(base64.b64decode(data)))


def test_images_travel_as_png_data_uri_image_url_blocks_after_the_text_in_order(tmp_path: Path) -> None:
    model = ScriptedVisionChatModel(answers=["a red and a blue picture"])
    red = picture(tmp_path, "red.png", (20, 10), (255, 0, 0))
    blue = picture(tmp_path, "blue.png", (10, 20), (0, 0, 255))
    vlm = LangChainVisionLanguageModel(model)
    answer = vlm.chat([Message("system", "Be brief."), Message("user", "Compare.", (red, blue))])
    assert answer == "a red and a blue picture"
    system, user = model.received[0]
    assert isinstance(system, SystemMessage) and system.content == "Be brief."
    assert isinstance(user, HumanMessage)
    text, first, second = cast("list[dict[str, Any]]", user.content)
    assert text == {"type": "text", "text": "Compare."}
    assert [(image.size, image.getpixel((0, 0))) for image in map(decoded_image, [first, second])] == [
        ((20, 10), (255, 0, 0)),
        ((10, 20), (0, 0, 255)),
    ]
    # langchain-core reads them as standard image blocks, which every multimodal integration translates.
    assert [block["type"] for block in user.content_blocks] == ["text", "image", "image"]
    assert user.content_blocks[1].get("mime_type") == "image/png"


def test_images_are_downscaled_to_max_image_side(tmp_path: Path) -> None:
    model = ScriptedVisionChatModel(answers=["ok"])
    vlm = LangChainVisionLanguageModel(model, max_image_side=32)
    vlm.chat([Message("user", "What?", (picture(tmp_path, "wide.png", (128, 64), (0, 128, 0)),))])
    content = cast("list[dict[str, Any]]", model.received[0][0].content)
    assert decoded_image(content[1]).size == (32, 16)


def test_an_answer_carries_the_tokens_the_integration_reported_plain_or_structured() -> None:
    usage = {"input_tokens": 120, "output_tokens": 7, "total_tokens": 127}
    model = ScriptedVisionChatModel(answers=[AIMessage(content="hi", usage_metadata=usage)] * 2)
    vlm = LangChainVisionLanguageModel(model)
    plain = vlm.chat([Message("user", "Hi")])
    structured = vlm.chat([Message("user", "Hi")], json_schema={"name": "Answer", "schema": {"type": "object"}})
    assert [(a.usage.input_tokens, a.usage.output_tokens) for a in (plain, structured)] == [(120, 7)] * 2  # type: ignore[attr-defined]


class ScriptedTemperatureChatModel(ScriptedVisionChatModel):
    """A scripted model with a temperature field, as most integrations have; records it per request."""

    temperature: float = 0.0
    temperatures: list[float] = Field(default_factory=list)

    def _generate(self, messages: list[BaseMessage], *args: Any, **kwargs: Any) -> ChatResult:
        self.temperatures.append(self.temperature)
        return super()._generate(messages, *args, **kwargs)


def test_sampling_sets_the_models_own_temperature_for_that_call_only() -> None:
    model = ScriptedTemperatureChatModel(answers=["a", "b", "c"])
    vlm = LangChainVisionLanguageModel(model)
    vlm.chat([Message("user", "Hi")])
    vlm.chat([Message("user", "Hi")], decoding=Decoding(temperature=0.7, top_p=0.9))
    vlm.chat([Message("user", "Hi")])
    assert model.temperatures == [0.0, 0.7, 0.0]


def test_structured_output_asks_for_the_json_schema_and_returns_parseable_json() -> None:
    model = ScriptedVisionChatModel(answers=[json.dumps(VERDICT)])
    verdict = ask_structured(LangChainVisionLanguageModel(model), [Message("user", "Judge.")], CriticVerdict)
    assert verdict == CriticVerdict.model_validate(VERDICT)
    (request,) = model.structured_requests
    assert request["method"] == "json_schema" and request["include_raw"] is True
    assert request["schema"]["title"] == "CriticVerdict"
    assert set(request["schema"]["properties"]) == {"aligned", "missing_concepts"}


def test_unparseable_structured_output_gets_one_repair_with_the_answer_replayed() -> None:
    model = ScriptedVisionChatModel(answers=["I think it is aligned", json.dumps(VERDICT)])
    verdict = ask_structured(LangChainVisionLanguageModel(model), [Message("user", "Judge.")], CriticVerdict)
    assert verdict.missing_concepts == ["Cyanocitta cristata"]
    assert len(model.received) == 2
    _, replayed, repair = model.received[1]
    assert isinstance(replayed, AIMessage) and replayed.content == "I think it is aligned"
    assert isinstance(repair, HumanMessage) and "JSON object" in repair.text


def test_models_without_structured_output_get_plain_requests() -> None:
    model = GenericFakeChatModel(messages=iter([AIMessage(content=f"Sure: {json.dumps(VERDICT)}")]))
    vlm = LangChainVisionLanguageModel(model)
    verdict = ask_structured(vlm, [Message("user", "Judge.")], CriticVerdict)
    assert verdict.aligned is False
    assert vlm.supports_structured_output is False


def test_a_refusal_is_malformed_output() -> None:
    refusal = AIMessage(content="", additional_kwargs={"refusal": "I can't help with that."})
    vlm = LangChainVisionLanguageModel(ScriptedVisionChatModel(answers=[refusal]), model_id="langchain:test")
    with pytest.raises(MalformedOutputError, match="langchain:test refused to answer: I can't help with that"):
        vlm.chat([Message("user", "Judge.")], {"name": "CriticVerdict", "schema": {"type": "object"}})


def test_provider_errors_become_one_line_backend_errors() -> None:
    model = ScriptedVisionChatModel(answers=[ConnectionError("connection refused\nretry later")])
    vlm = LangChainVisionLanguageModel(model, model_id="langchain:test")
    with pytest.raises(BackendError, match=r"^chat with langchain:test failed: ConnectionError: connection refused$"):
        vlm.chat([Message("user", "hi")])


@pytest.fixture
def fake_langchain(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """A stand-in `langchain.chat_models` whose `init_chat_model` records its arguments."""
    calls: list[dict[str, Any]] = []

    def init_chat_model(model: str, **kwargs: Any) -> BaseChatModel:
        calls.append({"model": model, **kwargs})
        if kwargs["model_provider"] == "missing":
            raise ImportError("Unable to import langchain_missing. Please install `langchain-missing`")
        return ScriptedVisionChatModel(answers=["hello"])

    chat_models = types.ModuleType("langchain.chat_models")
    chat_models.init_chat_model = init_chat_model  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "langchain", types.ModuleType("langchain"))
    monkeypatch.setitem(sys.modules, "langchain.chat_models", chat_models)
    return calls


def build(model: str) -> Any:
    return VLM_PROVIDERS["langchain"](model, Endpoint(), Placement())


def test_langchain_provider_model_is_built_by_init_chat_model_at_temperature_zero(
    fake_langchain: list[dict[str, Any]],
) -> None:
    vlm = build("anthropic:claude-sonnet-4-5")
    assert vlm.model_id == "langchain:anthropic:claude-sonnet-4-5"
    assert fake_langchain == [{"model": "claude-sonnet-4-5", "model_provider": "anthropic", "temperature": 0}]
    assert vlm.chat([Message("user", "hi")]) == "hello"


def test_a_missing_integration_says_what_to_install(fake_langchain: list[dict[str, Any]]) -> None:
    with pytest.raises(ConfigError, match=r"pip install langchain langchain-missing$"):
        build("missing:some-model")


def test_without_langchain_the_error_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "langchain", None)
    monkeypatch.setitem(sys.modules, "langchain.chat_models", None)
    with pytest.raises(ConfigError, match=r"pip install langchain langchain-google-genai$"):
        build("google_genai:gemini-2.5-flash")


@pytest.mark.parametrize("model", ["gpt-4.1-mini", ":gpt-4.1-mini", "openai:"])
def test_a_spec_without_provider_and_model_is_refused(model: str) -> None:
    with pytest.raises(ConfigError, match="expected langchain:PROVIDER:MODEL"):
        build(model)
