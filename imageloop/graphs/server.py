"""Graph factories for LangGraph Server (`langgraph dev`) and Studio: ImageRAG and GenIR over configured backends.

`langgraph.json` at the repository root names these factories. The server brings its own
checkpointer, so none is compiled in (`build_imagerag_graph` and `build_genir_graph` still take one
for every other caller). The server calls a factory with each run's config, and also to draw a graph
or read its schema; so the backends are resolved when a node first needs them, never while building:
Studio can draw both graphs before any model or index is configured.

Backends come from the environment exactly as for the CLI (`IMAGELOOP_PROFILE`, `IMAGELOOP_VLM`,
`OPENAI_API_KEY`, ...). The index is the run's `configurable.index`, else `IMAGELOOP_INDEX`; images
the loops draw go to `configurable.artifacts_dir`, else `IMAGELOOP_ARTIFACTS`, else `runs/server/artifacts`
(state holds their ids: `<artifacts_dir>/<id>.png`).
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, cast

from langchain_core.runnables import RunnableConfig
from langgraph.graph.state import CompiledStateGraph

from imageloop.backends import make_embedder, make_generator, make_vlm
from imageloop.config import Settings, load_settings
from imageloop.errors import ConfigError
from imageloop.graphs.genir import GenIRRetriever, GenIRState, build_genir_graph
from imageloop.graphs.imagerag import ImageRAGState, build_imagerag_graph
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
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.retriever import Retriever

INDEX_ENV = "IMAGELOOP_INDEX"
ARTIFACTS_ENV = "IMAGELOOP_ARTIFACTS"
DEFAULT_ARTIFACTS = Path("runs") / "server" / "artifacts"


class ServerBackends:
    """The backends of one graph, built from settings and the run's config at first use, once."""

    def __init__(self, configurable: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> None:
        self.configurable = configurable
        self.environ = os.environ if environ is None else environ
        self._lock = threading.Lock()  # ImageRAG retrieves in parallel branches
        self._retriever: Retriever | None = None

    @functools.cached_property
    def settings(self) -> Settings:
        """Settings from the environment (a profile and `IMAGELOOP_*` variables)."""
        return load_settings(environ=self.environ)

    def index_path(self) -> Path:
        """The indexed folder this run searches."""
        value = self.configurable.get("index") or self.environ.get(INDEX_ENV)
        if not value:
            raise ConfigError(f"no index: set {INDEX_ENV}=FOLDER for the server or pass configurable.index in the run")
        return Path(str(value)).expanduser()

    def artifacts_dir(self) -> Path:
        """Where this graph's images are stored; it is created on the first image."""
        value = self.configurable.get("artifacts_dir") or self.environ.get(ARTIFACTS_ENV)
        return Path(str(value)).expanduser() if value else DEFAULT_ARTIFACTS

    def vlm(self) -> VisionLanguageModel:
        """The configured VLM (critic, rewriter, query refiner)."""
        return make_vlm(self.settings)

    def generator(self) -> ImageGenerator:
        """The configured image generator."""
        return make_generator(self.settings)

    def retriever(self) -> Retriever:
        """A retriever over the index, opened on first use and kept for the graph's lifetime."""
        with self._lock:
            if self._retriever is None:
                self._retriever = Retriever(open_index(self.index_path()), make_embedder(self.settings))
            return self._retriever


class _LazyVLM:
    """A VisionLanguageModel that builds the configured one on its first call."""

    def __init__(self, backends: ServerBackends) -> None:
        self._backends = backends

    @property
    def model_id(self) -> str:
        return self._backends.vlm().model_id

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        return self._backends.vlm().chat(messages, json_schema, decoding)


class _LazyGenerator:
    """An ImageGenerator that builds the configured one on its first call."""

    def __init__(self, backends: ServerBackends) -> None:
        self._backends = backends

    @property
    def model_id(self) -> str:
        return self._backends.generator().model_id

    @property
    def max_references(self) -> int:
        return self._backends.generator().max_references

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return self._backends.generator().generate(request)


class _LazyRetriever:
    """A retriever over the run's index, opened on its first search."""

    def __init__(self, backends: ServerBackends) -> None:
        self._backends = backends

    @property
    def route(self) -> Literal["image", "caption"]:
        return self._backends.retriever().route

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        return self._backends.retriever().search(text, k, similarity_threshold)

    def search_image(self, image: Path, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        return self._backends.retriever().search_image(image, k, similarity_threshold)


def _backends(config: RunnableConfig | None) -> ServerBackends:
    return ServerBackends(dict((config or {}).get("configurable") or {}))


def imagerag(
    config: RunnableConfig | None = None,
) -> CompiledStateGraph[ImageRAGState, None, ImageRAGState, ImageRAGState]:
    """The ImageRAG graph for LangGraph Server, compiled without a checkpointer (the server has its own)."""
    backends = _backends(config)
    # The lazy stand-ins expose model_id and max_references as read-only properties, hence the casts.
    return build_imagerag_graph(
        cast(VisionLanguageModel, _LazyVLM(backends)),
        cast(ImageGenerator, _LazyGenerator(backends)),
        _LazyRetriever(backends),
        ArtifactStore(backends.artifacts_dir()),
    )


def genir(config: RunnableConfig | None = None) -> CompiledStateGraph[GenIRState, None, GenIRState, GenIRState]:
    """The GenIR graph for LangGraph Server; a person's feedback is an interrupt the client resumes."""
    backends = _backends(config)
    retriever: GenIRRetriever = _LazyRetriever(backends)
    return build_genir_graph(
        cast(VisionLanguageModel, _LazyVLM(backends)),
        cast(ImageGenerator, _LazyGenerator(backends)),
        retriever,
        ArtifactStore(backends.artifacts_dir()),
    )
