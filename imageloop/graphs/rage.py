"""RAGE as a LangGraph state machine: retrieve from your own catalogue, a person picks, generate with the picks.

```
START → prepare → retrieve → select ─picked→ generate ─review none (or a person's last allowed image)→ finish
            ↑                   │                └→ review ─accept / aligned / generation cap→ finish
            └── a new prompt ───┤                     ├─regenerate→ generate
                (nothing picked)└─nothing picked→ finish └─reselect→ select
```
`select` is a person through `interrupt()` (the payload carries the candidates: position, id, path,
caption, score), resumed with `{"selected": [...], "prompt": optional new prompt}`; or, with
`auto_select = N`, the top N candidates above the similarity threshold, without a person. Picks are
1-based positions as shown, ids (or unique id prefixes) or file names, checked by `resolve_selection`,
the one rule every face uses too: a pick that names no candidate is asked again with the valid choices.
Picking nothing with a new prompt searches again; picking nothing ends the run.

`generate` is its own node after `select`, so a resume never generates twice. The prompt goes to the
model verbatim (`GenerationRequest(template="verbatim")`) with the picks in pick order; a backend
taking fewer references than picked keeps the first ones and the image's notes name those dropped.
`review` (optional): a person accepts, regenerates or reselects through an interrupt, or a VLM critic
checks alignment; `max_generations` caps the images drawn, in state. Each regeneration draws with the
next seed. Images never enter state: they are artifact ids.

A run is asked `RAGEInput` (the prompt) with per-run knobs and a metadata filter (`where`) in the run
context (`RAGEContext`), answers
`RAGEOutput`, and `prepare` resets every per-run field, so a reused thread starts clean.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer, Overwrite, interrupt
from typing_extensions import TypedDict

from imageloop import limits
from imageloop.agents.critic import Critic
from imageloop.errors import ConfigError, ImageloopError, MalformedOutputError
from imageloop.graphs.imagerag import GeneratedImage, best_image
from imageloop.graphs.picks import find_shown, listed
from imageloop.graphs.steps import Publish, Step, kept, step
from imageloop.knobs import KnobContext, RAGEKnobs, run_context
from imageloop.prompts.questions import RAGE_REVIEW_ASK, RAGE_SELECT_ASK
from imageloop.protocols import GenerationRequest, ImageGenerator, ReferenceImage, RetrievedImage, VisionLanguageModel
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.generators.references import keep_references
from imageloop.tools.stores.metadata_filter import parse_where
from imageloop.tracing import traced_generator, traced_retriever, traced_vlm

ReviewAction = Literal["accept", "regenerate", "reselect"]
REVIEW_ACTIONS: tuple[ReviewAction, ...] = ("accept", "regenerate", "reselect")
CRITIC_CONCEPTS = 3
"""Missing concepts the critic names per judged image (recorded; RAGE keeps the prompt verbatim)."""


class RAGERetriever(Protocol):
    """What RAGE needs from retrieval: text queries with a similarity threshold and a metadata filter."""

    def search(
        self, text: str, k: int, similarity_threshold: float | None = None, where: Mapping[str, Any] | None = None
    ) -> list[RetrievedImage]: ...


class Candidate(TypedDict):
    """A retrieved image as shown to the person: `position` is 1-based, as listed."""

    position: int
    id: str
    path: str
    caption: str
    score: float


class RAGEImage(GeneratedImage):
    """An image drawn from the picks; `iteration` is its generation number (1 first), `seed` the one drawn with.

    `notes` say what the backend left out (references past its capacity, files gone, an ignored seed);
    `review` is the person's answer or the critic's verdict (None until reviewed).
    """

    seed: int | None
    notes: list[str]
    review: str | None


RAGEContext = run_context(
    RAGEKnobs,
    "RAGEContext",
    where=(dict[str, Any] | None, 'a metadata filter on the catalogue, e.g. {"tags": "sneaker"} or {"folder": "bags"}'),
)
"""Per-run knobs (each unset one takes the graph's defaults, the settings') and the catalogue's filter."""


class RAGEInput(TypedDict):
    """What a run is asked: the prompt, which is also the retrieval query (knobs and a filter come through the
    context)."""

    prompt: str


class RAGEOutput(TypedDict, total=False):
    """What a run answers: the candidates, the picks, every image drawn, the final one and why it stopped."""

    knobs: RAGEKnobs
    prompt: str
    candidates: list[Candidate]
    selected: list[Candidate]
    images: list[RAGEImage]
    final_image: str | None
    stop_reason: str | None
    steps: list[Step]


class RAGEState(TypedDict, total=False):
    """The prompt, the resolved knobs and everything decided so far."""

    knobs: RAGEKnobs
    prompt: str
    where: dict[str, Any] | None
    candidates: list[Candidate]
    selected: list[Candidate]
    images: list[RAGEImage]
    generation: int
    review_action: ReviewAction | None
    final_image: str | None
    stop_reason: str | None
    steps: Annotated[list[Step], operator.add]


FRESH_RUN: dict[str, Any] = {
    "candidates": [],
    "selected": [],
    "images": [],
    "generation": 0,
    "review_action": None,
    "final_image": None,
    "stop_reason": None,
}


def check_where(where: Any) -> dict[str, Any] | None:
    """A metadata filter as every store can apply it (None or empty: no filter)."""
    if where is None:
        return None
    if not isinstance(where, Mapping):
        raise ConfigError(f"where {where!r}: expected a mapping of metadata keys to values")
    parse_where(where)
    return dict(where) or None


# Picks and review answers: one rule for the graph and for every face.


class SelectionError(ImageloopError):
    """Picks that name none of the candidates shown, or several, or too many."""


class ReviewError(ImageloopError):
    """A review answer that is not accept, regenerate or reselect."""


@dataclass(frozen=True)
class Selection:
    """A person's answer to `select`: the candidates picked, in pick order, and a new prompt if any."""

    picks: list[Candidate]
    prompt: str | None


@dataclass(frozen=True)
class ReviewAnswer:
    """A person's answer to `review`; `prompt` replaces the prompt of a regeneration."""

    action: ReviewAction
    prompt: str | None


def pick_items(items: Any) -> list[str]:
    """Picks as written: a comma- or space-separated text, a number, or a list of them (blanks dropped)."""
    if isinstance(items, bool):
        raise SelectionError(f"selected {items!r}: expected positions, ids or file names")
    if isinstance(items, str | int):
        items = [items]
    if not isinstance(items, Sequence):
        raise SelectionError(f"selected {items!r}: expected a list of positions, ids or file names")
    words: list[str] = []
    for item in items:
        if isinstance(item, bool) or not isinstance(item, str | int):
            raise SelectionError(f"pick {item!r}: expected a position, an id or a file name")
        words += str(item).replace(",", " ").split()
    return words


def resolve_picks(items: Any, candidates: Sequence[Candidate]) -> list[Candidate]:
    """The candidates `items` name, in the order named (a repeat counts once).

    A number is a 1-based position as shown; anything else is a file name (with or without its
    extension), an id, or an id's unique prefix. A pick naming no candidate, or several, is a
    SelectionError listing the valid choices, so no face generates from a pick nobody meant.
    """
    picked: list[Candidate] = []
    for item in pick_items(items):
        candidate = _resolve_pick(item, candidates)
        if all(candidate["id"] != p["id"] for p in picked):
            picked.append(candidate)
    if len(picked) > limits.MAX_REFERENCES:
        raise SelectionError(f"{len(picked)} picks: at most {limits.MAX_REFERENCES} images go to one generation")
    return picked


def _resolve_pick(item: str, candidates: Sequence[Candidate]) -> Candidate:
    if not candidates:
        raise SelectionError("nothing was retrieved, so there is nothing to pick: give a new prompt to search again")
    found = find_shown(item, candidates, "a candidate", "candidates")
    if isinstance(found, str):
        how = "pick by position, id (or a unique prefix) or file name"
        raise SelectionError(f"pick {item!r} {found}: {how}: {listed(candidates)}")
    return found


def resolve_selection(answer: Any, candidates: Sequence[Candidate]) -> Selection:
    """A person's answer to `select`: `{"selected": ITEMS, "prompt": optional}`, or ITEMS alone.

    ITEMS are checked by `resolve_picks`; the prompt, when given, must be a usable prompt.
    """
    prompt: Any = None
    if isinstance(answer, Mapping):
        unknown = sorted(set(answer) - {"selected", "prompt"})
        if unknown:
            raise SelectionError(f"unknown key {unknown[0]!r} in the selection: expected selected and prompt")
        items, prompt = answer.get("selected") or [], answer.get("prompt")
    else:
        items = answer if answer is not None else []
    if prompt is not None and not isinstance(prompt, str):
        raise SelectionError(f"prompt {prompt!r}: expected text")
    new_prompt = limits.check_text("prompt", prompt) if prompt and prompt.strip() else None
    return Selection(resolve_picks(items, candidates), new_prompt)


def resolve_review(answer: Any) -> ReviewAnswer:
    """A person's answer to `review`: accept, regenerate or reselect, or `{"action": ..., "prompt": ...}`."""
    prompt: Any = None
    if isinstance(answer, Mapping):
        unknown = sorted(set(answer) - {"action", "prompt"})
        if unknown:
            raise ReviewError(f"unknown key {unknown[0]!r} in the review: expected action and prompt")
        action, prompt = answer.get("action"), answer.get("prompt")
    else:
        action = answer
    word = action.strip().lower() if isinstance(action, str) else None
    chosen = next((a for a in REVIEW_ACTIONS if a == word), None)
    if chosen is None:
        raise ReviewError(f"review {action!r}: answer {', '.join(REVIEW_ACTIONS)}")
    if prompt is not None and not isinstance(prompt, str):
        raise ReviewError(f"prompt {prompt!r}: expected text")
    if prompt and prompt.strip() and chosen != "regenerate":
        raise ReviewError(f"a new prompt goes with regenerate, not {chosen}")
    return ReviewAnswer(chosen, limits.check_text("prompt", prompt) if prompt and prompt.strip() else None)


# Routing: pure functions of state.


def route_after_select(state: RAGEState) -> Literal["generate", "retrieve", "finish"]:
    """Generate with the picks; search again for a new prompt; stop when nothing was picked."""
    if state["selected"]:
        return "generate"
    return "finish" if state.get("stop_reason") else "retrieve"


def route_after_generate(state: RAGEState) -> Literal["review", "finish"]:
    """Review unless there is no review, nothing was drawn, or a person could not ask for another image."""
    if state.get("stop_reason") or state["knobs"].review == "none":
        return "finish"
    if state["knobs"].review == "person" and state["generation"] >= state["knobs"].max_generations:
        return "finish"
    return "review"


def route_after_review(state: RAGEState) -> Literal["generate", "select", "finish"]:
    """Accepted, aligned, undecidable or capped: stop; else regenerate or pick again."""
    action = state.get("review_action")
    if action in (None, "accept") or state["generation"] >= state["knobs"].max_generations:
        return "finish"
    return "select" if action == "reselect" else "generate"


def stop_reason(state: RAGEState) -> str:
    """Why the run stopped, for `finish`: a reason already recorded, else what the review decided."""
    if state.get("stop_reason"):
        return str(state["stop_reason"])
    if state["knobs"].review == "none":
        return "generated"
    if state.get("review_action") == "accept":
        return "accepted" if state["knobs"].review == "person" else "aligned"
    return "max_generations"


def _candidate_list(found: Sequence[RetrievedImage]) -> list[Candidate]:
    return [
        Candidate(position=i, id=r.id, path=str(r.path), caption=r.caption, score=round(float(r.score), 6))
        for i, r in enumerate(found, start=1)
    ]


class _Nodes:
    """Node functions closed over the backends they call."""

    def __init__(
        self,
        vlm: VisionLanguageModel | None,
        generator: ImageGenerator,
        retriever: RAGERetriever,
        artifacts: ArtifactStore,
        defaults: RAGEKnobs | Callable[[], RAGEKnobs],
        on_finish: Callable[[RAGEState], None] | None,
        publish: Publish = kept,
    ) -> None:
        self._defaults = defaults
        # Every model call and search becomes a run in the graph's trace (LangSmith, callback handlers).
        self.vlm = traced_vlm(vlm) if vlm is not None else None
        self.generator = traced_generator(generator)
        self.retriever = traced_retriever(retriever)
        self.artifacts = artifacts
        self.on_finish = on_finish
        self.publish = publish

    def prepare(self, state: RAGEState, runtime: Runtime[KnobContext]) -> dict[str, Any]:
        """Check the prompt and filter, resolve the knobs, reset every per-run field (a reused thread starts clean)."""
        started = time.perf_counter()
        prompt = limits.check_text("prompt", str(state.get("prompt") or ""))
        where = check_where(getattr(runtime.context, "where", None))
        defaults = self._defaults() if callable(self._defaults) else self._defaults
        knobs = defaults.overridden(runtime.context)
        if knobs.review == "critic" and self.vlm is None:
            raise ConfigError("a critic review asks a VLM: configure a `vlm`, or review none or person")
        who = f"top {knobs.auto_select} picked automatically" if knobs.auto_select else "a person picks"
        record = step("prepare", 0, f"{who}; review {knobs.review}", started, where=where, knobs=knobs.record())
        return {"prompt": prompt, "where": where, "knobs": knobs, **FRESH_RUN, "steps": Overwrite([record])}

    def retrieve(self, state: RAGEState) -> dict[str, Any]:
        """Search the catalogue with the prompt, within the filter, keeping hits at or above the threshold."""
        started = time.perf_counter()
        knobs = state["knobs"]
        found = self.retriever.search(state["prompt"], knobs.k, knobs.similarity_threshold, state["where"])
        candidates = _candidate_list(found)
        decision = f"{len(candidates)} candidate(s) for the prompt"
        if state["where"]:
            decision += f" within {state['where']}"
        if knobs.similarity_threshold is not None:
            decision += f" at similarity >= {knobs.similarity_threshold}"
        record = step(
            "retrieve", state["generation"], decision, started,
            query=state["prompt"], scores=[c["score"] for c in candidates],
        )  # fmt: skip
        return {"candidates": candidates, "selected": [], "steps": [record]}

    def select(self, state: RAGEState) -> dict[str, Any]:
        """The top N without a person, or a person's picks through an interrupt (asked again until valid)."""
        started = time.perf_counter()
        candidates = state["candidates"]
        iteration = state["generation"]
        if state["knobs"].auto_select:
            picked = candidates[: state["knobs"].auto_select]
            if not picked:
                record = step("select", iteration, "no candidate to pick automatically", started)
                return {"selected": [], "stop_reason": "no_candidates", "steps": [record]}
            decision = f"picked the top {len(picked)} automatically"
            record = step("select", iteration, decision, started, selected=[c["id"] for c in picked])
            return {"selected": picked, "review_action": None, "steps": [record]}
        request: dict[str, Any] = {
            "kind": "select", "prompt": state["prompt"], "candidates": candidates, "ask": RAGE_SELECT_ASK,
        }  # fmt: skip
        while True:
            answer = interrupt(self.publish(request))
            try:
                selection = resolve_selection(answer, candidates)
                break
            except ImageloopError as e:
                request = {**request, "ask": f"{e}. {RAGE_SELECT_ASK}"}
        prompt = selection.prompt or state["prompt"]
        if selection.picks:
            decision = f"a person picked {len(selection.picks)}" + (" with a new prompt" if selection.prompt else "")
            record = step("select", iteration, decision, started, selected=[c["id"] for c in selection.picks])
            return {"selected": selection.picks, "prompt": prompt, "review_action": None, "steps": [record]}
        if selection.prompt:
            record = step("select", iteration, "nothing picked: search again with a new prompt", started, prompt=prompt)
            return {"selected": [], "prompt": prompt, "steps": [record]}
        record = step("select", iteration, "nothing picked: stop", started)
        return {"selected": [], "stop_reason": "no_selection", "steps": [record]}

    def generate(self, state: RAGEState) -> dict[str, Any]:
        """Draw the prompt verbatim with the picks in pick order (each regeneration with the next seed)."""
        started = time.perf_counter()
        generation = state["generation"] + 1
        present = [c for c in state["selected"] if Path(c["path"]).is_file()]
        notes = [f"{Path(c['path']).name} is gone from the catalogue: left out" for c in state["selected"]
                 if c not in present]  # fmt: skip
        if not present:
            decision = "every picked file is gone from the catalogue: nothing to generate with"
            record = step("generate", generation, decision, started, notes=notes)
            return {"stop_reason": "picked_files_missing", "steps": [record]}
        seed = (state["knobs"].seed + generation - 1) % 2**32
        request = GenerationRequest(
            prompt=state["prompt"],
            references=tuple(
                ReferenceImage(path=Path(c["path"]), concept=c["caption"], caption=c["caption"], score=c["score"])
                for c in present
            ),
            seed=seed,
            size=state["knobs"].size,
            steps=state["knobs"].steps,
            template="verbatim",
        )
        kept, dropped = keep_references(request, self.generator.max_references, self.generator.model_id)
        result = self.generator.generate(replace(request, references=kept))
        notes += [*dropped, *result.notes]
        image = RAGEImage(
            artifact=self.artifacts.put(result.image),
            iteration=generation,
            prompt_used=result.prompt_used,
            aligned=None,
            missing=None,
            references=[str(r.path) for r in kept],
            seed=seed,
            notes=notes,
            review=None,
        )
        decision = f"generated with {len(kept)} picked image(s), prompt verbatim" + (
            f"; {'; '.join(notes)}" if notes else ""
        )
        record = step(
            "generate", generation, decision, started,
            artifact=image["artifact"], prompt_used=result.prompt_used, references=image["references"],
        )  # fmt: skip
        return {"generation": generation, "images": [*state["images"], image], "steps": [record]}

    def review(self, state: RAGEState) -> dict[str, Any]:
        """A person's verdict through an interrupt, or the critic's alignment check of the latest image."""
        started = time.perf_counter()
        latest = state["images"][-1]
        path = self.artifacts.path(latest["artifact"])
        generation = state["generation"]
        if state["knobs"].review == "critic":
            assert self.vlm is not None  # prepare refuses a critic review without a VLM
            try:
                verdict = Critic(self.vlm).judge(state["prompt"], path, CRITIC_CONCEPTS)
            except MalformedOutputError as e:
                record = step("review", generation, f"critic could not answer ({e}): keep the image", started)
                return {"review_action": None, "stop_reason": "critic_failed", "steps": [record]}
            said = "aligned" if verdict.aligned else f"missing {', '.join(verdict.missing_concepts) or '?'}"
            judged = RAGEImage(
                **{**latest, "aligned": verdict.aligned, "missing": len(verdict.missing_concepts), "review": said}
            )
            capped = not verdict.aligned and generation >= state["knobs"].max_generations
            decision = ("aligned with the prompt" if verdict.aligned else f"not aligned: {judged['review']}") + (
                "; generation cap reached" if capped else ""
            )
            record = step("review", generation, decision, started, aligned=verdict.aligned,
                          missing_concepts=verdict.missing_concepts)  # fmt: skip
            return {
                "images": [*state["images"][:-1], judged],
                "review_action": "accept" if verdict.aligned else "regenerate",
                "steps": [record],
            }
        request: dict[str, Any] = {
            "kind": "review",
            "generation": generation,
            "image": str(path),
            "prompt": state["prompt"],
            "selected": state["selected"],
            "choices": list(REVIEW_ACTIONS),
            "generations_left": state["knobs"].max_generations - generation,
            "ask": f"{RAGE_REVIEW_ASK.capitalize()}.",
        }
        while True:
            answer = interrupt(self.publish(request))
            try:
                verdict_answer = resolve_review(answer)
                break
            except ImageloopError as e:
                request = {**request, "ask": f"{e}: {RAGE_REVIEW_ASK}."}
        reviewed = RAGEImage(**{**latest, "review": verdict_answer.action})
        decision = f"a person chose {verdict_answer.action}" + (" with a new prompt" if verdict_answer.prompt else "")
        record = step("review", generation, decision, started, action=verdict_answer.action)
        update: dict[str, Any] = {
            "images": [*state["images"][:-1], reviewed],
            "review_action": verdict_answer.action,
            "steps": [record],
        }
        if verdict_answer.prompt:
            update["prompt"] = verdict_answer.prompt
        return update

    def finish(self, state: RAGEState) -> dict[str, Any]:
        """Pick the final image (the critic's best judged, else the latest) and say why the run stopped."""
        started = time.perf_counter()
        images = state["images"]
        chosen: GeneratedImage | None = (
            best_image(images) if state["knobs"].review == "critic" else (images[-1] if images else None)
        )
        final = chosen["artifact"] if chosen else None
        reason = stop_reason(state)
        decision = f"stop: {reason}" + (f"; final image from generation {chosen['iteration']}" if chosen else "")
        record = step("finish", state["generation"], decision, started, final_image=final)
        if self.on_finish is not None:
            final_state = {**state, "final_image": final, "stop_reason": reason, "steps": [*state["steps"], record]}
            self.on_finish(RAGEState(**final_state))  # type: ignore[typeddict-item]
        update: dict[str, Any] = {"final_image": final, "stop_reason": reason, "steps": [record]}
        if self.publish is not kept:  # the answer as its reader names images: each drawing by its file
            drawn = [{**image, "artifact": self.artifacts.file(image["artifact"])} for image in images]
            named = {"final_image": self.artifacts.file(final), "images": drawn}
            listed = {"candidates": state["candidates"], "selected": state["selected"]}
            update |= self.publish({**named, **listed, "steps": [*state["steps"], record]})
            update["steps"] = Overwrite(update["steps"])
        return update


RAGEGraph = CompiledStateGraph[RAGEState, KnobContext, RAGEInput, RAGEOutput]


def build_rage_graph(
    vlm: VisionLanguageModel | None,
    generator: ImageGenerator,
    retriever: RAGERetriever,
    artifacts: ArtifactStore,
    checkpointer: Checkpointer = None,
    *,
    defaults: RAGEKnobs | Callable[[], RAGEKnobs] | None = None,
    context_schema: type[KnobContext] = RAGEContext,
    on_finish: Callable[[RAGEState], None] | None = None,
    publish: Publish = kept,
) -> RAGEGraph:
    """Wire the RAGE loop; a person's picks and reviews need a checkpointer and a thread_id to interrupt.

    `vlm` is only asked by a critic review (None refuses one). `defaults` (or a function returning them,
    read when a run starts) are the knobs of a run whose context leaves them unset; `on_finish` sees the
    final state of every finished run (LangGraph Server writes the run's record with it); `publish` names the
    images of the questions asked and of the answer (see `Publish`).
    """
    nodes = _Nodes(vlm, generator, retriever, artifacts, defaults or RAGEKnobs(), on_finish, publish)
    graph = StateGraph(RAGEState, context_schema=context_schema, input_schema=RAGEInput, output_schema=RAGEOutput)
    graph.add_node("prepare", nodes.prepare)
    graph.add_node("retrieve", nodes.retrieve)
    graph.add_node("select", nodes.select)
    graph.add_node("generate", nodes.generate)
    graph.add_node("review", nodes.review)
    graph.add_node("finish", nodes.finish)
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "retrieve")
    graph.add_edge("retrieve", "select")
    graph.add_conditional_edges("select", route_after_select, ["generate", "retrieve", "finish"])
    graph.add_conditional_edges("generate", route_after_generate, ["review", "finish"])
    graph.add_conditional_edges("review", route_after_review, ["generate", "select", "finish"])
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=checkpointer, name="rage")
