"""Every loop's knobs, each declared once: name, type, default, bound and a one-sentence description.

A loop's knobs are one model here; everything else is derived from it and never written again:
- `Settings` (`imageloop.config`) inherits the loops' models, so profiles, paper presets and `IMAGELOOP_*`
  variables set a knob's default for the whole process;
- the run context (`context_schema()`: every knob optional, None meaning "the settings' value"), which
  LangGraph builds from a run's `context` and Studio shows as a form; an unknown name is refused there
  with the valid ones, a value past its bound in the words of `imageloop.limits`;
- the CLI's options (`imageloop.cli`), the agent tools' arguments (`imageloop.app.agent_tools`, for MCP
  and LangChain alike) and the run record, written from the model `prepare` resolved into state.

Bounds (range and, for bounded knobs, the default) come from the one table, `imageloop.limits`.
A job's options for running on a Ray cluster (`RayOptions`) are declared here too, and derived alike.
Adding a knob is one field here (plus its test): every face, schema and record has it.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Optional, Self, TypeAlias

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from imageloop import limits
from imageloop.errors import ConfigError, ImageloopError

Mode = Literal["draft_first", "generation"]
CriticKind = Literal["single_call", "paper"]
PlanScope = Literal["rare", "every"]
RetrievalQuery = Literal["caption", "concept", "prompt"]
ReferencesPolicy = Literal["replace", "accumulate"]
FinalImage = Literal["best", "last"]
ReferenceTrim = Literal["score", "order"]
Rerank = Literal["none", "vlm"]
FeedbackKind = Literal["visual", "verbal", "prediction", "hybrid", "chatir"]
SimulatedUserStyle = Literal["ours", "paper"]
HybridRule = Literal["confidence", "oracle", "random"]
HybridFallback = Literal["prediction", "verbal"]
IndexRoute = Literal["any", "image"]
ReviewKind = Literal["none", "person", "critic"]


def _size(value: Any) -> Any:
    """`WIDTHxHEIGHT` text (an option, `IMAGELOOP_SIZE`) or a pair, each side within the limits' bounds."""
    if isinstance(value, str):
        return limits.parse_size(value)
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return limits.check_size((int(value[0]), int(value[1])))
    return value


def _ks(value: Any) -> Any:
    """`1,5,10` text or a sequence: each K within the bound of k, sorted, unique."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    try:
        ks = sorted({int(str(item).strip()) for item in items if str(item).strip()})
    except ValueError:
        raise ConfigError(f"ks {value!r}: expected K values such as 1,5,10") from None
    if not ks:
        raise ConfigError("ks is empty: expected K values such as 1,5,10")
    bound = limits.BOUNDS["k"]
    if not bound.low <= ks[0] <= ks[-1] <= bound.high:
        raise ConfigError(f"each K must be within {bound.low:g}..{bound.high:g}, got {value!r}")
    return tuple(ks)


Size = Annotated[tuple[int, int] | None, BeforeValidator(_size)]
Ks = Annotated[tuple[int, ...] | None, BeforeValidator(_ks)]


def knob(default: Any = ..., *, bound: str | None = None, description: str | None = None) -> Any:
    """A knob's field: its default and description, and with `bound` the range (and default) of that bound."""
    if bound is None:
        return Field(default, description=description)
    spec = limits.BOUNDS[bound]
    value = spec.default if default is ... else default
    return Field(value, ge=spec.low, le=spec.high, description=description or spec.description)


def one_line(error: ValidationError, what: str) -> ImageloopError:
    """A validation error as one line: a value past a bound in the table's words, else the field and why."""
    first = error.errors()[0]
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, ImageloopError):  # a validator's own one-line error (pydantic wraps it)
        return cause
    field = ".".join(str(p) for p in first["loc"])
    if field in limits.BOUNDS and first["type"] in ("greater_than_equal", "less_than_equal"):
        try:
            limits.check(field, float(first["input"]))
        except ConfigError as e:
            return e
    return ConfigError(f"invalid {what} {field}: {first['msg']}")


class Knobs(BaseModel):
    """The knobs of one loop, resolved: what a run runs with and what its record says it ran with."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    LOOP: ClassVar[str] = "drawing"

    @classmethod
    def context_schema(cls) -> type[KnobContext]:
        """The run context: every knob optional (None: the settings' value), checked as the knob is."""
        return _context_schema(cls)

    @classmethod
    def given(cls, values: Given = None) -> KnobContext:
        """What a run asks for: `values` checked (unknown names and values past a bound refused)."""
        if isinstance(values, KnobContext):
            return values
        return cls.context_schema()(**dict(values or {}))

    @classmethod
    def from_settings(cls, settings: BaseModel) -> Self:
        """The process's defaults for this loop: the settings' value of each knob they hold."""
        held = set(type(settings).model_fields) & set(cls.model_fields)
        return cls.model_validate(settings.model_dump(include=held))

    def overridden(self, given: Given) -> Self:
        """These knobs with what a run asks for (unset or None: keep them), checked."""
        asked = type(self).given(given).set_values()
        unknown = set(asked) - set(type(self).model_fields)
        if unknown:
            raise unknown_knob(self.LOOP, sorted(unknown)[0], type(self).model_fields)
        try:
            return type(self).model_validate({**self.model_dump(), **asked})
        except ValidationError as e:
            raise one_line(e, "knob") from None

    def changed_by(self, given: Given) -> dict[str, tuple[Any, Any]]:
        """The knobs `given` would change: name → (this value, the asked one)."""
        asked = type(self).given(given).set_values()
        current = self.model_dump()
        return {name: (current[name], value) for name, value in asked.items() if current.get(name) != value}

    def record(self) -> dict[str, Any]:
        """The knobs as a run's record keeps them (JSON values)."""
        return self.model_dump(mode="json")


def unknown_knob(loop: str, name: str, valid: Mapping[str, Any]) -> ConfigError:
    """The one error for a misspelled or foreign knob, naming the valid ones."""
    return ConfigError(f"unknown {loop} knob {name!r}: expected one of {', '.join(valid)}")


class KnobContext(BaseModel):
    """A run's knobs as asked (each None or unset: the settings' value); built by LangGraph from a run's context."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    KNOBS: ClassVar[type[Knobs]] = Knobs

    def __init__(self, /, **given: Any) -> None:
        """Refuse an unknown name with the valid ones, and a bad value in one line, whichever face sent them."""
        fields = type(self).model_fields
        unknown = sorted(set(given) - set(fields))
        if unknown:
            raise unknown_knob(self.KNOBS.LOOP, unknown[0], fields)
        try:
            super().__init__(**given)
        except ValidationError as e:
            raise one_line(e, "knob") from None

    def set_values(self) -> dict[str, Any]:
        """The knobs this run asked for (None is "not asked"), restricted to the loop's own."""
        knobs = self.KNOBS.model_fields
        return {name: value for name, value in self.model_dump().items() if value is not None and name in knobs}


Given: TypeAlias = KnobContext | Mapping[str, Any] | None
"""The knobs a run asks for: the loop's run context (`Knobs.given`) or a mapping of knob names; unset: the settings'."""


def run_context(knobs: type[Knobs], name: str, **extra: Any) -> type[KnobContext]:
    """A loop's run context plus `extra` per-run fields that are not knobs (what a run is about: its target, a
    filter), each None unless given. Context, not input: a run's context is its own, while an input field a
    later run on the same thread leaves out would keep the earlier run's value."""
    fields: dict[str, Any] = {field: (kind, Field(None, description=text)) for field, (kind, text) in extra.items()}
    return create_model(name, __base__=knobs.context_schema(), **fields)


@functools.cache
def _context_schema(knobs: type[Knobs]) -> type[KnobContext]:
    fields: dict[str, Any] = {}
    for name, info in knobs.model_fields.items():
        optional: Any = Optional[info.annotation]  # noqa: UP045  # a runtime type object, built here
        annotation = Annotated[(optional, *info.metadata)] if info.metadata else optional
        fields[name] = (annotation, Field(None, description=describe_knob(info)))
    name = knobs.__name__.removesuffix("Knobs") + "Context"
    schema = create_model(name, __base__=KnobContext, __doc__=f"{knobs.LOOP}: a run's knobs.", **fields)
    schema.KNOBS = knobs
    return schema


def describe_knob(info: FieldInfo) -> str:
    """A knob's description as every face shows it: what it does, and its default (None: its text says)."""
    return f"{info.description}" if info.default is None else f"{info.description} (default: {info.default})"


# The knobs every loop that draws has, declared once.


class Drawing(Knobs):
    """How a generator draws: shared by every loop that draws, kept by a session for all its drawings."""

    seed: int = knob(bound="seed", description="generator seed (a regeneration takes the next)")
    size: Size = knob(None, description="[width, height] of the drawings in pixels; unset: the backend's own")
    steps: int | None = knob(bound="steps", description="denoising steps of diffusion backends; unset: their own")


class ImageRAGKnobs(Drawing):
    """ImageRAG: draft, critique, retrieve a reference per missing concept, regenerate with them."""

    LOOP: ClassVar[str] = "imagerag"
    mode: Mode = knob("draft_first", description="draft_first critiques a draft; generation plans concepts first")
    max_iterations: int = knob(bound="max_iterations")
    similarity_threshold: float | None = knob(bound="similarity_threshold")
    top_k: int = knob(bound="top_k")
    max_concepts: int | None = knob(
        bound="max_concepts",
        description="missing concepts the critic may name; none: as the released scripts ask (SDXL one, OmniGen any)",
    )
    critic: CriticKind = knob("single_call", description="single_call (one JSON call) or paper (the released one)")
    plan_scope: PlanScope = knob("rare", description="generation mode plans the rare concepts, or every concept")
    retrieval_query: RetrievalQuery = knob("caption", description="search with the caption, concept word or prompt")
    rephrase_only: bool = knob(False, description="ablation: the VLM rephrases the prompt; nothing is retrieved")
    references_policy: ReferencesPolicy = knob("replace", description="each iteration replaces or adds references")
    final_image_policy: FinalImage = knob("best", description="return the best judged image or the last one")
    judge_last: bool = knob(True, description="the critic judges the last regeneration too (the released code: no)")
    reference_trim: ReferenceTrim = knob(
        "score", description="past the generator's capacity keep the best-scoring references, or the first in order"
    )
    rerank: Rerank = knob("none", description="ablation: a VLM picks each concept's references among the top 6")


class GenIRKnobs(Drawing):
    """GenIR: a search, round by round, for an image someone has in mind."""

    LOOP: ClassVar[str] = "genir"
    feedback: FeedbackKind = knob(
        "visual", description="what each round shows: visual draws the query; chatir asks a question instead"
    )
    rounds: int = knob(bound="rounds")
    k: int = knob(bound="k", description="results per round (the Hits@K cut-off)")
    hybrid_threshold: float = knob(bound="hybrid_threshold")
    index_route: IndexRoute = knob("any", description="image refuses an index of caption embeddings, as GenIR searches")


class SimulatedUserKnobs(GenIRKnobs):
    """GenIR with a simulated user looking for a known target (the graph's knobs; an evaluation's per target)."""

    simulated_user: SimulatedUserStyle = knob("ours", description="ours (one structured call) or paper (released)")
    user_temperature: float | None = knob(bound="user_temperature")
    user_top_p: float | None = knob(bound="user_top_p")
    user_repetition_penalty: float | None = knob(bound="user_repetition_penalty")
    rank_depth: int = knob(bound="rank_depth")


class GenIREvalKnobs(SimulatedUserKnobs):
    """A GenIR evaluation: the simulated user's search per target, scored at several K, hybrid chosen per query."""

    ks: Ks = knob(None, description="Hits@K for each K from the same dialogues (default: k)")
    hybrid_rule: HybridRule = knob("confidence", description="hybrid: confidence (per round), oracle or random")
    hybrid_visual_fraction: float = knob(bound="hybrid_visual_fraction")
    hybrid_fallback: HybridFallback = knob("prediction", description="per-query hybrid without a drawing shows this")


class RAGEKnobs(Drawing):
    """RAGE: retrieve from a catalogue, a person picks, generate with the picks and the prompt verbatim."""

    LOOP: ClassVar[str] = "rage"
    k: int = knob(bound="k", description="candidates retrieved and shown")
    similarity_threshold: float | None = knob(bound="similarity_threshold")
    auto_select: int = knob(bound="auto_select")
    review: ReviewKind = knob("none", description="who checks each image: none, person or critic (a VLM)")
    max_generations: int = knob(bound="max_generations")


class CIRKnobs(Drawing):
    """Composed image retrieval: a reference image and a change find the target."""

    LOOP: ClassVar[str] = "cir"
    k: int = knob(bound="k", description="results to return")
    proxy: bool = knob(False, description="also draw the edited scene and fuse its scores (slower)")
    fusion_lambda: float = knob(bound="fusion_lambda")
    rerank_depth: int = knob(bound="rerank_depth")
    verify: int = knob(bound="verify")
    cir_model: Annotated[str | None, Field(max_length=limits.PATH_CHARS)] = knob(
        None, description="a composed-query model folder `train cir` wrote, instead of a description"
    )


class TripletsKnobs(Drawing):
    """DAIG's triplet synthesis: script, draw a diptych, split, keep."""

    LOOP: ClassVar[str] = "triplets"
    check: bool = knob(False, description="have a VLM check each drawing (DAIG does not)")
    max_attempts: int = knob(bound="max_attempts")
    concurrency: int = knob(bound="triplet_concurrency")


LOOPS: dict[str, type[Knobs]] = {
    "imagerag": ImageRAGKnobs,
    "genir": SimulatedUserKnobs,
    "rage": RAGEKnobs,
    "cir": CIRKnobs,
    "triplets": TripletsKnobs,
}
"""Each graph's knob model, by the graph's name."""


# Where a job runs: not a loop's knob but a job's option, the same for every job that hands out items.

RAY_ADDRESS = r"^(local|auto|ray://[^\s/:]+:[0-9]{1,5})$"


class RayOptions(BaseModel):
    """Where a job's items run when not in this process: a Ray cluster, its workers and what each one holds
    (`imageloop.app.cluster` runs them; every face derives its options from these fields)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ray: str | None = Field(
        None,
        pattern=RAY_ADDRESS,
        description="run on a Ray cluster: local (start one on this machine), auto (the one in RAY_ADDRESS) or "
        "ray://HOST:PORT; unset: in this process",
    )
    workers: int | None = knob(bound="workers")
    gpus_per_worker: float | None = knob(bound="gpus_per_worker")
    cpus_per_worker: float = knob(bound="cpus_per_worker")
