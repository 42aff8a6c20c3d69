"""ImageRAG as a LangGraph state machine.

```
START ─draft_first→ generate_draft → critic ─aligned / iteration == max_iterations→ finish
  └─generation→ critic (plans concepts)   ├─rephrase_only→ rephrase → generate_with_references
                                          └─not aligned→ rewrite → retrieve ×N (Send, one per caption)
                                              → compose ─no reference above threshold→ finish
                                                   └→ generate_with_references → critic …
                                                        (or → finish at the cap, without judge_last)
```
State holds artifact ids and small metadata only (never pixels). Caps live in state; routing
functions are pure functions of state. Every node appends a `Step` recording its decision and time.

A run is asked `ImageRAGInput` (the prompt) with per-run knobs in the run context (`ImageRAGContext`),
answers `ImageRAGOutput`, and `prepare` resets every per-run field: two runs on one thread (LangGraph
Server and Studio reuse threads) are as independent as two runs on two threads.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer, Overwrite, Send
from typing_extensions import TypedDict

from imageloop import limits
from imageloop.agents.critic import Critic, Critique, ImageCritic, PaperCritic
from imageloop.agents.rephraser import Rephraser
from imageloop.agents.reranker import RERANK_CANDIDATES, Reranker
from imageloop.agents.rewriter import QueryRewriter
from imageloop.errors import MalformedOutputError
from imageloop.graphs.steps import Publish, Step, kept, step
from imageloop.knobs import ImageRAGKnobs, KnobContext, ReferenceTrim, Rerank
from imageloop.protocols import (
    GenerationRequest,
    ImageGenerator,
    ImageRetriever,
    ReferenceImage,
    VisionLanguageModel,
)
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tracing import traced_generator, traced_retriever, traced_vlm


class CaptionQuery(TypedDict):
    """A retrieval caption and the missing concept it stands for."""

    concept: str
    caption: str


class Hit(TypedDict):
    """A retrieved image for one caption in one iteration."""

    iteration: int
    concept: str
    query: str
    id: str
    path: str
    caption: str
    score: float


class GeneratedImage(TypedDict):
    """An image the loop produced; `missing` is the critic's count (None until judged)."""

    artifact: str
    iteration: int
    prompt_used: str
    aligned: bool | None
    missing: int | None
    references: list[str]


ImageRAGContext = ImageRAGKnobs.context_schema()
"""Per-run knobs (LangGraph run context): each unset one takes the graph's defaults (the settings')."""


class ImageRAGInput(TypedDict):
    """What a run is asked: the prompt (knobs come through the context)."""

    prompt: str


class ImageRAGOutput(TypedDict, total=False):
    """What a run answers: the knobs it ran with, the outcome, the images by artifact id, and every decision."""

    knobs: ImageRAGKnobs
    prompt: str
    aligned: bool
    iteration: int
    draft_image: str | None
    final_image: str | None
    stop_reason: str | None
    images: list[GeneratedImage]
    references: list[Hit]
    missing_concepts: list[str]
    retrieval_captions: list[CaptionQuery]
    steps: list[Step]


class ImageRAGState(TypedDict, total=False):
    """The prompt, the resolved knobs and everything the loop decided so far."""

    knobs: ImageRAGKnobs
    prompt: str
    iteration: int
    current_image: str | None
    draft_image: str | None
    images: list[GeneratedImage]
    aligned: bool
    critic_failed: bool
    decision_answer: str | None
    rephrased_prompt: str | None
    missing_concepts: list[str]
    critic_captions: list[CaptionQuery]
    retrieval_captions: list[CaptionQuery]
    hits: Annotated[list[Hit], operator.add]
    references: list[Hit]
    final_image: str | None
    stop_reason: str | None
    steps: Annotated[list[Step], operator.add]


class RetrieveTask(TypedDict):
    """What one parallel retrieval branch receives through `Send`."""

    query: CaptionQuery
    iteration: int
    top_k: int
    similarity_threshold: float | None
    rerank: Rerank


# Every per-run field a run starts from, so a second run on the same thread inherits nothing.
FRESH_RUN: dict[str, Any] = {
    "iteration": 0,
    "current_image": None,
    "draft_image": None,
    "images": [],
    "aligned": False,
    "critic_failed": False,
    "decision_answer": None,
    "rephrased_prompt": None,
    "missing_concepts": [],
    "critic_captions": [],
    "retrieval_captions": [],
    "references": [],
    "final_image": None,
    "stop_reason": None,
}


# Routing: pure functions of state.


def route_start(state: ImageRAGState) -> Literal["generate_draft", "critic", "rephrase"]:
    """Draft-first critiques a draft; generation mode asks the critic to plan concepts first (or, rephrasing
    only, has the prompt rephrased from the prompt alone)."""
    if state["knobs"].mode == "draft_first":
        return "generate_draft"
    return "rephrase" if state["knobs"].rephrase_only else "critic"


def route_after_critic(
    state: ImageRAGState,
) -> Literal["finish", "rephrase", "rewrite", "generate_with_references"]:
    """Stop when aligned or capped; rephrase in the rephrase-only ablation; generate directly when a plan needs no
    references."""
    if state.get("aligned"):
        return "finish"
    if state["iteration"] >= state["knobs"].max_iterations:
        return "finish"
    if state["knobs"].rephrase_only:
        return "rephrase"
    planning = state.get("current_image") is None
    if planning and not state["missing_concepts"] and not state.get("critic_failed"):
        return "generate_with_references"
    return "rewrite"


def fan_out_retrieval(state: ImageRAGState) -> list[Send]:
    """One retrieval branch per caption, run in parallel."""
    return [
        Send(
            "retrieve",
            RetrieveTask(
                query=query,
                iteration=state["iteration"],
                top_k=state["knobs"].top_k,
                similarity_threshold=state["knobs"].similarity_threshold,
                rerank=state["knobs"].rerank,
            ),
        )
        for query in state["retrieval_captions"]
    ]


def route_after_compose(state: ImageRAGState) -> Literal["finish", "generate_with_references"]:
    """Without a usable reference there is nothing to regenerate with, unless no image exists yet."""
    if state["references"] or state.get("current_image") is None:
        return "generate_with_references"
    return "finish"


def route_after_generation(state: ImageRAGState) -> Literal["critic", "finish"]:
    """The critic judges each regeneration, the last one too unless `judge_last` is off (the released code)."""
    if not state["knobs"].judge_last and state["iteration"] >= state["knobs"].max_iterations:
        return "finish"
    return "critic"


def concept_limit(knobs: ImageRAGKnobs, generator_references: int, planning: bool) -> int | None:
    """How many missing concepts the critic may name: `max_concepts`; unset, as the released scripts ask. SDXL's
    (a generator taking one reference) asks a draft's critic for one (imageRAG_SDXL.py l.96); OmniGen's never
    passes its limit, and generation mode asks with none (utils.py l.88-89 is the draft's question only)."""
    if knobs.max_concepts is not None:
        return knobs.max_concepts
    return 1 if generator_references == 1 and not planning else None


def best_image(images: Sequence[GeneratedImage]) -> GeneratedImage | None:
    """An aligned image if any, else the one with fewest missing concepts; ties go to the latest."""
    if not images:
        return None

    def rank(position_and_image: tuple[int, GeneratedImage]) -> tuple[int, float, int]:
        position, image = position_and_image
        missing = float("inf") if image["missing"] is None else image["missing"]
        return (0 if image["aligned"] else 1, missing, -position)

    return min(enumerate(images), key=rank)[1]


def select_references(
    hits: list[Hit], max_references: int, trim: ReferenceTrim = "score"
) -> tuple[list[Hit], list[Hit]]:
    """Deduplicate by image (keeping its best score) and trim to the generator's capacity: the lowest-scoring go
    (ours), or those past the first `max_references` in caption order (the released scripts, `trim="order"`).

    Returns (kept, trimmed), kept in caption order so the composed prompt lists concepts as asked.
    """
    best: dict[str, Hit] = {}
    for hit in hits:
        if hit["id"] not in best or hit["score"] > best[hit["id"]]["score"]:
            best[hit["id"]] = hit
    unique = list(best.values())
    ranked = unique if trim == "order" else sorted(unique, key=lambda h: h["score"], reverse=True)
    keep_ids = {h["id"] for h in ranked[:max_references]}
    kept = [h for h in unique if h["id"] in keep_ids]
    trimmed = ranked[max_references:]
    return kept, trimmed


class _Nodes:
    """The node functions, closed over the backends they call."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        generator: ImageGenerator,
        retriever: ImageRetriever,
        artifacts: ArtifactStore,
        defaults: ImageRAGKnobs | Callable[[], ImageRAGKnobs],
        on_finish: Callable[[ImageRAGState], None] | None = None,
        publish: Publish = kept,
    ) -> None:
        self._defaults = defaults
        self.on_finish = on_finish
        self.publish = publish
        # Every model call and search becomes a run in the graph's trace (LangSmith, callback handlers).
        self.vlm = traced_vlm(vlm)
        self.rewriter = QueryRewriter(self.vlm)
        self.rephraser = Rephraser(self.vlm)
        self.reranker = Reranker(self.vlm)
        self.generator = traced_generator(generator)
        self.retriever = traced_retriever(retriever)
        self.artifacts = artifacts

    def prepare(self, state: ImageRAGState, runtime: Runtime[KnobContext]) -> dict[str, Any]:
        """Check the prompt, resolve the knobs and reset every per-run field (a reused thread starts clean)."""
        started = time.perf_counter()
        prompt = limits.check_text("prompt", str(state.get("prompt") or ""))
        defaults = self._defaults() if callable(self._defaults) else self._defaults
        knobs = defaults.overridden(runtime.context)
        record = step("prepare", 0, f"mode {knobs.mode}", started, knobs=knobs.record())
        return {"prompt": prompt, "knobs": knobs, **FRESH_RUN, "hits": Overwrite([]), "steps": Overwrite([record])}

    def _generate(
        self, state: ImageRAGState, references: tuple[ReferenceImage, ...], iteration: int, prompt: str | None = None
    ) -> GeneratedImage:
        request = GenerationRequest(
            prompt=prompt or state["prompt"],
            references=references,
            seed=state["knobs"].seed,
            size=state["knobs"].size,
            steps=state["knobs"].steps,
        )
        result = self.generator.generate(request)
        return GeneratedImage(
            artifact=self.artifacts.put(result.image),
            iteration=iteration,
            prompt_used=result.prompt_used,
            aligned=None,
            missing=None,
            references=[str(r.path) for r in references],
        )

    def generate_draft(self, state: ImageRAGState) -> dict[str, Any]:
        """Text-only draft; the critic judges it next."""
        started = time.perf_counter()
        image = self._generate(state, (), iteration=0)
        record = step("generate_draft", 0, "drew a draft from the prompt alone", started, artifact=image["artifact"])
        return {
            "current_image": image["artifact"],
            "draft_image": image["artifact"],
            "images": [*state["images"], image],
            "steps": [record],
        }

    def _critic(self, state: ImageRAGState) -> ImageCritic:
        if state["knobs"].critic == "paper":
            return PaperCritic(self.vlm)
        return Critic(self.vlm, plan_scope=state["knobs"].plan_scope)

    def critic_node(self, state: ImageRAGState) -> dict[str, Any]:
        """Judge the current image, or plan concepts when there is none yet (generation mode)."""
        started = time.perf_counter()
        iteration = state["iteration"]
        current = state.get("current_image")
        image = self.artifacts.path(current) if current is not None else None
        knobs = state["knobs"]
        try:
            if knobs.rephrase_only and knobs.critic == "paper" and image is not None:
                return self._decide(state, image, started)  # the released ablation asks the decision alone
            limit = concept_limit(knobs, self.generator.max_references, planning=image is None)
            critique: Critique = self._critic(state).critique(state["prompt"], image, limit)
        except MalformedOutputError as e:
            decision = "critic could not answer: retrieve with the raw prompt"
            record = step("critic", iteration, decision, started, error=str(e))
            return {
                "aligned": False,
                "critic_failed": True,
                "missing_concepts": [],
                "critic_captions": [],
                "steps": [record],
            }
        concepts = critique.missing_concepts
        captions = [CaptionQuery(concept=c.concept, caption=c.caption) for c in critique.retrieval_captions]
        update: dict[str, Any] = {"critic_failed": False, "missing_concepts": concepts, "critic_captions": captions}
        if image is None:
            decision = f"prompt needs references for {concepts}" if concepts else "prompt needs no references"
            record = step("critic", iteration, decision, started, missing_concepts=concepts)
            return {**update, "aligned": False, "steps": [record]}
        images = [
            GeneratedImage(**{**img, "aligned": critique.aligned, "missing": len(concepts)})
            if img["artifact"] == current and img["aligned"] is None
            else img
            for img in state["images"]
        ]
        if critique.aligned:
            decision = "aligned with the prompt"
        elif iteration >= state["knobs"].max_iterations:
            decision = f"not aligned, missing {concepts}; iteration cap reached"
        else:
            decision = f"not aligned, missing {concepts}"
        record = step("critic", iteration, decision, started, aligned=critique.aligned, missing_concepts=concepts)
        return {**update, "aligned": critique.aligned, "images": images, "steps": [record]}

    def _decide(self, state: ImageRAGState, image: Path, started: float) -> dict[str, Any]:
        """The paper critic's decision alone, its answer kept for the rephrasing that follows in its conversation."""
        aligned, answer = PaperCritic(self.vlm).decide(state["prompt"], image)
        images = [
            GeneratedImage(**{**img, "aligned": aligned}) if img["artifact"] == state.get("current_image") else img
            for img in state["images"]
        ]
        decision = "aligned with the prompt" if aligned else "not aligned: rephrase the prompt"
        record = step("critic", state["iteration"], decision, started, aligned=aligned, answer=answer)
        return {
            "aligned": aligned,
            "critic_failed": False,
            "decision_answer": answer,
            "missing_concepts": [],
            "critic_captions": [],
            "images": images,
            "steps": [record],
        }

    def rephrase(self, state: ImageRAGState) -> dict[str, Any]:
        """The rephrase-only ablation: the VLM rewrites the prompt (after the decision, seeing the draft) and
        nothing is retrieved; an unusable answer keeps the prompt."""
        started = time.perf_counter()
        current = state.get("current_image")
        image = self.artifacts.path(current) if current is not None else None
        try:
            prompt = self.rephraser.rephrase(state["prompt"], image, state.get("decision_answer")) or state["prompt"]
            decision = "rephrased the prompt"
        except MalformedOutputError as e:
            prompt = state["prompt"]
            decision = f"could not rephrase ({e}): keep the prompt"
        record = step("rephrase", state["iteration"], decision, started, rephrased_prompt=prompt)
        return {"rephrased_prompt": prompt, "references": [], "steps": [record]}

    def rewrite(self, state: ImageRAGState) -> dict[str, Any]:
        """One retrieval query per missing concept: the detailed caption (the paper's), or, as ablations,
        the concept word or the raw prompt; the raw prompt when the critic named nothing."""
        started = time.perf_counter()
        prompt, concepts = state["prompt"], state["missing_concepts"]
        if state.get("critic_failed") or not concepts or state["knobs"].retrieval_query == "prompt":
            queries = [CaptionQuery(concept=prompt, caption=prompt)]
            decision = "retrieve with the raw prompt" + ("" if concepts else ": no concepts named")
        elif state["knobs"].retrieval_query == "concept":
            queries = [CaptionQuery(concept=c, caption=c) for c in concepts]
            decision = f"retrieve with {len(queries)} concept word(s)"
        elif state.get("critic_captions"):
            queries = list(state["critic_captions"])
            decision = f"the critic wrote {len(queries)} retrieval caption(s)"
        else:
            try:
                queries = [
                    CaptionQuery(concept=c.concept, caption=c.caption)
                    for c in self.rewriter.write_captions(prompt, concepts)
                ]
                decision = f"wrote {len(queries)} retrieval caption(s)"
            except MalformedOutputError as e:
                queries = [CaptionQuery(concept=c, caption=c) for c in concepts]
                decision = f"rewriter could not answer ({e}): retrieve with the concept words"
        record = step("rewrite", state["iteration"], decision, started, retrieval_captions=queries)
        return {"retrieval_captions": queries, "steps": [record]}

    def retrieve(self, task: RetrieveTask) -> dict[str, Any]:
        """Search the index for one caption; keep hits at or above the similarity threshold (with `rerank`, the
        ones a VLM picks among the top candidates)."""
        started = time.perf_counter()
        query, threshold, top_k = task["query"], task["similarity_threshold"], task["top_k"]
        depth = max(top_k, RERANK_CANDIDATES) if task["rerank"] == "vlm" else top_k
        found = self.retriever.search(query["caption"], depth)
        hits = [
            Hit(
                iteration=task["iteration"],
                concept=query["concept"],
                query=query["caption"],
                id=r.id,
                path=str(r.path),
                caption=r.caption,
                score=round(float(r.score), 6),
            )
            for r in found
            if threshold is None or r.score >= threshold
        ]
        decision = f"{query['concept']!r}: kept {min(len(hits), top_k)} of {len(found)}"
        if threshold is not None:
            decision += f" at similarity >= {threshold}"
        if task["rerank"] == "vlm" and len(hits) > top_k:
            hits, picked = self._rerank(query["caption"], hits, top_k)
            decision += f"; {picked}"
        hits = hits[:top_k]
        scores = [h["score"] for h in hits]
        record = step("retrieve", task["iteration"], decision, started, query=query["caption"], scores=scores)
        return {"hits": hits, "steps": [record]}

    def _rerank(self, caption: str, hits: list[Hit], top_k: int) -> tuple[list[Hit], str]:
        """The hits the VLM picks for `caption`, in its order; the embedder's order when it names none."""
        try:
            picked = self.reranker.pick(caption, [Path(h["path"]) for h in hits], top_k)
        except MalformedOutputError as e:
            return hits, f"the VLM could not re-rank ({e}): the embedder's order"
        if not picked:
            return hits, "the VLM named no candidate: the embedder's order"
        return [hits[i] for i in picked], f"the VLM picked candidate(s) {picked} of {len(hits)}"

    def compose(self, state: ImageRAGState) -> dict[str, Any]:
        """Gather this iteration's hits into the ordered references the generator will see."""
        started = time.perf_counter()
        iteration = state["iteration"]
        accumulate = state["knobs"].references_policy == "accumulate"
        current = [
            h for h in state["hits"] if h["iteration"] == iteration or (accumulate and h["iteration"] < iteration)
        ]
        # A file deleted since it was indexed is skipped with a note, not a failed run.
        vanished = sorted({h["path"] for h in current if not Path(h["path"]).is_file()})
        current = [h for h in current if h["path"] not in vanished]
        kept, trimmed = select_references(current, self.generator.max_references, state["knobs"].reference_trim)
        note = f"; skipped {len(vanished)} reference(s) whose file is gone" if vanished else ""
        if not kept and state.get("current_image") is None:
            decision = "no usable reference: generate from the prompt alone" + note
            return {"references": [], "steps": [step("compose", iteration, decision, started, vanished=vanished)]}
        if not kept:
            decision = "no usable reference: keep the best image so far" + note
            record = step("compose", iteration, decision, started, vanished=vanished)
            return {"references": [], "stop_reason": "no_reference_above_threshold", "steps": [record]}
        decision = f"{len(kept)} reference(s) for {sorted({h['concept'] for h in kept})}{note}"
        if trimmed:
            which = "last in caption order" if state["knobs"].reference_trim == "order" else "lowest-scoring"
            decision += f"; trimmed {len(trimmed)} {which} to fit {self.generator.model_id}"
        record = step(
            "compose",
            iteration,
            decision,
            started,
            references=[h["path"] for h in kept],
            trimmed=[h["path"] for h in trimmed],
            vanished=vanished,
        )
        return {"references": kept, "steps": [record]}

    def generate_with_references(self, state: ImageRAGState) -> dict[str, Any]:
        """Regenerate with the references in context, each named by the retrieval caption that found it
        (or from text alone: a plan that named nothing, or the rephrase-only ablation's rephrased prompt)."""
        started = time.perf_counter()
        references = tuple(
            ReferenceImage(path=Path(h["path"]), concept=h["concept"], caption=h["query"], score=h["score"])
            for h in state.get("references") or []
        )
        prompt = state.get("rephrased_prompt") if state["knobs"].rephrase_only else None
        image = self._generate(state, references, iteration=state["iteration"] + 1, prompt=prompt)
        decision = f"generated with {len(references)} reference(s)" + (" (rephrased prompt)" if prompt else "")
        record = step(
            "generate_with_references",
            image["iteration"],
            decision,
            started,
            artifact=image["artifact"],
            prompt_used=image["prompt_used"],
        )
        return {
            "iteration": image["iteration"],
            "current_image": image["artifact"],
            "images": [*state["images"], image],
            "aligned": False,
            "steps": [record],
        }

    def finish(self, state: ImageRAGState) -> dict[str, Any]:
        """Pick the final image and say why the loop stopped."""
        started = time.perf_counter()
        images = state["images"]
        best = best_image(images) if state["knobs"].final_image_policy == "best" else (images[-1] if images else None)
        reason = "aligned" if state.get("aligned") else state.get("stop_reason") or "max_iterations"
        final = best["artifact"] if best else None
        decision = f"stop: {reason}; final image from iteration {best['iteration'] if best else '-'}"
        record = step("finish", state["iteration"], decision, started, final_image=final)
        if self.on_finish is not None:
            final_state = {**state, "final_image": final, "stop_reason": reason, "steps": [*state["steps"], record]}
            self.on_finish(ImageRAGState(**final_state))  # type: ignore[typeddict-item]
        update: dict[str, Any] = {"final_image": final, "stop_reason": reason, "steps": [record]}
        if self.publish is not kept:  # the answer as its reader names images: each drawing by its file
            drawn = {"final_image": final, "draft_image": state.get("draft_image")}
            named: dict[str, Any] = {key: self.artifacts.file(artifact) for key, artifact in drawn.items()}
            named["images"] = [{**image, "artifact": self.artifacts.file(image["artifact"])} for image in images]
            update |= self.publish({**named, "references": state["references"], "steps": [*state["steps"], record]})
            update["steps"] = Overwrite(update["steps"])
        return update


ImageRAGGraph = CompiledStateGraph[ImageRAGState, KnobContext, ImageRAGInput, ImageRAGOutput]


def build_imagerag_graph(
    vlm: VisionLanguageModel,
    generator: ImageGenerator,
    retriever: ImageRetriever,
    artifacts: ArtifactStore,
    checkpointer: Checkpointer = None,
    *,
    defaults: ImageRAGKnobs | Callable[[], ImageRAGKnobs] | None = None,
    context_schema: type[KnobContext] = ImageRAGContext,
    on_finish: Callable[[ImageRAGState], None] | None = None,
    publish: Publish = kept,
) -> ImageRAGGraph:
    """Wire the ImageRAG loop over the given backends; pass a checkpointer to make runs resumable.

    `defaults` (or a function returning them, read at each run's start; None: the declared defaults) are the
    knobs of a run whose context leaves them unset; `context_schema` may extend
    `ImageRAGContext` with what a deployment needs per run (LangGraph Server: the index); `on_finish`
    sees the final state of every finished run (LangGraph Server writes the run's record with it); `publish`
    names the images of the answer (see `Publish`).
    """
    nodes = _Nodes(vlm, generator, retriever, artifacts, defaults or ImageRAGKnobs(), on_finish, publish)
    graph = StateGraph(
        ImageRAGState, context_schema=context_schema, input_schema=ImageRAGInput, output_schema=ImageRAGOutput
    )
    node_functions: dict[str, Callable[..., dict[str, Any]]] = {
        "prepare": nodes.prepare,
        "generate_draft": nodes.generate_draft,
        "critic": nodes.critic_node,
        "rephrase": nodes.rephrase,
        "rewrite": nodes.rewrite,
        "retrieve": nodes.retrieve,
        "compose": nodes.compose,
        "generate_with_references": nodes.generate_with_references,
        "finish": nodes.finish,
    }
    for name, function in node_functions.items():
        graph.add_node(name, function)
    graph.add_edge(START, "prepare")
    graph.add_conditional_edges("prepare", route_start, ["generate_draft", "critic", "rephrase"])
    graph.add_edge("generate_draft", "critic")
    graph.add_conditional_edges(
        "critic", route_after_critic, ["finish", "rephrase", "rewrite", "generate_with_references"]
    )
    graph.add_edge("rephrase", "generate_with_references")
    graph.add_conditional_edges("rewrite", fan_out_retrieval, ["retrieve"])
    graph.add_edge("retrieve", "compose")
    graph.add_conditional_edges("compose", route_after_compose, ["finish", "generate_with_references"])
    graph.add_conditional_edges("generate_with_references", route_after_generation, ["critic", "finish"])
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=checkpointer, name="imagerag")
