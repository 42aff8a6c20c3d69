"""DAIG's triplet synthesis as a LangGraph state machine: (object, edit) pairs → scripted, drawn, split triplets.

```
START → prepare → plan ─slots left→ synthesize ×c (Send, one per slot) → plan …
                    └─none left──→ finish
```

The dataset folder is the run's checkpoint. Triplet i ("slot" i, id `t0000042`) is the same job in
every run: its (object, edit) pair and its seeds come from (seed, i) alone, so `prepare` finds the
slots of 0..n-1 the folder lacks and `plan` hands them out, `concurrency` at a time; each
`synthesize` scripts {T_r, T_c, T_t} with the LLM (few-shot from the user's real triplets), renders
the diptych with the in-context description (`imageloop.prompts.diptych`; left = reference, right =
target) through a painter that may carry a CIR-LoRA, splits the halves, optionally has a VLM check
them (off by default: DAIG uses no filter; a rejected drawing is redrawn with the next seed, up to
`max_attempts`), and appends the triplet to the folder. A run killed at any point and run again
ends with exactly n triplets, none twice. State holds slot numbers, counts and caps, never images.
One slot's work is `TripletMaker.make`, which writes nothing: the `synthesize` node appends what it made,
as the driver of a run on a Ray cluster does with what its workers made (`imageloop.app.triplets`).
"""

from __future__ import annotations

import operator
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer, Overwrite, Send
from PIL import Image
from typing_extensions import TypedDict

from imageloop import limits
from imageloop.agents.triplet_scripter import TripletChecker, TripletScript, TripletScripter
from imageloop.errors import ConfigError, MalformedOutputError
from imageloop.graphs.steps import Step, step
from imageloop.knobs import KnobContext, TripletsKnobs
from imageloop.prompts.cir import EDIT_GUIDANCE
from imageloop.prompts.diptych import diptych_description
from imageloop.protocols import VisionLanguageModel
from imageloop.tools.generators.diptych import DiptychPainter, split_diptych
from imageloop.tools.triplet_dataset import TripletDataset, TripletRecord
from imageloop.tracing import traced_vlm

EDIT_TYPES: tuple[str, ...] = tuple(EDIT_GUIDANCE)
"""DAIG's edit types: add, delete, replace, viewpoint, count."""
EXAMPLES_PER_SCRIPT = 3
DEFAULT_SIZE = (1024, 512)


def triplet_id(slot: int) -> str:
    """The id of slot `slot`'s triplet."""
    return f"t{slot:07d}"


def slot_pair(seed: int, slot: int, objects: Sequence[str], edits: Sequence[str]) -> tuple[str, str]:
    """The (object, edit type) of slot `slot`: drawn from (seed, slot) alone, so every run agrees."""
    rng = random.Random(f"{seed}:{slot}")
    return rng.choice(list(objects)), rng.choice(list(edits))


def slot_seed(seed: int, slot: int, attempt: int) -> int:
    """The generator seed of a slot's `attempt`-th drawing."""
    return (seed * 1_000_003 + slot * 101 + attempt) % (2**32)


Example = dict[str, str]
"""A real triplet's texts as the scripter shows them: `{"reference", "change", "target"}` (captions may be empty)."""


def pick_examples(examples: Sequence[Example], edits: Sequence[str], edit: str, slot: int) -> list[Example]:
    """Up to three examples, those of the same edit type first, chosen per slot (seeded)."""
    rng = random.Random(f"examples:{slot}")
    same = [e for e, kind in zip(examples, edits, strict=True) if kind == edit]
    other = [e for e, kind in zip(examples, edits, strict=True) if kind != edit]
    rng.shuffle(same)
    rng.shuffle(other)
    return (same + other)[:EXAMPLES_PER_SCRIPT]


TripletsContext = TripletsKnobs.context_schema()
"""Per-run knobs (LangGraph run context): each unset one takes the graph's defaults."""


class TripletsInput(TypedDict, total=False):
    """What to make: `n` triplets about `objects` with DAIG's `edits`, and the user's real triplets as examples
    (`{"reference_text", "change", "target_text", "edit"}`, texts only)."""

    n: int
    objects: list[str]
    edits: list[str]
    examples: list[dict[str, str]]


class TripletsOutput(TypedDict, total=False):
    """What the run did."""

    knobs: TripletsKnobs
    written: int
    failed: int
    rejected: int
    total: int
    pending: int
    steps: list[Step]


class SlotTask(TypedDict):
    """What one `synthesize` branch receives through `Send`."""

    slot: int
    object: str
    edit: str
    examples: list[Example]
    seed: int
    size: tuple[int, int]
    steps_per_image: int | None
    check: bool
    max_attempts: int


class TripletsState(TypedDict, total=False):
    """The resolved knobs, what to make, the slots left and the counts."""

    knobs: TripletsKnobs
    n: int
    objects: list[str]
    edits: list[str]
    examples: list[Example]
    example_edits: list[str]
    slots: list[int]
    cursor: int
    batch: list[int]
    written: Annotated[int, operator.add]
    failed: Annotated[int, operator.add]
    rejected: Annotated[int, operator.add]
    total: int
    pending: int
    steps: Annotated[list[Step], operator.add]


def check_request(n: Any, objects: Any, edits: Any) -> tuple[int, list[str], list[str]]:
    """What a run is asked to make, checked: n within its bound, some objects, DAIG's edit types (each once)."""
    limits.check("triplets", n)
    object_list = [str(o).strip() for o in objects or [] if str(o).strip()]
    if not object_list:
        raise ConfigError("no objects to script triplets about: give a file with one object a line")
    edit_list = list(dict.fromkeys(str(e) for e in edits or EDIT_TYPES))
    unknown = [e for e in edit_list if e not in EDIT_TYPES]
    if unknown or not edit_list:
        raise ConfigError(f"edit types {', '.join(unknown) or '(none)'}: expected some of {', '.join(EDIT_TYPES)}")
    return int(n), object_list, edit_list


def few_shot(given: Sequence[dict[str, str]]) -> tuple[list[Example], list[str]]:
    """The user's real triplets as the scripter shows them, and each one's edit type."""
    examples = [
        {"reference": e.get("reference_text", ""), "change": e.get("change", ""), "target": e.get("target_text", "")}
        for e in given
    ]
    return examples, [e.get("edit", "") for e in given]


def slot_task(
    knobs: TripletsKnobs,
    slot: int,
    objects: Sequence[str],
    edits: Sequence[str],
    examples: Sequence[Example],
    example_edits: Sequence[str],
) -> SlotTask:
    """Everything slot `slot` needs to be made, from the run's knobs and request alone (so every run agrees)."""
    subject, edit = slot_pair(knobs.seed, slot, objects, edits)
    return SlotTask(
        slot=slot, object=subject, edit=edit, examples=pick_examples(examples, example_edits, edit, slot),
        seed=knobs.seed, size=knobs.size or DEFAULT_SIZE, steps_per_image=knobs.steps, check=knobs.check,
        max_attempts=knobs.max_attempts,
    )  # fmt: skip


def missing_slots(held: set[str], n: int) -> list[int]:
    """The slots of 0..n-1 whose triplet is not among the `held` ids."""
    return [slot for slot in range(n) if triplet_id(slot) not in held]


def held_counts(dataset: TripletDataset, n: int) -> tuple[int, int]:
    """How many triplets the folder holds, and how many of slots 0..n-1 it still lacks."""
    held = dataset.ids()
    return len(held), len(missing_slots(held, n))


@dataclass(frozen=True)
class SlotOutcome:
    """What making one slot came to: `counted` as written (with its record and halves), failed or rejected,
    the step that says so, and the painter that drew it."""

    counted: Literal["written", "failed", "rejected"]
    step: Step
    painter: str
    record: TripletRecord | None = None
    reference: Image.Image | None = None
    target: Image.Image | None = None

    def keep(self, dataset: TripletDataset) -> None:
        """Append the triplet made, if one was, to the dataset folder (held by this process)."""
        if self.record is not None and self.reference is not None and self.target is not None:
            dataset.add(self.record, self.reference, self.target)


class TripletMaker:
    """One slot's work, the same in a graph's node and on a cluster's worker: script, draw, split, (check).

    It writes nothing: whoever holds the dataset folder appends what it made.
    """

    def __init__(
        self, llm: VisionLanguageModel, painter: DiptychPainter, checker: VisionLanguageModel | None = None
    ) -> None:
        # Every model call becomes a run in the graph's trace (LangSmith, callback handlers).
        self.scripter = TripletScripter(traced_vlm(llm))
        self.checker = TripletChecker(traced_vlm(checker)) if checker is not None else None
        self.painter = painter

    def make(self, task: SlotTask) -> SlotOutcome:
        """The slot's triplet, or why there is none; a failure is an outcome, never an error."""
        started = time.perf_counter()
        slot = task["slot"]
        painter = self.painter.model_id
        try:
            script = self.scripter.script(task["object"], task["edit"], task["examples"])
        except MalformedOutputError as e:
            return SlotOutcome("failed", step("synthesize", slot, f"no script ({e})", started), painter)
        description = diptych_description(script.change, script.reference, script.target, task["object"])
        for attempt in range(task["max_attempts"] if task["check"] else 1):
            seed = slot_seed(task["seed"], slot, attempt)
            reference, target = split_diptych(
                self.painter.draw(description, seed, task["size"], task["steps_per_image"])
            )
            if task["check"] and not self._accepted(reference, target, script):
                continue
            reference_path, target_path = TripletDataset.image_paths(triplet_id(slot))
            record = TripletRecord(
                id=triplet_id(slot), object=task["object"], edit=task["edit"], reference_text=script.reference,
                change=script.change, target_text=script.target, reference_image=reference_path,
                target_image=target_path,
            )  # fmt: skip
            decision = f"wrote {record.id}: {task['edit']} {task['object']!r}, {script.change!r}"
            made = step("synthesize", slot, decision, started, attempt=attempt, seed=seed)
            return SlotOutcome("written", made, painter, record, reference, target)
        decision = f"{task['max_attempts']} drawings rejected by the check"
        return SlotOutcome("rejected", step("synthesize", slot, decision, started), painter)

    def _accepted(self, reference: Any, target: Any, script: TripletScript) -> bool:
        """The checker's verdict on the two halves (shown to it as files); no verdict is a rejection."""
        assert self.checker is not None  # a maker for a run that checks is built with its checker
        with tempfile.TemporaryDirectory() as folder:
            paths = Path(folder) / "reference.png", Path(folder) / "target.png"
            reference.save(paths[0])
            target.save(paths[1])
            try:
                return self.checker.check(paths[0], paths[1], script).valid
            except MalformedOutputError:
                return False


# Routing: pure functions of state.


def fan_out(state: TripletsState) -> list[Send] | Literal["finish"]:
    """One `synthesize` per slot of the batch `plan` took; no batch ends the run."""
    if not state["batch"]:
        return "finish"
    every = state["objects"], state["edits"], state["examples"], state["example_edits"]
    return [Send("synthesize", slot_task(state["knobs"], slot, *every)) for slot in state["batch"]]


class _Nodes:
    """Node functions closed over the slot maker and the dataset it fills."""

    def __init__(self, maker: TripletMaker, dataset: TripletDataset, defaults: TripletsKnobs) -> None:
        self.maker = maker
        self.dataset = dataset
        self.defaults = defaults

    def prepare(self, state: TripletsState, runtime: Runtime[KnobContext]) -> dict[str, Any]:
        """Resolve the knobs, check what to make and find the slots of 0..n-1 the folder does not hold yet."""
        started = time.perf_counter()
        knobs = self.defaults.overridden(runtime.context)
        n, objects, edits = check_request(state.get("n", 1), state.get("objects"), state.get("edits"))
        if knobs.check and self.maker.checker is None:
            raise ConfigError("checking drawings needs a VLM: configure a `vlm`")
        examples, example_edits = few_shot(state.get("examples") or [])
        held = self.dataset.ids()
        slots = missing_slots(held, n)
        decision = f"{len(slots)} of {n} triplets to make ({len(held)} in the folder)"
        record = step("prepare", 0, decision, started, examples=len(examples), knobs=knobs.record())
        return {
            "knobs": knobs, "n": n, "objects": objects, "edits": edits, "examples": examples,
            "example_edits": example_edits, "slots": slots, "cursor": 0, "batch": [],
            "written": Overwrite(0), "failed": Overwrite(0), "rejected": Overwrite(0), "total": len(held),
            "pending": len(slots), "steps": Overwrite([record]),
        }  # fmt: skip

    def plan(self, state: TripletsState) -> dict[str, Any]:
        """Take the next `concurrency` slots (`fan_out` sends them); at the end, an empty batch."""
        started = time.perf_counter()
        batch = state["slots"][state["cursor"] : state["cursor"] + state["knobs"].concurrency]
        decision = f"slots {batch[0]}..{batch[-1]}" if batch else "no slots left"
        record = step("plan", state["cursor"], decision, started, written=state["written"])
        return {"batch": batch, "cursor": state["cursor"] + len(batch), "steps": [record]}

    def synthesize(self, task: SlotTask) -> dict[str, Any]:
        """Make one slot's triplet and append it to the folder; a failure is counted, never fatal."""
        outcome = self.maker.make(task)
        outcome.keep(self.dataset)
        return {outcome.counted: 1, "steps": [outcome.step]}

    def finish(self, state: TripletsState) -> dict[str, Any]:
        """Count what the folder holds now."""
        started = time.perf_counter()
        total, pending = held_counts(self.dataset, state["n"])
        decision = f"wrote {state['written']}, failed {state['failed']}, rejected {state['rejected']}; {total} held"
        return {"total": total, "pending": pending, "steps": [step("finish", 0, decision, started)]}


TripletsGraph = CompiledStateGraph[TripletsState, KnobContext, TripletsInput, TripletsOutput]


def build_triplets_graph(
    llm: VisionLanguageModel,
    painter: DiptychPainter,
    dataset: TripletDataset,
    checkpointer: Checkpointer = None,
    *,
    checker: VisionLanguageModel | None = None,
    defaults: TripletsKnobs | None = None,
) -> TripletsGraph:
    """Wire triplet synthesis into `dataset` (opened, so held by this process); `checker` enables the check."""
    nodes = _Nodes(TripletMaker(llm, painter, checker), dataset, defaults or TripletsKnobs())
    graph = StateGraph(
        TripletsState, context_schema=TripletsContext, input_schema=TripletsInput, output_schema=TripletsOutput
    )
    node_functions: dict[str, Callable[..., dict[str, Any]]] = {
        "prepare": nodes.prepare,
        "plan": nodes.plan,
        "synthesize": nodes.synthesize,
        "finish": nodes.finish,
    }
    for name, function in node_functions.items():
        graph.add_node(name, function)
    graph.add_edge(START, "prepare")
    graph.add_edge("prepare", "plan")
    graph.add_conditional_edges("plan", fan_out, ["synthesize", "finish"])
    graph.add_edge("synthesize", "plan")
    graph.add_edge("finish", END)
    return graph.compile(checkpointer=checkpointer, name="triplets")
