"""Composed image retrieval (CIR) as a LangGraph state machine: a reference image and a change → the target.

```
START → prepare ─composed-query model→ retrieve
           └→ describe_reference → compose ─proxy→ generate_proxy → retrieve
                                        └─────────────────────────→ retrieve
retrieve ─checks left→ verify ─mismatch→ generate_proxy (proxy) or retrieve, with the rewritten description
   └→ finish               └─match / no answer→ finish
```

- describe_reference: the reference's sidecar caption (`NAME.txt`), else the captioner VLM's.
- compose: an LLM writes the description of the reference after the change (CIReVL, Karthik et al.,
  ICLR 2024: caption, recompose with an LLM, retrieve text→image; `imageloop.agents.composer`).
- generate_proxy (optional): the generator draws the edited description, with the reference as a
  reference image where the backend takes one, and the drawing becomes a second query. Scores are
  fused as Imagine-and-Seek does (Li, Ma & Yang, "Imagine and Seek: Improving Composed Image
  Retrieval with an Imagined Proxy", CVPR 2025; LeyRio/Imagine-and-Seek, src/retrieval_circo.py):
  S = λ·S_text + (1−λ)·S_text·S_proxy, λ settable (`fusion_lambda`; the released code uses 0.65 with
  ViT-L/14 and 0.3 with ViT-g/14). The proxy query is that code's robust proxy feature: the proxy
  image's embedding plus the reference image's and the text direction (edited minus reference
  description), each scaled to the proxy embedding's largest component, weights 1 as its script
  runs it; we normalise it, so S_proxy is a cosine like S_text. Fusion re-ranks the union of the
  text and proxy top `rerank_depth`, exactly (each candidate's stored vector is scored).
- composed-query model (`cir_model`): a trained Combiner (`imageloop.training`, CLIP4CIR's, trained as
  DAIG does) turns the reference image's vector and the change's text vector into one query vector (an
  SPRC model, a `PixelQueryModel`, reads the reference image and the change themselves);
  no description is written, so proxy and verify (which work on the description) are refused.
- verify (ours, beyond the papers): a VLM compares the top hit with the reference and the change and
  rewrites the description when the hit is wrong; the `verify` knob caps the checks.

The reference itself is never an answer (the context's `exclude_reference`, on by default; benchmarks switch it
off and follow their own protocol). The context's `rank_depth` asks for a deeper ranking of ids. State
holds paths, ids and scores; the proxy image is an artifact id.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol, runtime_checkable

import numpy as np
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer, Overwrite
from typing_extensions import TypedDict

from imageloop import limits
from imageloop.agents.composer import EditComposer, ResultVerifier
from imageloop.errors import ConfigError, ImageloopError, MalformedOutputError
from imageloop.graphs.steps import Publish, Step, kept, step
from imageloop.knobs import CIRKnobs, KnobContext, run_context
from imageloop.protocols import (
    Embedder,
    GenerationRequest,
    ImageGenerator,
    PathResolver,
    ReferenceImage,
    RetrievedImage,
    Vector,
    VisionLanguageModel,
    as_given,
)
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.images import content_id, open_image
from imageloop.tools.indexing.indexer import sidecar_caption
from imageloop.tracing import traced_generator, traced_vlm

Captioner = Callable[[Path], str]


class CIRRetriever(Protocol):
    """What CIR needs from retrieval: the embedder of the index, search by vector, and stored vectors."""

    @property
    def route(self) -> Literal["image", "caption"]: ...

    @property
    def embedder(self) -> Embedder: ...

    def search_vector(self, vector: Vector, k: int) -> list[RetrievedImage]: ...

    def stored_vectors(self, ids: Sequence[str]) -> dict[str, Vector]: ...


class ComposedQueryModel(Protocol):
    """A trained composed-query model (`imageloop.training.combiner.CIRModel`)."""

    def require_embedder(self, model_id: str) -> None: ...

    def embed_query(self, reference_image_vector: Vector, text_vector: Vector) -> Vector: ...


@runtime_checkable
class PixelQueryModel(ComposedQueryModel, Protocol):
    """A composed-query model that reads the reference image and the change themselves (SPRC's Q-Former fuses the
    reference's patch features with the change's tokens), rather than two stored vectors."""

    def embed_composed(self, reference: Path, change: str) -> Vector: ...


QueryModels = Callable[[str], ComposedQueryModel]
"""Loads the composed-query model of a folder (cached by the caller)."""


class Result(TypedDict):
    """One ranked image."""

    id: str
    path: str
    score: float


class Attempt(TypedDict):
    """One retrieval and what the verifier said of its top hit (None: not checked)."""

    description: str | None
    proxy_image: str | None
    top_id: str | None
    matches: bool | None


CIRContext = run_context(
    CIRKnobs,
    "CIRContext",
    rank_depth=(int | None, "an evaluation: also rank this many ids (the whole gallery)"),
    exclude_reference=(bool | None, "never return the reference image (default true; benchmarks keep it)"),
)
"""Per-run knobs (each unset one takes the graph's defaults, the settings') and, for an evaluation, its ranking."""


class CIRInput(TypedDict):
    """A composed query: a reference image (a path) and the change wanted."""

    reference: str
    change: str


class CIROutput(TypedDict, total=False):
    """The edited description, the ranked results and how the run went."""

    knobs: CIRKnobs
    reference: str
    change: str
    reference_description: str | None
    edited_description: str | None
    composed: bool
    proxy_image: str | None
    results: list[Result]
    ranking: list[str]
    verification: int
    attempts: list[Attempt]
    stop_reason: str | None
    steps: list[Step]


class CIRState(TypedDict, total=False):
    """The resolved knobs, the query and what the run found."""

    knobs: CIRKnobs
    rank_depth: int | None
    exclude_reference: bool
    reference: str
    change: str
    reference_id: str
    reference_description: str | None
    edited_description: str | None
    composed: bool
    proxy_image: str | None
    results: list[Result]
    ranking: list[str]
    verification: int
    verified: bool
    attempts: list[Attempt]
    stop_reason: str | None
    steps: Annotated[list[Step], operator.add]


FRESH_RUN: dict[str, Any] = {
    "reference_description": None,
    "edited_description": None,
    "composed": False,
    "proxy_image": None,
    "results": [],
    "ranking": [],
    "verification": 0,
    "verified": False,
    "attempts": [],
    "stop_reason": None,
}


def fuse_scores(text: Vector, proxy: Vector, fusion_lambda: float) -> Vector:
    """Imagine-and-Seek's balance: S = λ·S_text + (1−λ)·S_text·S_proxy, element-wise."""
    fused: Vector = fusion_lambda * text + (1.0 - fusion_lambda) * text * proxy
    return fused


def robust_proxy_query(proxy: Vector, reference: Vector, direction: Vector) -> Vector:
    """The proxy query: proxy image + reference image + text direction, each scaled to the proxy's largest value.

    Imagine-and-Seek's released code scales the reference feature and the direction (edited minus
    reference description) by max(proxy) / max(own) before adding them with weight 1; a vector with
    no positive component keeps its scale. The sum is normalised here.
    """
    peak = float(np.max(proxy))

    def scaled(vector: Vector) -> Vector:
        own = float(np.max(vector))
        return vector * (peak / own) if own > 0 and peak > 0 else vector

    query = proxy + scaled(reference) + scaled(direction)
    norm = float(np.linalg.norm(query))
    unit: Vector = np.asarray(query / norm if norm > 0 else proxy, dtype=np.float32)
    return unit


# Routing: pure functions of state.


def route_after_prepare(state: CIRState) -> Literal["retrieve", "describe_reference"]:
    """A composed-query model embeds the query itself; otherwise the reference is described first."""
    return "retrieve" if state["knobs"].cir_model else "describe_reference"


def route_to_retrieval(state: CIRState) -> Literal["generate_proxy", "retrieve"]:
    """With a proxy, the edited description is drawn before each retrieval."""
    return "generate_proxy" if state["knobs"].proxy else "retrieve"


def route_after_retrieve(state: CIRState) -> Literal["verify", "finish"]:
    """Check the top hit while checks are left."""
    return "verify" if state["results"] and state["verification"] < state["knobs"].verify else "finish"


def route_after_verify(state: CIRState) -> Literal["generate_proxy", "retrieve", "finish"]:
    """A rewritten description is searched again; a match (or no usable verdict) ends the run."""
    return "finish" if state["stop_reason"] else route_to_retrieval(state)


class _Nodes:
    """Node functions closed over the backends they call."""

    def __init__(
        self,
        llm: VisionLanguageModel,
        captioner: Captioner,
        generator: ImageGenerator | None,
        retriever: CIRRetriever,
        artifacts: ArtifactStore,
        query_models: QueryModels | None,
        defaults: CIRKnobs | Callable[[], CIRKnobs],
        paths: PathResolver,
        publish: Publish = kept,
    ) -> None:
        self.publish = publish
        # Every model call becomes a run in the graph's trace (LangSmith, callback handlers).
        llm = traced_vlm(llm)
        self.composer = EditComposer(llm)
        self.verifier = ResultVerifier(llm)
        self.captioner = captioner
        self.generator = traced_generator(generator) if generator is not None else None
        self.retriever = retriever
        self.artifacts = artifacts
        self.query_models = query_models
        self._defaults = defaults
        self.paths = paths

    def prepare(self, state: CIRState, runtime: Runtime[KnobContext]) -> dict[str, Any]:
        """Resolve and check the knobs against what this index and these backends can do; reset the run."""
        started = time.perf_counter()
        defaults = self._defaults() if callable(self._defaults) else self._defaults
        knobs = defaults.overridden(runtime.context)
        rank_depth = getattr(runtime.context, "rank_depth", None)
        exclude_reference = getattr(runtime.context, "exclude_reference", None)
        if rank_depth is not None:
            limits.check("rank_depth", rank_depth)
        reference = self.paths(str(state.get("reference") or ""), "reference")
        if not reference.is_file():
            raise ImageloopError(f"reference image {reference} does not exist")
        change = limits.check_text("change", str(state.get("change") or ""))
        embedder = self.retriever.embedder
        if knobs.cir_model:
            if knobs.proxy or knobs.verify:
                raise ConfigError("a composed-query model writes no description: `proxy` and `verify` need one")
            if self.query_models is None:
                raise ConfigError("this graph was built without a way to load composed-query models")
            self.query_models(knobs.cir_model).require_embedder(embedder.model_id)
        if (knobs.cir_model or knobs.proxy) and (self.retriever.route != "image" or not embedder.embeds_images):
            what = "a composed-query model" if knobs.cir_model else "the proxy image"
            raise ConfigError(f"{what} searches image embeddings: use an index built with an image embedder")
        if knobs.proxy and self.generator is None:
            raise ConfigError("the proxy image is drawn: configure a `generator`")
        decision = "composed-query model" if knobs.cir_model else "describe, compose" + (", proxy" * knobs.proxy)
        record = step("prepare", 0, decision, started, knobs=knobs.record())
        return {
            "reference": str(reference),
            "change": change,
            "reference_id": content_id(reference),
            "knobs": knobs,
            "rank_depth": rank_depth,
            "exclude_reference": exclude_reference is not False,
            **FRESH_RUN,
            "steps": Overwrite([record]),
        }

    def describe_reference(self, state: CIRState) -> dict[str, Any]:
        """The reference's sidecar caption, else the captioner's."""
        started = time.perf_counter()
        reference = Path(state["reference"])
        sidecar = sidecar_caption(reference, reference.parent)
        description = sidecar if sidecar else self.captioner(reference)
        how = "read the sidecar caption" if sidecar else "captioned the reference"
        record = step("describe_reference", 0, how, started, description=description)
        return {"reference_description": description, "steps": [record]}

    def compose(self, state: CIRState) -> dict[str, Any]:
        """The description of the reference after the change (CIReVL's recipe)."""
        started = time.perf_counter()
        composed = self.composer.compose(str(state["reference_description"]), state["change"])
        decision = "composed the edited description" if composed.composed else "no edited description: the change"
        record = step("compose", 0, decision, started, edited_description=composed.text)
        return {"edited_description": composed.text, "composed": composed.composed, "steps": [record]}

    def generate_proxy(self, state: CIRState) -> dict[str, Any]:
        """Draw the edited description (with the reference as a reference image where the backend takes one)."""
        started = time.perf_counter()
        assert self.generator is not None  # prepare refuses a proxy without a generator
        references: tuple[ReferenceImage, ...] = ()
        if self.generator.max_references > 0:
            reference = ReferenceImage(
                Path(state["reference"]), "the reference image", caption=state["reference_description"] or ""
            )
            references = (reference,)
        request = GenerationRequest(
            prompt=str(state["edited_description"]),
            references=references,
            seed=state["knobs"].seed,
            size=state["knobs"].size,
            steps=state["knobs"].steps,
        )
        artifact = self.artifacts.put(self.generator.generate(request).image)
        record = step(
            "generate_proxy", state["verification"], "drew the edited description", started, artifact=artifact
        )
        return {"proxy_image": artifact, "steps": [record]}

    def _reference_vector(self, state: CIRState) -> Vector:
        """The reference's stored vector when the index holds it, else its embedding."""
        stored = self.retriever.stored_vectors([state["reference_id"]]).get(state["reference_id"])
        if stored is not None:
            return stored
        embedded: Vector = self.retriever.embedder.embed_images([open_image(Path(state["reference"]))])[0]
        return embedded

    def retrieve(self, state: CIRState) -> dict[str, Any]:
        """Rank the index by the composed vector, the edited description, or both fused with the proxy."""
        started = time.perf_counter()
        excluded = state["reference_id"] if state["exclude_reference"] else None
        knobs = state["knobs"]
        depth = max(knobs.k, state["rank_depth"] or 0) + (1 if excluded else 0)
        embedder = self.retriever.embedder
        if knobs.cir_model:
            assert self.query_models is not None  # prepare checked it
            model = self.query_models(knobs.cir_model)
            if isinstance(model, PixelQueryModel):
                query = model.embed_composed(Path(state["reference"]), state["change"])
            else:
                text = embedder.embed_texts([state["change"]])[0]
                query = model.embed_query(self._reference_vector(state), text)
            ranked = [(hit, float(hit.score)) for hit in self.retriever.search_vector(query, depth)]
            how = "composed-query model"
        elif not knobs.proxy:
            query = embedder.embed_texts([str(state["edited_description"])])[0]
            ranked = [(hit, float(hit.score)) for hit in self.retriever.search_vector(query, depth)]
            how = "text→image with the edited description"
        else:
            ranked = self._fused(state, max(depth, knobs.rerank_depth))
            how = f"text and proxy fused (λ={knobs.fusion_lambda:g})"
        ranked = [(hit, score) for hit, score in ranked if hit.id != excluded]
        results = [Result(id=hit.id, path=str(hit.path), score=round(score, 6)) for hit, score in ranked[: knobs.k]]
        ranking = [hit.id for hit, _ in ranked[: state["rank_depth"]]] if state["rank_depth"] else []
        attempt = Attempt(
            description=state["edited_description"],
            proxy_image=state["proxy_image"],
            top_id=results[0]["id"] if results else None,
            matches=None,
        )
        record = step("retrieve", state["verification"], how, started, top=[r["id"] for r in results])
        reason = None if results else "no results"
        return {
            "results": results,
            "ranking": ranking,
            "attempts": [*state["attempts"], attempt],
            "stop_reason": reason,
            "steps": [record],
        }

    def _fused(self, state: CIRState, depth: int) -> list[tuple[RetrievedImage, float]]:
        """The union of the text and proxy top `depth`, each scored exactly and fused, best first."""
        embedder = self.retriever.embedder
        edited, described = embedder.embed_texts(
            [str(state["edited_description"]), str(state["reference_description"])]
        )
        proxy = embedder.embed_images([self.artifacts.open(str(state["proxy_image"]))])[0]
        proxy_query = robust_proxy_query(proxy, self._reference_vector(state), edited - described)
        candidates: dict[str, RetrievedImage] = {}
        for query in (edited, proxy_query):
            for hit in self.retriever.search_vector(query, depth):
                candidates.setdefault(hit.id, hit)
        stored = self.retriever.stored_vectors(list(candidates))
        ids = [i for i in candidates if i in stored]
        if not ids:
            return []
        vectors = np.stack([stored[i] for i in ids]).astype(np.float32)
        fused = fuse_scores(vectors @ edited, vectors @ proxy_query, state["knobs"].fusion_lambda)
        order = np.argsort(-fused, kind="stable")
        return [(candidates[ids[i]], float(fused[i])) for i in order]

    def verify(self, state: CIRState) -> dict[str, Any]:
        """Ask the VLM whether the top hit is the reference after the change; rewrite the description if not."""
        started = time.perf_counter()
        top = state["results"][0]
        description = str(state["edited_description"])
        attempts = list(state["attempts"])
        try:
            verdict = self.verifier.verify(Path(state["reference"]), Path(top["path"]), state["change"], description)
        except MalformedOutputError as e:
            record = step("verify", state["verification"], f"the verifier gave no answer ({e})", started)
            return {"stop_reason": "verifier gave no answer", "steps": [record]}
        attempts[-1] = Attempt(**{**attempts[-1], "matches": verdict.matches})
        if verdict.matches:
            record = step("verify", state["verification"], f"top hit {top['id'][:12]} matches", started)
            return {"verified": True, "verification": state["verification"] + 1, "attempts": attempts,
                    "stop_reason": "verified", "steps": [record]}  # fmt: skip
        record = step("verify", state["verification"], "top hit is wrong: rewrote the description", started,
                      description=verdict.description)  # fmt: skip
        return {
            "edited_description": verdict.description,
            "verification": state["verification"] + 1,
            "attempts": attempts,
            "steps": [record],
        }

    def finish(self, state: CIRState) -> dict[str, Any]:
        """Say why the run stopped."""
        started = time.perf_counter()
        reason = state.get("stop_reason") or (
            "max_verifications" if state["knobs"].verify and not state.get("verified") else "retrieved"
        )
        record = step("finish", state["verification"], f"stop: {reason}", started, results=len(state["results"]))
        update: dict[str, Any] = {"stop_reason": reason, "steps": [record]}
        if self.publish is not kept:  # the answer as its reader names images: the proxy drawn by its file
            proxy = self.artifacts.file(state.get("proxy_image"))
            update |= self.publish(
                {"results": state["results"], "proxy_image": proxy, "steps": [*state["steps"], record]}
            )
            update["steps"] = Overwrite(update["steps"])
        return update


CIRGraph = CompiledStateGraph[CIRState, KnobContext, CIRInput, CIROutput]


def build_cir_graph(
    llm: VisionLanguageModel,
    captioner: Captioner,
    generator: ImageGenerator | None,
    retriever: CIRRetriever,
    artifacts: ArtifactStore,
    checkpointer: Checkpointer = None,
    *,
    query_models: QueryModels | None = None,
    defaults: CIRKnobs | Callable[[], CIRKnobs] | None = None,
    context_schema: type[KnobContext] = CIRContext,
    paths: PathResolver = as_given,
    publish: Publish = kept,
) -> CIRGraph:
    """Wire the CIR loop: `llm` composes and verifies, `captioner` describes a reference without a sidecar.

    `generator` may be None when no run asks for a proxy; `query_models` loads a run's `cir_model`.
    `defaults` (or a function returning them, read when a run starts) are the knobs a run's context
    leaves unset; `paths` resolves the reference (a face confines it to its roots); `publish` names the images
    of the answer (see `Publish`).
    """
    nodes = _Nodes(
        llm, captioner, generator, retriever, artifacts, query_models, defaults or CIRKnobs(), paths, publish
    )
    graph = StateGraph(CIRState, context_schema=context_schema, input_schema=CIRInput, output_schema=CIROutput)
    graph.add_node("prepare", nodes.prepare)
    graph.add_node("describe_reference", nodes.describe_reference)
    graph.add_node("compose", nodes.compose)
    graph.add_node("generate_proxy", nodes.generate_proxy)
    graph.add_node("retrieve", nodes.retrieve)
    graph.add_node("verify", nodes.verify)
    graph.add_node("finish", nodes.finish)
    graph.add_edge(START, "prepare")
    graph.add_conditional_edges("prepare", route_after_prepare, ["retrieve", "describe_reference"])
    graph.add_edge("describe_reference", "compose")
    graph.add_conditional_edges("compose", route_to_retrieval, ["generate_proxy", "retrieve"])
    graph.add_edge("generate_proxy", "retrieve")
    graph.add_conditional_edges("retrieve", route_after_retrieve, ["verify", "finish"])
    graph.add_conditional_edges("verify", route_after_verify, ["generate_proxy", "retrieve", "finish"])
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=checkpointer, name="cir")
