"""What a deployed graph (LangGraph Server, Studio) runs on: the application resolved at run time.

A server builds a graph to run it, and also to draw it or read its schemas, so nothing here is
configured at build time: the process-wide `App` (settings from `IMAGELOOP_*`, paths confined to
`IMAGELOOP_ROOTS`, default the working directory) is created when a node first needs a model or an
index. The run context (each loop's knobs, `deployed_context`) names the index and where images go, and
knobs a run leaves unset take the deployment's settings. Every finished ImageRAG or RAGE run writes its record under
`<runs>/server/<run id>/run.json`, as the CLI does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import get_runtime
from langgraph.types import Command
from pydantic import Field, create_model

from imageloop.app.core import App
from imageloop.app.links import HTTP_BASE, Links
from imageloop.app.rage import rage_record
from imageloop.app.runs import imagerag_record, new_run_id
from imageloop.errors import ConfigError
from imageloop.files import write_json_atomic
from imageloop.graphs.cir import ComposedQueryModel
from imageloop.knobs import KnobContext
from imageloop.limits import PATH_CHARS
from imageloop.protocols import (
    GREEDY,
    Decoding,
    Embedder,
    GenerationRequest,
    GenerationResult,
    Message,
    RetrievedImage,
    Vector,
)
from imageloop.report import write_report
from imageloop.tools.artifacts import ArtifactStore

INDEX_ENV = "IMAGELOOP_INDEX"
ARTIFACTS_ENV = "IMAGELOOP_ARTIFACTS"

_app: App | None = None
_app_lock = threading.Lock()


def deployed_app() -> App:
    """The process's application, created from the environment on first use."""
    global _app
    with _app_lock:
        if _app is None:
            _app = App.from_environment()
        return _app


def close_deployed_app() -> None:
    """Close the process's application; the next run creates it again from the environment (tests, reloads)."""
    global _app
    with _app_lock:
        if _app is not None:
            _app.close()
        _app = None


def deployed_publish(value: Any) -> Any:
    """How a server run names its images to its remote clients: addresses on the server's own route, never paths."""
    return Links(deployed_app(), HTTP_BASE).publish(value)


def deployed_context(base: type[KnobContext]) -> type[KnobContext]:
    """A graph's run context plus where a server run searches (`index`) and keeps its images (`artifacts_dir`)."""
    where: dict[str, Any] = {
        "index": (
            str | None,
            Field(None, max_length=PATH_CHARS, description=f"an indexed image folder (${INDEX_ENV})"),
        ),
        "artifacts_dir": (str | None, Field(None, max_length=PATH_CHARS, description="where drawn images are kept")),
    }
    return create_model(f"Deployed{base.__name__}", __base__=base, **where)


class ServedGraph(CompiledStateGraph[Any, Any, Any, Any]):
    """A compiled graph as LangGraph Server runs it: a resume that answers nothing (`Command(resume=None)`, which
    LangGraph itself fails on with an internal error) is refused in one line, and the question stays asked."""

    def stream(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override, unused-ignore]
        """`CompiledStateGraph.stream`, once the input answers something."""
        return super().stream(_answering(input), *args, **kwargs)

    def astream(self, input: Any, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override, unused-ignore]
        """`CompiledStateGraph.astream`, once the input answers something."""
        return super().astream(_answering(input), *args, **kwargs)


Served = TypeVar("Served", bound=CompiledStateGraph[Any, Any, Any, Any])


def served(graph: Served) -> Served:
    """`graph` as a `ServedGraph` (what `copy` does, with the served class)."""
    attributes = {name: value for name, value in graph.__dict__.items() if name != "__orig_class__"}
    return cast(Served, ServedGraph(**attributes))


def _answering(given: Any) -> Any:
    if isinstance(given, Command) and given.resume is None and given.update is None and not given.goto:
        raise ConfigError("Command(resume=None) answers nothing: resume with an answer to the question the run asks")
    return given


def _context_value(name: str) -> Any:
    context = get_runtime().context
    return getattr(context, name, None) if context is not None else None


def _index() -> str:
    value = _context_value("index") or os.environ.get(INDEX_ENV)
    if not value:
        raise ConfigError(f"no index: set {INDEX_ENV}=FOLDER for the server or pass context.index in the run")
    return str(value)


class LazyVLM:
    """The configured VLM, built on its first call."""

    @property
    def model_id(self) -> str:
        return deployed_app().vlm().model_id

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        return deployed_app().vlm().chat(messages, json_schema, decoding)


class LazyGenerator:
    """The configured generator, built on its first call."""

    @property
    def model_id(self) -> str:
        return deployed_app().generator().model_id

    @property
    def max_references(self) -> int:
        return deployed_app().generator().max_references

    def generate(self, request: GenerationRequest) -> GenerationResult:
        return deployed_app().generator().generate(request)


class ContextRetriever:
    """Retrieval over the run's index (context.index, else IMAGELOOP_INDEX), opened once per index."""

    @property
    def route(self) -> Literal["image", "caption"]:
        return deployed_app().retriever(_index()).route

    def search(
        self, text: str, k: int, similarity_threshold: float | None = None, where: Mapping[str, Any] | None = None
    ) -> list[RetrievedImage]:
        return deployed_app().retriever(_index()).search(text, k, similarity_threshold, where)

    def search_image(self, image: Path, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]:
        return deployed_app().retriever(_index()).search_image(image, k, similarity_threshold)

    @property
    def embedder(self) -> Embedder:
        return deployed_app().retriever(_index()).embedder

    def search_vector(self, vector: Vector, k: int) -> list[RetrievedImage]:
        return deployed_app().retriever(_index()).search_vector(vector, k)

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, Vector]:
        return deployed_app().retriever(_index()).stored_vectors(ids)


def deployed_caption(image: Path) -> str:
    """The deployment's captioner (the captioner role, else the VLM) describing `image`."""
    from imageloop.agents.captioner import VLMCaptioner

    return VLMCaptioner(deployed_app().vlm(role="captioner"))(image)


def deployed_file(text: str, what: str) -> Path:
    """A graph input naming an image (a CIR reference, a GenIR target), confined to the deployment's roots."""
    return deployed_app().file_path(text, what)


def deployed_query_model(folder: str) -> ComposedQueryModel:
    """A run's composed-query model, its folder confined to the deployment's roots."""
    from imageloop.app.cir import load_query_model

    return load_query_model(str(deployed_app().path(folder, "cir_model", kind="dir")))


class ContextArtifacts(ArtifactStore):
    """Images of the run: context.artifacts_dir, else IMAGELOOP_ARTIFACTS, else `<runs>/server/artifacts`."""

    def __init__(self) -> None:
        """No fixed root: each run names its own."""

    @property
    def root(self) -> Path:
        value = _context_value("artifacts_dir") or os.environ.get(ARTIFACTS_ENV)
        app = deployed_app()
        return app.path(value, "artifacts_dir") if value else app.runs_dir / "server" / "artifacts"


def record_run(state: Mapping[str, Any]) -> None:
    """Write a finished server run's record and report, as the CLI does for its runs."""
    app = deployed_app()
    run_dir = app.runs_dir / "server" / new_run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    seconds = sum(float(step["seconds"]) for step in state.get("steps", []))
    index = app.index(_index()).root
    record = {**imagerag_record(state, app.settings, run_dir, ContextArtifacts(), index, seconds), "status": "finished"}
    write_json_atomic(run_dir / "run.json", {**record, "finished_at": time.time()})
    write_report(run_dir, record)


def record_rage_run(state: Mapping[str, Any]) -> None:
    """Write a finished server RAGE run's record and report (with its final.png), as the CLI does."""
    app = deployed_app()
    run_dir = app.runs_dir / "server" / new_run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    record = rage_record(
        state, run_id=run_dir.name, out_dir=run_dir, artifacts=ContextArtifacts(), index=app.index(_index()).root,
        settings=app.settings, status="finished",
    )  # fmt: skip
    write_json_atomic(run_dir / "run.json", {**record, "finished_at": time.time()})
    write_report(run_dir, record)
