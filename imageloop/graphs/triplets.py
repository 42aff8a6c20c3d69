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
"""

from __future__ import annotations

import operator
import random
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.runtime import Runtime
from langgraph.types import Checkpointer, Overwrite, Send
from typing_extensions import TypedDict

from imageloop import limits
from imageloop.agents.triplet_scripter import TripletChecker, TripletScript, TripletScripter
from imageloop.errors import ConfigError, MalformedOutputError
from imageloop.graphs.steps import Step, step
from imageloop.prompts.cir import EDIT_GUIDANCE
from imageloop.prompts.diptych import diptych_description
from imageloop.protocols import VisionLanguageModel
from imageloop.tools.generators.diptych import DiptychPainter, split_diptych
from imageloop.tools.triplet_dataset import TripletDataset, TripletRecord

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


class TripletsKnobs(TypedDict):
    """The per-run knobs, as state holds them once `prepare` resolved them."""

    n: int
    objects: list[str]
    edits: list[str]
    seed: int
    size: tuple[int, int]
    steps_per_image: int | None
    check: bool
    max_attempts: int
    concurrency: int


KNOB_DEFAULTS = TripletsKnobs(
    n=1,
    objects=[],
    edits=list(EDIT_TYPES),
    seed=0,
    size=DEFAULT_SIZE,
    steps_per_image=None,
    check=False,
    max_attempts=3,
    concurrency=int(limits.default("triplet_concurrency") or 2),
)


@dataclass(kw_only=True)
class TripletsContext:
    """Per-run knobs (LangGraph run context); a field left None takes the graph's defaults."""

    n: int | None = field(default=None, metadata={"description": "triplets the folder should hold"})
    objects: list[str] | None = field(default=None, metadata={"description": "objects to script triplets about"})
    edits: list[str] | None = field(default=None, metadata={"description": "edit types: add delete replace ..."})
    seed: int | None = field(default=None, metadata={"description": "sampling and drawing seed"})
    size: tuple[int, int] | None = field(default=None, metadata={"description": "[width, height] of the diptych"})
    steps: int | None = field(default=None, metadata={"description": "denoising steps"})
    check: bool | None = field(default=None, metadata={"description": "have a VLM check each drawing"})
    max_attempts: int | None = field(default=None, metadata={"description": "drawings per triplet (check on)"})
    concurrency: int | None = field(default=None, metadata={"description": "triplets in flight at once"})


class TripletsInput(TypedDict, total=False):
    """The user's real triplets as examples: `{"reference_text", "change", "target_text", "edit"}` (texts only)."""

    examples: list[dict[str, str]]


class TripletsOutput(TypedDict, total=False):
    """What the run did."""

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


class TripletsState(TripletsKnobs, total=False):
    """The resolved knobs, the slots left and the counts."""

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


def resolve_knobs(defaults: TripletsKnobs, context: TripletsContext | None) -> TripletsKnobs:
    """The run's knobs: the context's where given, else `defaults`, each checked."""
    knobs = TripletsKnobs(**defaults)
    for f in fields(TripletsContext) if context else ():
        value = getattr(context, f.name)
        if value is None:
            continue
        if f.name == "size":
            knobs["size"] = limits.check_size((int(value[0]), int(value[1]))) or DEFAULT_SIZE
        elif f.name == "steps":
            limits.check("steps", value)
            knobs["steps_per_image"] = int(value)
        else:
            knobs[f.name] = value  # type: ignore[literal-required]
    limits.check("triplets", knobs["n"])
    limits.check("triplet_concurrency", knobs["concurrency"])
    limits.check("seed", knobs["seed"])
    objects = [o.strip() for o in knobs["objects"] if o.strip()]
    if not objects:
        raise ConfigError("no objects to script triplets about: give a file with one object a line")
    unknown = [e for e in knobs["edits"] if e not in EDIT_TYPES]
    if unknown or not knobs["edits"]:
        raise ConfigError(f"edit types {', '.join(unknown) or '(none)'}: expected some of {', '.join(EDIT_TYPES)}")
    if not 1 <= knobs["max_attempts"] <= 10:
        raise ConfigError(f"max_attempts {knobs['max_attempts']} is out of range: 1..10")
    return TripletsKnobs(**{**knobs, "objects": objects, "edits": list(dict.fromkeys(knobs["edits"]))})


# Routing: pure functions of state.


def fan_out(state: TripletsState) -> list[Send] | Literal["finish"]:
    """One `synthesize` per slot of the batch `plan` took; no batch ends the run."""
    if not state["batch"]:
        return "finish"
    sends = []
    for slot in state["batch"]:
        subject, edit = slot_pair(state["seed"], slot, state["objects"], state["edits"])
        task = SlotTask(
            slot=slot, object=subject, edit=edit,
            examples=pick_examples(state["examples"], state["example_edits"], edit, slot), seed=state["seed"],
            size=state["size"], steps_per_image=state["steps_per_image"], check=state["check"],
            max_attempts=state["max_attempts"],
        )  # fmt: skip
        sends.append(Send("synthesize", task))
    return sends


class _Nodes:
    """Node functions closed over the backends and the dataset they use."""

    def __init__(
        self,
        llm: VisionLanguageModel,
        checker: VisionLanguageModel | None,
        painter: DiptychPainter,
        dataset: TripletDataset,
        defaults: TripletsKnobs,
    ) -> None:
        self.scripter = TripletScripter(llm)
        self.checker = TripletChecker(checker) if checker is not None else None
        self.painter = painter
        self.dataset = dataset
        self.defaults = defaults

    def prepare(self, state: TripletsState, runtime: Runtime[TripletsContext]) -> dict[str, Any]:
        """Resolve the knobs and find the slots of 0..n-1 the folder does not hold yet."""
        started = time.perf_counter()
        knobs = resolve_knobs(self.defaults, runtime.context)
        if knobs["check"] and self.checker is None:
            raise ConfigError("checking drawings needs a VLM: configure one")
        given = state.get("examples") or []
        examples = [
            {
                "reference": e.get("reference_text", ""),
                "change": e.get("change", ""),
                "target": e.get("target_text", ""),
            }
            for e in given
        ]
        example_edits = [e.get("edit", "") for e in given]
        held = self.dataset.ids()
        slots = [slot for slot in range(knobs["n"]) if triplet_id(slot) not in held]
        decision = f"{len(slots)} of {knobs['n']} triplets to make ({len(held)} in the folder)"
        record = step("prepare", 0, decision, started, examples=len(examples))
        return {
            **knobs, "examples": examples, "example_edits": example_edits, "slots": slots, "cursor": 0, "batch": [],
            "written": Overwrite(0), "failed": Overwrite(0), "rejected": Overwrite(0), "total": len(held),
            "pending": len(slots), "steps": Overwrite([record]),
        }  # fmt: skip

    def plan(self, state: TripletsState) -> dict[str, Any]:
        """Take the next `concurrency` slots (`fan_out` sends them); at the end, an empty batch."""
        started = time.perf_counter()
        batch = state["slots"][state["cursor"] : state["cursor"] + state["concurrency"]]
        decision = f"slots {batch[0]}..{batch[-1]}" if batch else "no slots left"
        record = step("plan", state["cursor"], decision, started, written=state["written"])
        return {"batch": batch, "cursor": state["cursor"] + len(batch), "steps": [record]}

    def synthesize(self, task: SlotTask) -> dict[str, Any]:
        """Script, draw, split, (check) and append one triplet; a failure is counted, never fatal."""
        started = time.perf_counter()
        slot = task["slot"]
        try:
            script = self.scripter.script(task["object"], task["edit"], task["examples"])
        except MalformedOutputError as e:
            return {"failed": 1, "steps": [step("synthesize", slot, f"no script ({e})", started)]}
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
            self.dataset.add(record, reference, target)
            decision = f"wrote {record.id}: {task['edit']} {task['object']!r}, {script.change!r}"
            return {"written": 1, "steps": [step("synthesize", slot, decision, started, attempt=attempt, seed=seed)]}
        decision = f"{task['max_attempts']} drawings rejected by the check"
        return {"rejected": 1, "steps": [step("synthesize", slot, decision, started)]}

    def _accepted(self, reference: Any, target: Any, script: TripletScript) -> bool:
        """The checker's verdict on the two halves (shown to it as files); no verdict is a rejection."""
        assert self.checker is not None  # prepare refuses check without a VLM
        with tempfile.TemporaryDirectory() as folder:
            paths = Path(folder) / "reference.png", Path(folder) / "target.png"
            reference.save(paths[0])
            target.save(paths[1])
            try:
                return self.checker.check(paths[0], paths[1], script).valid
            except MalformedOutputError:
                return False

    def finish(self, state: TripletsState) -> dict[str, Any]:
        """Count what the folder holds now."""
        started = time.perf_counter()
        held = self.dataset.ids()
        total = len(held)
        pending = sum(1 for slot in range(state["n"]) if triplet_id(slot) not in held)
        decision = f"wrote {state['written']}, failed {state['failed']}, rejected {state['rejected']}; {total} held"
        return {"total": total, "pending": pending, "steps": [step("finish", 0, decision, started)]}


TripletsGraph = CompiledStateGraph[TripletsState, TripletsContext, TripletsInput, TripletsOutput]


def build_triplets_graph(
    llm: VisionLanguageModel,
    painter: DiptychPainter,
    dataset: TripletDataset,
    checkpointer: Checkpointer = None,
    *,
    checker: VisionLanguageModel | None = None,
    defaults: TripletsKnobs = KNOB_DEFAULTS,
) -> TripletsGraph:
    """Wire triplet synthesis into `dataset` (opened, so held by this process); `checker` enables the check."""
    nodes = _Nodes(llm, checker, painter, dataset, defaults)
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
