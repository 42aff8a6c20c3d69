"""GenIR as a LangGraph state machine: multi-round retrieval of the image a user has in mind.

```
START → prepare ─(simulated user)→ describe_target ─┐
           └─(a person's query)──────────────────────┴→ choose_feedback
choose_feedback ─visual→ generate_synthetic → retrieve ─┐      (hybrid picks per round)
        └─verbal / prediction──────────────→ retrieve ─┴→ present
present ─found / last round→ finish
   ├─chatir→ ask_question (ChatIR: a VLM asks about the image) ─┐
   └─────────────────────────────────────────────────────────────┴→ feedback (a person through interrupt(),
         or the simulated-user VLM) ─found→ finish
         └→ rewrite (query_{t+1}; ChatIR: the dialogue with the answer) → choose_feedback …
```
Generation has its own node, so resuming a person's interrupt never draws again. Ranks are 0-based
(0 is the top result); a target counts as found at round t when its rank is < k. A person's
"found: X" must name a result that was shown (`resolve_found`: X is its position as listed, from 1, or
its id), else the question is asked again.

A run is asked `GenIRInput` (a person's query, or a simulated user's target) with per-run knobs in the
run context (`GenIRContext`), answers `GenIROutput`, and `prepare` resets every per-run field, so a
reused thread starts clean.
"""

from __future__ import annotations

import operator
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer, Overwrite, interrupt
from typing_extensions import TypedDict

from imageloop import limits
from imageloop.agents.query_refiner import QueryRefiner
from imageloop.agents.questioner import Questioner, dialogue_query, dialogue_turn
from imageloop.agents.simulated_user import ShownKind, SimulatedUser, user_decoding
from imageloop.errors import ConfigError, ImageloopError, MalformedOutputError
from imageloop.graphs.picks import find_shown, listed
from imageloop.graphs.steps import Publish, Step, kept, step
from imageloop.knobs import GenIRKnobs, KnobContext, SimulatedUserKnobs, run_context
from imageloop.prompts.questions import GENIR_CHATIR_ASK, GENIR_EMPTY_FEEDBACK_ASK, GENIR_FEEDBACK_ASK
from imageloop.protocols import (
    GenerationRequest,
    ImageGenerator,
    PathResolver,
    RetrievedImage,
    VisionLanguageModel,
    as_given,
)
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tracing import traced_generator, traced_retriever, traced_vlm

User = Literal["person", "simulated"]
FOUND_PREFIX = "found:"


class GenIRRetriever(Protocol):
    """What GenIR needs from retrieval: text queries, image queries on image-route indexes."""

    @property
    def route(self) -> Literal["image", "caption"]: ...

    def search(self, text: str, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]: ...

    def search_image(self, image: Path, k: int, similarity_threshold: float | None = None) -> list[RetrievedImage]: ...


class Retrieved(TypedDict):
    """One retrieved image as state keeps it."""

    id: str
    path: str
    caption: str
    score: float


class RoundRecord(TypedDict):
    """What happened in one round: the dialogue record GenIR's evaluation writes per target."""

    round: int
    query: str
    feedback_kind: ShownKind
    synthetic_image: str | None
    retrieved: list[Retrieved]
    target_rank: int | None
    feedback: str | None
    differences: str | None
    question: str | None


GenIRContext = run_context(
    SimulatedUserKnobs,
    "GenIRContext",
    target_id=(str | None, "a simulated user's search (evaluation): the target's index id"),
    target_path=(str | None, "a simulated user's search: the target image it describes and compares with"),
)
"""Per-run knobs (each unset one takes the graph's defaults, the settings') and, for a simulated user, the target."""


class GenIRInput(TypedDict, total=False):
    """A person's search starts from their query (a simulated user describes its target, named in the context)."""

    query: str


class GenIROutput(TypedDict, total=False):
    """How the search ended and the whole dialogue."""

    knobs: SimulatedUserKnobs
    query: str
    round: int
    found: bool
    found_id: str | None
    rounds: list[RoundRecord]
    stop_reason: str | None
    steps: list[Step]


class GenIRState(TypedDict, total=False):
    """The resolved knobs, who searches for what, and the dialogue so far."""

    knobs: SimulatedUserKnobs
    user: User
    target_id: str | None
    target_path: str | None
    query: str
    dialogue: list[str]
    question: str | None
    round: int
    shown_kind: ShownKind
    synthetic_image: str | None
    retrieved: list[Retrieved]
    target_rank: int | None
    next_query: str | None
    found: bool
    found_id: str | None
    rounds: list[RoundRecord]
    stop_reason: str | None
    steps: Annotated[list[Step], operator.add]


FRESH_RUN: dict[str, Any] = {
    "dialogue": [],
    "question": None,
    "round": 0,
    "synthetic_image": None,
    "retrieved": [],
    "target_rank": None,
    "next_query": None,
    "found": False,
    "found_id": None,
    "rounds": [],
    "stop_reason": None,
}


class FoundError(ImageloopError):
    """A `found:` answer that names none of the results shown."""


def parse_found(text: str) -> str | None:
    """What a "found: X" answer names (X as written), else None."""
    stripped = text.strip()
    if stripped.lower().startswith(FOUND_PREFIX):
        return stripped[len(FOUND_PREFIX) :].strip()
    return None


def resolve_found(answer: str, shown: Sequence[Mapping[str, Any]]) -> str | None:
    """The id a "found: X" answer picks among the `shown` results, else None for ordinary feedback.

    X names a result as every face lets a person name one (`imageloop.graphs.picks`: its position as
    listed, from 1, its file name, its id or a unique id prefix); anything else is a FoundError listing
    what may be picked, so neither a person nor a client can end a search on an image never shown.
    """
    named = parse_found(answer)
    if named is None:
        return None
    found = find_shown(named, shown) if shown else "names nothing: no result was shown"
    if isinstance(found, str):
        quoted = " ".join(named.split())[:60]  # the answer as typed, on one line and short
        choices = f": answer with one of {listed(shown)}" if shown else ""
        raise FoundError(f"'{FOUND_PREFIX} {quoted}' {found}{choices}, or say what differs")
    return str(found["id"])


def refuse_caption_route(knobs: GenIRKnobs, route: str, where: str = "this index") -> None:
    """Refuse an index of caption embeddings when the knobs ask for GenIR's image-embedding space (`index_route`
    image, `genir-paper`): there a query would silently retrieve captions, not images."""
    if knobs.index_route == "image" and route != "image":
        raise ConfigError(
            f"`index_route` image (genir-paper) searches image embeddings as GenIR does, but {where} holds caption "
            "embeddings (a text embedder built it): delete its .imageloop folder and index it again with an image "
            "embedder, e.g. `embedder` transformers:Salesforce/blip-itm-base-coco, or set `index_route` any"
        )


# Routing: pure functions of state.


def route_after_prepare(state: GenIRState) -> Literal["describe_target", "choose_feedback"]:
    """A simulated user describes its target first; a person's search starts from their query."""
    return "describe_target" if state["user"] == "simulated" else "choose_feedback"


def route_after_choice(state: GenIRState) -> Literal["generate_synthetic", "retrieve"]:
    """Only visual feedback draws a synthetic image."""
    return "generate_synthetic" if state["shown_kind"] == "visual" else "retrieve"


def route_after_present(state: GenIRState) -> Literal["ask_question", "feedback", "finish"]:
    """Stop when found or after the last refinement round (round 0 plus `max_rounds`, as the paper counts);
    ChatIR asks its question before the feedback."""
    if state.get("found") or state["round"] >= state["knobs"].rounds:
        return "finish"
    return "ask_question" if state["shown_kind"] == "chatir" else "feedback"


def route_after_feedback(state: GenIRState) -> Literal["rewrite", "finish"]:
    """A person may say the image is found."""
    return "finish" if state.get("found") else "rewrite"


def pick_shown_kind(state: GenIRState) -> ShownKind:
    """The hybrid router: draw first; show the top hit once retrieval looks confident."""
    kind = state["knobs"].feedback
    if kind != "hybrid":
        return kind
    previous = state["rounds"][-1] if state["rounds"] else None
    if previous and previous["retrieved"] and previous["retrieved"][0]["score"] >= state["knobs"].hybrid_threshold:
        return "prediction"
    return "visual"


class _Nodes:
    """Node functions closed over the backends they call."""

    def __init__(
        self,
        vlm: VisionLanguageModel,
        generator: ImageGenerator | None,
        retriever: GenIRRetriever,
        artifacts: ArtifactStore,
        defaults: SimulatedUserKnobs | Callable[[], SimulatedUserKnobs],
        paths: PathResolver,
        publish: Publish = kept,
    ) -> None:
        self._defaults = defaults
        self.paths = paths
        self.publish = publish
        # Every model call and search becomes a run in the graph's trace (LangSmith, callback handlers).
        vlm = traced_vlm(vlm)
        self.vlm = vlm
        self.refiner = QueryRefiner(vlm)
        self.questioner = Questioner(vlm)
        self.generator = traced_generator(generator) if generator is not None else None
        self.retriever = traced_retriever(retriever)
        self.artifacts = artifacts

    def prepare(self, state: GenIRState, runtime: Runtime[KnobContext]) -> dict[str, Any]:
        """Resolve the knobs and who searches (a target in the input: a simulated user); reset every per-run field."""
        started = time.perf_counter()
        defaults = self._defaults() if callable(self._defaults) else self._defaults
        knobs = defaults.overridden(runtime.context)
        target_id, target_path = (getattr(runtime.context, name, None) for name in ("target_id", "target_path"))
        user: User = "simulated" if target_id or target_path else "person"
        if user == "simulated":
            if not target_path or not target_id:
                raise ConfigError("a simulated user needs target_id and target_path to look for")
            target_path = str(self.paths(str(target_path), "target_path"))
            query = ""  # the simulated user describes its target (describe_target)
        else:
            query = limits.check_text("query", str(state.get("query") or ""))
        refuse_caption_route(knobs, self.retriever.route)
        if knobs.feedback in ("visual", "hybrid") and self.generator is None:
            raise ConfigError(f"{knobs.feedback} feedback draws synthetic images: configure a `generator`")
        decision = f"{user} search, {knobs.feedback} feedback"
        record = step("prepare", 0, decision, started, user=user, knobs=knobs.record())
        run = {"user": user, "target_id": target_id or None, "target_path": target_path or None}
        fresh = {**FRESH_RUN, "dialogue": [query] if query else []}
        return {"query": query, "knobs": knobs, **run, **fresh, "steps": Overwrite([record])}

    def _user(self, state: GenIRState) -> SimulatedUser:
        """The simulated user this run asked for: its style and decoding."""
        knobs = state["knobs"]
        decoding = user_decoding(
            knobs.simulated_user, knobs.user_temperature, knobs.user_top_p, knobs.user_repetition_penalty
        )
        return SimulatedUser(self.vlm, style=knobs.simulated_user, decoding=decoding)

    def describe_target(self, state: GenIRState) -> dict[str, Any]:
        """The simulated user's first query, written for the feedback its first round will show."""
        started = time.perf_counter()
        target = Path(str(state["target_path"]))
        try:
            query = self._user(state).describe(target, kind=pick_shown_kind(state))
            decision = "described the target"
        except MalformedOutputError as e:
            query = ""
            decision = f"could not describe the target ({e})"
        if not query:
            query = "a photo"
            decision += "; starting from a generic query"
        return {
            "query": query,
            "dialogue": [query],
            "steps": [step("describe_target", 0, decision, started, query=query)],
        }

    def choose_feedback(self, state: GenIRState) -> dict[str, Any]:
        """Decide what this round shows the user (hybrid decides per round)."""
        started = time.perf_counter()
        kind = pick_shown_kind(state)
        record = step("choose_feedback", state["round"], f"show {kind} feedback", started, query=state["query"])
        return {"shown_kind": kind, "synthetic_image": None, "steps": [record]}

    def generate_synthetic(self, state: GenIRState) -> dict[str, Any]:
        """Draw what the system understood from the query."""
        started = time.perf_counter()
        assert self.generator is not None  # prepare refuses visual feedback without one
        knobs = state["knobs"]
        request = GenerationRequest(prompt=state["query"], seed=knobs.seed, size=knobs.size, steps=knobs.steps)
        result = self.generator.generate(request)
        artifact = self.artifacts.put(result.image)
        record = step("generate_synthetic", state["round"], "drew the query", started, artifact=artifact)
        return {"synthetic_image": artifact, "steps": [record]}

    def retrieve(self, state: GenIRState) -> dict[str, Any]:
        """Image→image with the synthetic image on image-route indexes, else text→image with the query."""
        started = time.perf_counter()
        k = state["knobs"].k
        depth = max(k, state["knobs"].rank_depth) if state.get("target_id") else k
        synthetic = state.get("synthetic_image")
        if synthetic and self.retriever.route == "image":
            found = self.retriever.search_image(self.artifacts.path(synthetic), depth)
            how = "image→image with the synthetic image"
        else:
            found = self.retriever.search(state["query"], depth)
            how = "text→image with the query" if self.retriever.route == "image" else "caption route with the query"
        retrieved = [
            Retrieved(id=r.id, path=str(r.path), caption=r.caption, score=round(float(r.score), 6)) for r in found[:k]
        ]
        # Only the target's rank is kept from the deep ranking: a checkpoint holds k results, not rank_depth ids.
        target = state.get("target_id")
        ranked = [r.id for r in found]
        rank = ranked.index(target) if target and target in ranked else None
        record = step("retrieve", state["round"], how, started, top=[r["id"] for r in retrieved])
        return {"retrieved": retrieved, "target_rank": rank, "steps": [record]}

    def present(self, state: GenIRState) -> dict[str, Any]:
        """Record the round; with a known target, note its rank and whether it is in the top k."""
        started = time.perf_counter()
        target = state.get("target_id")
        rank = state.get("target_rank")
        found = rank is not None and rank < state["knobs"].k
        round_record = RoundRecord(
            round=state["round"],
            query=state["query"],
            feedback_kind=state["shown_kind"],
            synthetic_image=state.get("synthetic_image"),
            retrieved=state["retrieved"],
            target_rank=rank,
            feedback=None,
            differences=None,
            question=None,
        )
        decision = f"target at rank {rank}" if target else f"showing {len(state['retrieved'])} results"
        if found:
            decision += f" (< k={state['knobs'].k}): found"
        return {
            "rounds": [*state["rounds"], round_record],
            "found": found,
            "found_id": target if found else None,
            "steps": [step("present", state["round"], decision, started, target_rank=rank)],
        }

    def ask_question(self, state: GenIRState) -> dict[str, Any]:
        """ChatIR: the questioner asks about the image from the dialogue so far (before any interrupt, so a
        resumed round asks nothing again)."""
        started = time.perf_counter()
        try:
            question = self.questioner.ask(state["dialogue"])
            decision = "asked a question"
        except MalformedOutputError as e:
            question = "What else do you see in the picture?"
            decision = f"the questioner could not ask ({e}): a generic question"
        record = step("ask_question", state["round"], decision, started, question=question)
        return {"question": question, "steps": [record]}

    def _shown_path(self, state: GenIRState) -> Path | None:
        if state["shown_kind"] == "visual" and state.get("synthetic_image"):
            return self.artifacts.path(str(state["synthetic_image"]))
        if state["shown_kind"] == "prediction" and state["retrieved"]:
            return Path(state["retrieved"][0]["path"])
        return None

    def feedback(self, state: GenIRState) -> dict[str, Any]:
        """Ask the person (interrupt; an empty answer is asked again) or the simulated user."""
        started = time.perf_counter()
        question = state.get("question") if state["shown_kind"] == "chatir" else None
        current = RoundRecord(**{**state["rounds"][-1], "question": question})
        shown = self._shown_path(state)
        if state["user"] == "person":
            ask = GENIR_CHATIR_ASK.format(question=question) if question else GENIR_FEEDBACK_ASK
            request: dict[str, Any] = {
                "round": state["round"],
                "query": state["query"],
                "feedback_kind": state["shown_kind"],
                "synthetic_image": str(shown) if shown and state["shown_kind"] == "visual" else None,
                "retrieved": state["retrieved"],
                "ask": ask,
            }
            while True:
                answer = str(interrupt(self.publish(request)) or "").strip()
                if not answer:
                    request = {**request, "ask": ask if question else GENIR_EMPTY_FEEDBACK_ASK}
                    continue
                try:
                    found_id = resolve_found(answer, state["retrieved"])
                    break
                except FoundError as e:
                    request = {**request, "ask": str(e)}
            updated = RoundRecord(**{**current, "feedback": answer})
            decision = f"person found {found_id}" if found_id else "person gave feedback"
            return {
                "rounds": [*state["rounds"][:-1], updated],
                "found": found_id is not None,
                "found_id": found_id,
                "next_query": None,
                "steps": [step("feedback", state["round"], decision, started, feedback=answer)],
            }
        target = Path(str(state["target_path"]))
        if question is not None:
            return self._answer(state, current, target, question, started)
        try:
            turn = self._user(state).respond(target, state["query"], state["shown_kind"], shown)
            next_query, differences = turn.query or None, turn.differences
            decision = "simulated user compared and rewrote" if next_query else "simulated user gave no query"
        except MalformedOutputError as e:
            next_query, differences = None, None
            decision = f"simulated user gave nothing usable ({e})"
        updated = RoundRecord(**{**current, "feedback": next_query, "differences": differences})
        return {
            "rounds": [*state["rounds"][:-1], updated],
            "next_query": next_query,
            "steps": [step("feedback", state["round"], decision, started, differences=differences)],
        }

    def _answer(
        self, state: GenIRState, current: RoundRecord, target: Path, question: str, started: float
    ) -> dict[str, Any]:
        """ChatIR: the simulated user answers the question about its target; the dialogue grows by that turn."""
        try:
            answer: str | None = self._user(state).answer(target, question)
            decision = "simulated user answered the question"
        except MalformedOutputError as e:
            answer, decision = None, f"simulated user gave no answer ({e})"
        updated = RoundRecord(**{**current, "feedback": answer})
        return {
            "rounds": [*state["rounds"][:-1], updated],
            "next_query": answer,
            "steps": [step("feedback", state["round"], decision, started, question=question, answer=answer)],
        }

    def rewrite(self, state: GenIRState) -> dict[str, Any]:
        """query_{t+1}: the simulated user's own rewrite, or the person's feedback folded in by the VLM."""
        started = time.perf_counter()
        update: dict[str, Any] = {}
        if state["shown_kind"] == "chatir":
            answer = state["rounds"][-1]["feedback"]
            dialogue = (
                [*state["dialogue"], dialogue_turn(str(state["question"]), answer)] if answer else state["dialogue"]
            )
            query, update["dialogue"] = dialogue_query(dialogue), dialogue
            decision = "added the answer to the dialogue" if answer else "kept the dialogue: no answer"
        elif state["user"] == "simulated":
            query = state.get("next_query") or state["query"]
            decision = "next query from the simulated user" if state.get("next_query") else "kept the previous query"
        else:
            feedback = str(state["rounds"][-1]["feedback"])
            try:
                query = self.refiner.refine(state["query"], feedback, self._shown_path(state)) or state["query"]
                decision = "folded the feedback into a new query"
            except MalformedOutputError as e:
                query = f"{state['query']}; {feedback}"
                decision = f"refiner could not answer ({e}): appended the feedback to the query"
        return {
            **update,
            "query": query,
            "round": state["round"] + 1,
            "steps": [step("rewrite", state["round"], decision, started, query=query)],
        }

    def finish(self, state: GenIRState) -> dict[str, Any]:
        """Say why the search stopped."""
        started = time.perf_counter()
        reason = "found" if state.get("found") else "max_rounds"
        record = step("finish", state["round"], f"stop: {reason}", started, found_id=state.get("found_id"))
        update: dict[str, Any] = {"stop_reason": reason, "steps": [record]}
        if self.publish is not kept:  # the dialogue as its reader names images: each drawing by its file
            drawn = [{**r, "synthetic_image": self.artifacts.file(r["synthetic_image"])} for r in state["rounds"]]
            update |= self.publish({"rounds": drawn, "steps": [*state["steps"], record]})
            update["steps"] = Overwrite(update["steps"])
        return update


GenIRGraph = CompiledStateGraph[GenIRState, KnobContext, GenIRInput, GenIROutput]


def build_genir_graph(
    vlm: VisionLanguageModel,
    generator: ImageGenerator | None,
    retriever: GenIRRetriever,
    artifacts: ArtifactStore,
    checkpointer: Checkpointer = None,
    *,
    defaults: SimulatedUserKnobs | Callable[[], SimulatedUserKnobs] | None = None,
    context_schema: type[KnobContext] = GenIRContext,
    paths: PathResolver = as_given,
    publish: Publish = kept,
) -> GenIRGraph:
    """Wire the GenIR loop; a person's feedback needs a checkpointer and a thread_id to interrupt.

    `generator` may be None for verbal and prediction feedback, which never draw. `defaults` are the
    knobs of a run whose context leaves them unset (or a function returning them, read when a run starts);
    `paths` resolves a simulated user's `target_path` (a face confines it to its roots); `publish` names the
    images of the question asked and of the dialogue answered (see `Publish`).
    """
    nodes = _Nodes(vlm, generator, retriever, artifacts, defaults or SimulatedUserKnobs(), paths, publish)
    graph = StateGraph(GenIRState, context_schema=context_schema, input_schema=GenIRInput, output_schema=GenIROutput)
    graph.add_node("prepare", nodes.prepare)
    graph.add_node("describe_target", nodes.describe_target)
    graph.add_node("choose_feedback", nodes.choose_feedback)
    graph.add_node("generate_synthetic", nodes.generate_synthetic)
    graph.add_node("retrieve", nodes.retrieve)
    graph.add_node("present", nodes.present)
    graph.add_node("ask_question", nodes.ask_question)
    graph.add_node("feedback", nodes.feedback)
    graph.add_node("rewrite", nodes.rewrite)
    graph.add_node("finish", nodes.finish)
    graph.add_edge(START, "prepare")
    graph.add_conditional_edges("prepare", route_after_prepare, ["describe_target", "choose_feedback"])
    graph.add_edge("describe_target", "choose_feedback")
    graph.add_conditional_edges("choose_feedback", route_after_choice, ["generate_synthetic", "retrieve"])
    graph.add_edge("generate_synthetic", "retrieve")
    graph.add_edge("retrieve", "present")
    graph.add_conditional_edges("present", route_after_present, ["ask_question", "feedback", "finish"])
    graph.add_edge("ask_question", "feedback")
    graph.add_conditional_edges("feedback", route_after_feedback, ["rewrite", "finish"])
    graph.add_edge("rewrite", "choose_feedback")
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=checkpointer, name="genir")
