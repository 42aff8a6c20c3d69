"""Model calls as LangChain callback runs, so LangSmith (or any callback handler) sees what the loops asked.

The graphs wrap their backends here: each VLM call is a chat-model run (the messages in, the answer out),
each search a retriever run (the query in, the hits out as documents with their scores), each drawing a
tool run (the prompt and references in, the prompt the backend used out). The runs nest under the node
that made them, through the callback configuration LangGraph gives the node; timings are the runs' own.
Outside a graph run (a backend called directly) only an environment-configured tracer (LangSmith's
`LANGSMITH_TRACING=true`) sees them, and with none configured the wrappers cost a few microseconds.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.callbacks import CallbackManager
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage
from langchain_core.outputs import ChatGeneration, LLMResult
from langchain_core.runnables.config import ensure_config, get_callback_manager_for_config

from imageloop.protocols import (
    GREEDY,
    Decoding,
    GenerationRequest,
    GenerationResult,
    ImageGenerator,
    Message,
    RetrievedImage,
    VisionLanguageModel,
)

_SERIALIZED: dict[str, Any] = {"lc": 1, "type": "not_implemented", "id": ["imageloop"]}


def _callbacks() -> CallbackManager | None:
    """The callback manager of the run we are inside (a graph node), else the environment's tracers; None when
    nobody listens (no handler, no tracer), so an untraced call costs no run bookkeeping."""
    manager = get_callback_manager_for_config(ensure_config())
    return manager if manager.handlers else None


def _as_langchain(message: Message) -> BaseMessage:
    """Our message as LangChain's; images appear by path (a trace should not carry megabytes of pixels)."""
    content: list[str | dict[str, Any]] = [{"type": "text", "text": message.text}]
    content += [{"type": "text", "text": f"<image {path}>"} for path in message.images]
    if message.role == "system":
        return SystemMessage(content=content)
    if message.role == "assistant":
        return AIMessage(content=content)
    return HumanMessage(content=content)


class TracedVLM:
    """A VLM whose every `chat` is a chat-model run: messages, schema name and decoding in; the answer out."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.inner = vlm

    @property
    def model_id(self) -> str:
        return self.inner.model_id

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        callbacks = _callbacks()
        if callbacks is None:
            return self.inner.chat(messages, json_schema, decoding)
        params = {
            "model": self.inner.model_id,
            "temperature": decoding.temperature,
            "top_p": decoding.top_p,
            "json_schema": (json_schema or {}).get("name") if json_schema else None,
        }
        [run] = callbacks.on_chat_model_start(
            _SERIALIZED, [[_as_langchain(m) for m in messages]], name=self.inner.model_id, invocation_params=params
        )
        try:
            answer = self.inner.chat(messages, json_schema, decoding)
        except BaseException as e:
            run.on_llm_error(e)
            raise
        run.on_llm_end(LLMResult(generations=[[ChatGeneration(message=AIMessage(content=answer))]]))
        return answer


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

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        with _retrieval(text, "search") as found:
            found += self.inner.search(text, k, similarity_threshold)
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
