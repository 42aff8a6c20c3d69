"""The seams: what the loops need from models and stores, as `typing.Protocol`s.

Graphs depend on these roles only; concrete backends (OpenAI-compatible endpoints, local models)
live in `imageloop.agents` and `imageloop.tools` and are chosen by `imageloop.backends`.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydantic import BaseModel

ModelT = TypeVar("ModelT", bound=BaseModel)
Vector = npt.NDArray[np.float32]


@dataclass(frozen=True)
class Message:
    """One chat turn: text plus images (paths on disk), in the order the model should see them."""

    role: Literal["system", "user", "assistant"]
    text: str
    images: tuple[Path, ...] = ()


@dataclass(frozen=True)
class Decoding:
    """How a VLM picks its answer's tokens. The default is greedy, so a critique is reproducible; GenIR's
    simulated user samples as the paper's code does (temperature 0.7, top_p 0.9, repetition penalty 1.1).

    `seed` makes a sampled answer repeatable where the backend honours seeds (local models, vLLM);
    `repetition_penalty` is a local-model and vLLM knob that OpenAI's own API does not take.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        """Whether this decoding always takes the most likely token."""
        return self.temperature <= 0.0


GREEDY = Decoding()


@dataclass(frozen=True)
class TokenUsage:
    """What one chat call cost: the provider's reported `usage`, or the tokens a local model counted."""

    input_tokens: int
    output_tokens: int


class ChatAnswer(str):
    """A chat answer's text that also carries its `usage` where the backend knows it; a plain `str` to every
    caller, so usage travels through wrappers (micro-batching, lazy backends) to the trace without a new seam."""

    usage: TokenUsage | None

    def __new__(cls, text: str, usage: TokenUsage | None = None) -> ChatAnswer:
        answer = super().__new__(cls, text)
        answer.usage = usage
        return answer


@runtime_checkable
class VisionLanguageModel(Protocol):
    """Chat with text and images.

    `chat` returns the raw text answer, as a `ChatAnswer` with its token usage when the backend knows it.
    When `json_schema` is given the backend asks the endpoint to constrain its output to that schema if
    it can; validation and repair happen in `imageloop.agents.structured`, identically for every backend.
    `decoding` defaults to greedy.
    """

    model_id: str

    def chat(
        self,
        messages: Sequence[Message],
        json_schema: Mapping[str, Any] | None = None,
        decoding: Decoding = GREEDY,
    ) -> str: ...


@dataclass(frozen=True)
class ChatCall:
    """One `VisionLanguageModel.chat` call's arguments, as a batch-capable backend takes them in a list."""

    messages: Sequence[Message]
    json_schema: Mapping[str, Any] | None = None
    decoding: Decoding = GREEDY


@runtime_checkable
class BatchVisionLanguageModel(VisionLanguageModel, Protocol):
    """A VLM that answers several chat calls in one batched pass (a local transformers model).

    Calls with equal `batch_key`s may share a pass; each answer equals the answer to the same call alone.
    """

    def batch_key(self, call: ChatCall) -> Hashable: ...

    def chat_batch(self, calls: Sequence[ChatCall]) -> list[str]: ...


@dataclass(frozen=True)
class ReferenceImage:
    """A retrieved image passed to a generator as an in-context example of `concept`.

    `caption` is the retrieval caption that found it; ImageRAG's prompt names each image by it (the
    released code does), falling back to `concept` when there is none.
    """

    path: Path
    concept: str
    caption: str = ""
    score: float = 0.0

    @property
    def label(self) -> str:
        """The words the in-context prompt uses for this image: its retrieval caption, else its concept."""
        return self.caption.strip() or self.concept.strip()


PromptTemplate = Literal["imagerag", "verbatim"]
"""How a generator words a prompt with references: ImageRAG's "According to these images of <c_i>: <img_i>,
..., generate <p>", or the user's prompt unchanged with the references beside it (RAGE's picked images)."""


@dataclass(frozen=True)
class GenerationRequest:
    """What to draw; references are ordered, and the generator decides how they enter the model.

    `template` says how the prompt names the references. When a backend takes fewer references than
    given, "imagerag" keeps the best-scoring ones and "verbatim" the first ones (the user's pick order);
    either way the result's notes name those dropped.
    """

    prompt: str
    references: tuple[ReferenceImage, ...] = ()
    seed: int | None = None
    size: tuple[int, int] | None = None
    steps: int | None = None
    template: PromptTemplate = "imagerag"


@dataclass(frozen=True)
class GenerationResult:
    """The picture and the exact prompt text the backend sent (its own rendering of the references)."""

    image: Image.Image
    prompt_used: str
    notes: tuple[str, ...] = field(default=())


@runtime_checkable
class ImageGenerator(Protocol):
    """Text-to-image, optionally conditioned on reference images.

    `max_references` says how many references one call can take (0: text only); callers trim to it.
    """

    model_id: str
    max_references: int

    def generate(self, request: GenerationRequest) -> GenerationResult: ...


@runtime_checkable
class BatchImageGenerator(ImageGenerator, Protocol):
    """An ImageGenerator that draws several requests in one pipeline call (the local diffusers backends).

    Requests with equal `batch_key`s may share a call, each picture drawn from its own seed;
    `batch_capacity(key)` is how many such requests fit on the device now (None: no estimate).
    """

    def batch_key(self, request: GenerationRequest) -> Hashable: ...

    def batch_capacity(self, key: Any) -> int | None: ...

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...


@runtime_checkable
class Embedder(Protocol):
    """Maps texts (and, when `embeds_images`, images) into one L2-normalised space of size `dim`.

    `model_id` is stable across processes: an index records it and refuses queries from another.
    """

    model_id: str
    embeds_images: bool

    @property
    def dim(self) -> int: ...

    def embed_texts(self, texts: Sequence[str]) -> Vector: ...

    def embed_images(self, images: Sequence[Image.Image]) -> Vector: ...


@dataclass(frozen=True)
class VectorRecord:
    """One stored item: a unit vector and small JSON-serialisable metadata."""

    id: str
    vector: Vector
    metadata: Mapping[str, Any]


@dataclass(frozen=True)
class SearchHit:
    """A search result with its cosine similarity."""

    id: str
    score: float
    metadata: Mapping[str, Any]


@runtime_checkable
class VectorStore(Protocol):
    """Persistent vectors with metadata; cosine similarity search over unit vectors."""

    def upsert(self, records: Sequence[VectorRecord]) -> None: ...

    def search(self, vector: Vector, k: int, where: Mapping[str, Any] | None = None) -> list[SearchHit]: ...

    def get(self, ids: Sequence[str]) -> list[VectorRecord]: ...

    def delete(self, ids: Sequence[str]) -> None: ...

    def count(self) -> int: ...


@dataclass(frozen=True)
class RetrievedImage:
    """An indexed image returned for a query, with its cosine similarity to the query."""

    id: str
    path: Path
    caption: str
    score: float


@runtime_checkable
class ImageRetriever(Protocol):
    """Text-to-image search over an index (caption or image route, the retriever knows which)."""

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]: ...


class PathResolver(Protocol):
    """Resolves a graph input naming an image file (`text`, called `what` in messages), refusing one its face
    may not read: the application passes `App.file_path`, confined to its roots; a graph built without one
    takes paths as given (`as_given`)."""

    def __call__(self, text: str, what: str) -> Path: ...


def as_given(text: str, what: str) -> Path:
    """The path as written: the resolver of a graph used as a library, where the caller owns its paths."""
    return Path(text)
