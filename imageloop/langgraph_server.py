"""The LangGraph Server / Studio face: the loops as the graphs `langgraph.json` names.

The server brings its own checkpointer, so none is compiled in; it loads this file by path and calls a
factory to run a graph, draw it or read its schemas. Everything the graphs run on is resolved when a
run needs it (`imageloop.app.deployment`): models and the index from the deployment's settings
(`IMAGELOOP_*`, `IMAGELOOP_INDEX`), per-run knobs, the index and the images folder from the run context,
which Studio shows as a form. A run's questions (interrupts) and answers name its images by the addresses the
server's own route serves (`imageloop.langgraph_http`), never by paths on the server.
"""

from __future__ import annotations

from langchain_core.runnables import RunnableConfig

from imageloop.app.deployment import (
    ContextArtifacts,
    ContextRetriever,
    LazyGenerator,
    LazyVLM,
    deployed_app,
    deployed_caption,
    deployed_context,
    deployed_file,
    deployed_publish,
    deployed_query_model,
    record_rage_run,
    record_run,
    served,
)
from imageloop.graphs.cir import CIRContext, CIRGraph, build_cir_graph
from imageloop.graphs.genir import GenIRContext, GenIRGraph, build_genir_graph
from imageloop.graphs.imagerag import ImageRAGContext, ImageRAGGraph, build_imagerag_graph
from imageloop.graphs.rage import RAGEContext, RAGEGraph, build_rage_graph
from imageloop.knobs import CIRKnobs, ImageRAGKnobs, RAGEKnobs, SimulatedUserKnobs


def imagerag(config: RunnableConfig | None = None) -> ImageRAGGraph:
    """The ImageRAG graph for LangGraph Server, compiled without a checkpointer (the server has its own)."""
    return build_imagerag_graph(
        LazyVLM(),  # type: ignore[arg-type]  # model_id is a property here
        LazyGenerator(),  # type: ignore[arg-type]
        ContextRetriever(),
        ContextArtifacts(),
        defaults=lambda: ImageRAGKnobs.from_settings(deployed_app().settings),
        context_schema=deployed_context(ImageRAGContext),
        on_finish=record_run,
        publish=deployed_publish,
    )


def genir(config: RunnableConfig | None = None) -> GenIRGraph:
    """The GenIR graph for LangGraph Server; a person's feedback is an interrupt the client resumes."""
    graph = build_genir_graph(
        LazyVLM(),  # type: ignore[arg-type]
        LazyGenerator(),  # type: ignore[arg-type]
        ContextRetriever(),
        ContextArtifacts(),
        defaults=lambda: SimulatedUserKnobs.from_settings(deployed_app().settings),
        context_schema=deployed_context(GenIRContext),
        paths=deployed_file,
        publish=deployed_publish,
    )
    return served(graph)


def cir(config: RunnableConfig | None = None) -> CIRGraph:
    """The composed image retrieval graph for LangGraph Server: input a reference image path and a change."""
    return build_cir_graph(
        LazyVLM(),  # type: ignore[arg-type]
        deployed_caption,
        LazyGenerator(),  # type: ignore[arg-type]  # drawn only when a run asks for a proxy
        ContextRetriever(),
        ContextArtifacts(),
        query_models=deployed_query_model,
        defaults=lambda: CIRKnobs.from_settings(deployed_app().settings),
        context_schema=deployed_context(CIRContext),
        paths=deployed_file,
        publish=deployed_publish,
    )


def rage(config: RunnableConfig | None = None) -> RAGEGraph:
    """The RAGE graph for LangGraph Server; a person's picks and reviews are interrupts Studio shows natively."""
    graph = build_rage_graph(
        LazyVLM(),  # type: ignore[arg-type]  # asked only by a critic review
        LazyGenerator(),  # type: ignore[arg-type]
        ContextRetriever(),
        ContextArtifacts(),
        defaults=lambda: RAGEKnobs.from_settings(deployed_app().settings),
        context_schema=deployed_context(RAGEContext),
        on_finish=record_rage_run,
        publish=deployed_publish,
    )
    return served(graph)
