"""Model calls as LangChain callback runs, so LangSmith (or any callback handler) sees what the loops asked.

The graphs wrap their backends here: each VLM call is a chat-model run taken through LangChain's own chat
model (`VLMChatModel`), so it is the `llm` run LangSmith expects: the messages in (images as thumbnails),
the answer out with its `usage_metadata` (the provider's `usage`, or the tokens a local model counted), and
`ls_provider`, `ls_model_name`, `ls_temperature` in its metadata, which LangSmith's token and cost columns
read. Each search is a retriever run (the query in, the hits out as documents with their scores), each
drawing a tool run (the prompt and references in, the prompt the backend used out). The runs nest under
the node that made them, through the callback configuration LangGraph gives the node; timings are the
runs' own. Outside a graph run (a backend called directly) only an environment-configured tracer
(LangSmith's `LANGSMITH_TRACING=true`) sees them, and with none configured the wrappers cost a few
microseconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.callbacks import CallbackManager, CallbackManagerForLLMRun
from langchain_core.documents import Document
from langchain_core.language_models import BaseChatModel, LangSmithParams
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables.config import ensure_config, get_callback_manager_for_config
from pydantic import ConfigDict

from imageloop.errors import ImageloopError
from imageloop.protocols import (
    GREEDY,
    ChatCall,
    Decoding,
    GenerationRequest,
    GenerationResult,
    ImageGenerator,
    Message,
    RetrievedImage,
    VisionLanguageModel,
)
from imageloop.thumbnails import encode_png_under

_SERIALIZED: dict[str, Any] = {"lc": 1, "type": "not_implemented", "id": ["imageloop"]}
TRACE_IMAGE_SIDE = 256
TRACE_IMAGE_BUDGET = 200_000
"""Images in a traced message: thumbnails at most this wide and this many base64 characters (a trace should show
what the model saw without carrying megabytes of pixels)."""


def _callbacks() -> CallbackManager | None:
    """The callback manager of the run we are inside (a graph node), else the environment's tracers; None when
    nobody listens (no handler, no tracer), so an untraced call costs no run bookkeeping."""
    manager = get_callback_manager_for_config(ensure_config())
    return manager if manager.handlers else None


def provider_and_model(model_id: str) -> tuple[str, str]:
    """LangSmith's `ls_provider` and `ls_model_name` of a `PROVIDER:MODEL` id (`langchain:PROVIDER:MODEL` names the
    integration's provider), which its cost table is keyed by."""
    provider, _, model = model_id.partition(":")
    if provider == "langchain" and ":" in model:
        provider, _, model = model.partition(":")
    return provider, model or model_id


def _image_block(path: Path) -> dict[str, Any]:
    """A picture the model was shown, as LangChain's standard image block (a thumbnail); a note if unreadable."""
    try:
        data = encode_png_under(path, TRACE_IMAGE_BUDGET, TRACE_IMAGE_SIDE)
    except (ImageloopError, OSError) as e:
        return {"type": "text", "text": f"<image {path.name}: not readable ({e})>"}
    if data is None:
        return {"type": "text", "text": f"<image {path.name}: too large to trace>"}
    return {"type": "image", "base64": data, "mime_type": "image/png"}


def _as_langchain(message: Message) -> BaseMessage:
    """Our message as LangChain's: its text, then each image as a thumbnail (what the model saw, in order)."""
    content: list[str | dict[str, Any]] = [{"type": "text", "text": message.text}]
    content += [_image_block(path) for path in message.images]
    if message.role == "system":
        return SystemMessage(content=content)
    if message.role == "assistant":
        return AIMessage(content=content)
    return HumanMessage(content=content)


class VLMChatModel(BaseChatModel):
    """A `VisionLanguageModel` as a LangChain chat model: calling it through `invoke` makes LangChain's own chat
    model run, with the LangSmith parameters and token usage of the call (`call`, passed as a keyword)."""

    model_config = ConfigDict(arbitrary_types_allowed=True)
    vlm: Any
    cache: bool | None = False  # never answered from a global LLM cache: a critic must look at each image

    @property
    def _llm_type(self) -> str:
        return "imageloop-vlm"

    def _get_invocation_params(self, stop: list[str] | None = None, **kwargs: Any) -> dict[str, Any]:
        call: ChatCall = kwargs["call"]
        schema = call.json_schema.get("name") if call.json_schema else None
        decoding = call.decoding
        return {"model": self.vlm.model_id, "temperature": decoding.temperature, "top_p": decoding.top_p,
                "json_schema": schema, "_type": self._llm_type}  # fmt: skip

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        call: ChatCall = kwargs["call"]
        provider, model = provider_and_model(self.vlm.model_id)
        return LangSmithParams(
            ls_provider=provider, ls_model_name=model, ls_model_type="chat", ls_temperature=call.decoding.temperature
        )

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        call: ChatCall = kwargs["call"]
        answer = self.vlm.chat(call.messages, call.json_schema, call.decoding)
        usage = getattr(answer, "usage", None)
        provider, model = provider_and_model(self.vlm.model_id)
        counted = (
            UsageMetadata(
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                total_tokens=usage.input_tokens + usage.output_tokens,
            )
            if usage is not None
            else None
        )
        message = AIMessage(
            content=str(answer), usage_metadata=counted,
            response_metadata={"model_provider": provider, "model_name": model},
        )  # fmt: skip
        return ChatResult(generations=[ChatGeneration(message=message)])


class TracedVLM:
    """A VLM whose every `chat` is a chat-model run (see `VLMChatModel`): messages in; the answer and its cost out."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.inner = vlm
        self.chat_model = VLMChatModel(vlm=vlm)

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        if _callbacks() is None:
            return self.inner.chat(messages, json_schema, decoding)
        answer = self.chat_model.invoke(
            [_as_langchain(m) for m in messages],
            {"run_name": self.inner.model_id},
            call=ChatCall(messages, json_schema, decoding),
        )
        return answer.text


class TracedGenerator:
    """An image generator whose every drawing is a tool run: prompt, references and knobs in."""

    def __init__(self, generator: ImageGenerator) -> None:
        self.inner = generator

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    @property
    def max_references(self) -> int:
        return self.inner.max_references

    def generate(self, request: GenerationRequest) -> GenerationResult:
        callbacks = _callbacks()
        if callbacks is None:
            return self.inner.generate(request)
        inputs = {
            "model": self.inner.model_id,
            "prompt": request.prompt,
            "references": [str(r.path) for r in request.references],
            "seed": request.seed,
            "size": list(request.size) if request.size else None,
            "steps": request.steps,
        }
        run = callbacks.on_tool_start(_SERIALIZED, request.prompt, name="generate_image", inputs=inputs)
        try:
            result = self.inner.generate(request)
        except BaseException as e:
            run.on_tool_error(e)
            raise
        run.on_tool_end({"prompt_used": result.prompt_used, "notes": list(result.notes), "size": result.image.size})
        return result


class TracedRetriever:
    """A retriever whose every search is a retriever run: the query in, the hits out as scored documents."""

    def __init__(self, retriever: Any) -> None:
        """`retriever`: an `ImageRetriever`, or GenIR's retriever that also searches by image."""
        self.inner = retriever

    @property
    def route(self) -> Literal["image", "caption"]:
        route: Literal["image", "caption"] = self.inner.route
        return route

    def search(
        self, text: str, k: int, similarity_threshold: float | None = None, where: Mapping[str, Any] | None = None
    ) -> list[RetrievedImage]:
        """A text search (within a metadata filter, for a retriever that takes one: RAGE's)."""
        with _retrieval(text, "search") as found:
            filtered = {"where": where} if where is not None else {}
            found += self.inner.search(text, k, similarity_threshold, **filtered)
        return found

    def search_image(self, image: Path, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        with _retrieval(str(image), "search_image") as found:
            found += self.inner.search_image(image, k, similarity_threshold)
        return found


@contextmanager
def _retrieval(query: str, name: str) -> Iterator[list[RetrievedImage]]:
    """A retriever run around one search; the block fills the list with what it found."""
    found: list[RetrievedImage] = []
    callbacks = _callbacks()
    if callbacks is None:
        yield found
        return
    run = callbacks.on_retriever_start(_SERIALIZED, query, name=name)
    try:
        yield found
    except BaseException as e:
        run.on_retriever_error(e)
        raise
    run.on_retriever_end(
        [
            Document(page_content=hit.caption, id=hit.id, metadata={"path": str(hit.path), "score": float(hit.score)})
            for hit in found
        ]
    )


# The protocols declare `model_id` as an attribute; the wrappers read it through (the server's lazy backends
# build their model on first read), hence the casts.


def traced_vlm(vlm: VisionLanguageModel) -> VisionLanguageModel:
    """`vlm` with its calls traced (once: an already traced VLM is returned as is)."""
    return vlm if isinstance(vlm, TracedVLM) else cast(VisionLanguageModel, TracedVLM(vlm))


def traced_generator(generator: ImageGenerator) -> ImageGenerator:
    """`generator` with its drawings traced (once)."""
    return generator if isinstance(generator, TracedGenerator) else cast(ImageGenerator, TracedGenerator(generator))


def traced_retriever(retriever: Any) -> TracedRetriever:
    """`retriever` with its searches traced (once); it keeps the protocol it had (text, or text and image)."""
    return retriever if isinstance(retriever, TracedRetriever) else TracedRetriever(retriever)
