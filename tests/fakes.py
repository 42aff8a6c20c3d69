"""Scripted and fake backends for testing graph logic. They are not models: they replay answers."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from imageloop.protocols import (
    GREEDY,
    ChatCall,
    Decoding,
    GenerationRequest,
    GenerationResult,
    Message,
    RetrievedImage,
    Vector,
)


def _unit(vectors: np.ndarray) -> Vector:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.asarray(vectors / np.maximum(norms, 1e-12), dtype=np.float32)


class FakeHashEmbedder:
    """Bag-of-words hashing embedder: texts sharing words are close; images embed by pixel statistics.

    Deterministic across processes, so an index built in one test is queryable in another.
    """

    def __init__(self, dim: int = 64, embeds_images: bool = False, model_id: str = "fake:hash") -> None:
        self.dim = dim
        self.embeds_images = embeds_images
        self.model_id = model_id
        self.text_calls: list[list[str]] = []

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        self.text_calls.append(list(texts))
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in text.lower().replace(",", " ").replace(".", " ").split():
                h = int(hashlib.sha256(word.encode()).hexdigest(), 16)
                out[row, h % self.dim] += 1.0
            out[row, -1] += 1e-3  # empty texts still get a direction
        return _unit(out)

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        out = np.zeros((len(images), self.dim), dtype=np.float32)
        for row, image in enumerate(images):
            pixels = np.asarray(image.convert("RGB").resize((8, 8)), dtype=np.float32).ravel()
            out[row, : min(self.dim, pixels.size)] = pixels[: self.dim] + 1.0
        return _unit(out)


@dataclass
class ScriptedVLM:
    """Replays `answers` in order (a callable answer sees the messages); records every call."""

    answers: list[Any]
    model_id: str = "scripted:vlm"
    latency_s: float = 0.0
    calls: list[tuple[list[Message], Mapping[str, Any] | None]] = field(default_factory=list)
    decodings: list[Decoding] = field(default_factory=list)

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        if self.latency_s:
            time.sleep(self.latency_s)
        self.calls.append((list(messages), json_schema))
        self.decodings.append(decoding)
        if not self.answers:
            raise AssertionError("ScriptedVLM ran out of answers")
        answer = self.answers.pop(0)
        if callable(answer):
            answer = answer(messages)
        return answer if isinstance(answer, str) else json.dumps(answer)


@dataclass
class ScriptedGenerator:
    """Draws a flat colour per call (distinct per call) and records each request."""

    model_id: str = "scripted:generator"
    max_references: int = 3
    latency_s: float = 0.0
    requests: list[GenerationRequest] = field(default_factory=list)

    def generate(self, request: GenerationRequest) -> GenerationResult:
        if self.latency_s:
            time.sleep(self.latency_s)
        self.requests.append(request)
        shade = (40 * len(self.requests)) % 256
        tokens = [f"<image {i}>" for i in range(1, len(request.references) + 1)]
        prompt_used = request.prompt if not tokens else f"{request.prompt} | refs: {' '.join(tokens)}"
        return GenerationResult(Image.new("RGB", (16, 16), (shade, 255 - shade, 128)), prompt_used)


class Rendezvous:
    """The first `parties` callers wait for each other (at most `timeout_s`), so they reach a batcher together;
    later callers pass straight through. Concurrent work then meets in one batch whatever the thread timing."""

    def __init__(self, parties: int, timeout_s: float = 5.0) -> None:
        self.parties = parties
        self.timeout_s = timeout_s
        self.arrived = 0
        self.condition = threading.Condition()

    def meet(self) -> None:
        """Arrive, then wait for the others."""
        with self.condition:
            self.arrived += 1
            self.condition.notify_all()
        self.wait()

    def wait(self) -> bool:
        """Wait (without arriving) until every party has arrived; False if they did not in time."""
        with self.condition:
            return self.condition.wait_for(lambda: self.arrived >= self.parties, self.timeout_s)


@dataclass
class ScriptedBatchVLM(ScriptedVLM):
    """A ScriptedVLM that also answers a list of calls in one pass (as a local model does); records pass sizes."""

    passes: list[int] = field(default_factory=list)
    rendezvous: Rendezvous = field(default_factory=lambda: Rendezvous(0))

    def batch_key(self, call: ChatCall) -> Hashable:
        self.rendezvous.meet()
        return None

    def chat_batch(self, calls: Sequence[ChatCall]) -> list[str]:
        self.passes.append(len(calls))
        return [self.chat(c.messages, c.json_schema, c.decoding) for c in calls]


@dataclass
class ScriptedBatchGenerator(ScriptedGenerator):
    """A ScriptedGenerator that also draws a list of requests in one call (as a diffusers backend does)."""

    calls: list[int] = field(default_factory=list)
    rendezvous: Rendezvous = field(default_factory=lambda: Rendezvous(0))

    def batch_key(self, request: GenerationRequest) -> Hashable:
        self.rendezvous.meet()
        return (request.size, request.steps, len(request.references))

    def batch_capacity(self, key: Any) -> int | None:
        return None

    def generate_batch(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        self.calls.append(len(requests))
        return [self.generate(r) for r in requests]


@dataclass
class ScriptedRetriever:
    """Returns the scripted hits for a query (matched by a word it contains), recording every query.

    With a `root`, each scripted image exists there as a small PNG, as an indexed file would.
    """

    by_keyword: dict[str, list[tuple[str, float]]]
    root: Any = None
    latency_s: float = 0.0
    queries: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.root is not None:
            for name, _ in (hit for hits in self.by_keyword.values() for hit in hits):
                Image.new("RGB", (8, 8), (90, 90, 200)).save(Path(self.root) / name)

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        if self.latency_s:
            time.sleep(self.latency_s)
        self.queries.append(text)
        for keyword, hits in self.by_keyword.items():
            if keyword.lower() in text.lower():
                found = [
                    RetrievedImage(id=name, path=Path(self.root or ".") / name, caption=f"a picture of {name}", score=s)
                    for name, s in hits
                ]
                found = [h for h in found if similarity_threshold is None or h.score >= similarity_threshold]
                return found[:k]
        return []


@dataclass
class ScriptedRankingRetriever:
    """Answers each search with the next scripted ranking of (id, score); records how it was asked."""

    rankings: list[list[tuple[str, float]]]
    route: str = "image"
    calls: list[tuple[str, str]] = field(default_factory=list)

    def _answer(self, k: int) -> list[RetrievedImage]:
        ranking = self.rankings.pop(0) if len(self.rankings) > 1 else self.rankings[0]
        return [RetrievedImage(id=i, path=Path(f"/index/{i}.png"), caption=f"image {i}", score=s) for i, s in ranking][
            :k
        ]

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        self.calls.append(("text", text))
        return self._answer(k)

    def search_image(self, image: Path, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        self.calls.append(("image", str(image)))
        return self._answer(k)
