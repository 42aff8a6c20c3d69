"""One declaration per knob: each loop's model (`imageloop.knobs`) and what is derived from it agree.

The faces' side of it (every face exposes every knob the same way) is the face contract suite's
(`tests/test_faces.py`); here, the declarations themselves and the resolution every graph shares.
"""

from __future__ import annotations

import itertools

import annotated_types
import pytest
from pydantic import ValidationError

from imageloop import limits
from imageloop.config import Settings, load_settings
from imageloop.errors import ConfigError
from imageloop.knobs import (
    LOOPS,
    CIRKnobs,
    GenIREvalKnobs,
    ImageRAGKnobs,
    RAGEKnobs,
    SimulatedUserKnobs,
    TripletsKnobs,
    describe_knob,
)
from imageloop.tools.indexing.options import IndexOptions

MODELS = [ImageRAGKnobs, SimulatedUserKnobs, GenIREvalKnobs, RAGEKnobs, CIRKnobs, TripletsKnobs, IndexOptions]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_every_knob_is_described(model: type) -> None:
    undescribed = [name for name, info in model.model_fields.items() if not (info.description or "").strip()]
    assert undescribed == []


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.__name__)
def test_a_bounded_knob_takes_its_range_and_default_from_the_limits_table(model: type) -> None:
    for name, info in model.model_fields.items():
        bound = limits.BOUNDS.get({"concurrency": "triplet_concurrency"}.get(name, name))
        if bound is None:
            continue
        low = next(m.ge for m in info.metadata if isinstance(m, annotated_types.Ge))
        high = next(m.le for m in info.metadata if isinstance(m, annotated_types.Le))
        assert (low, high, info.default) == (bound.low, bound.high, bound.default), name


def test_a_knob_two_loops_share_means_the_same_in_both() -> None:
    for first, second in itertools.combinations(MODELS, 2):
        for name in set(first.model_fields) & set(second.model_fields):
            a, b = first.model_fields[name], second.model_fields[name]
            assert (a.annotation, a.default, a.metadata) == (b.annotation, b.default, b.metadata), name


def test_the_settings_hold_every_loop_knob_a_profile_may_set() -> None:
    for model in (ImageRAGKnobs, GenIREvalKnobs, RAGEKnobs, CIRKnobs):
        assert set(model.model_fields) <= set(Settings.model_fields)


def test_a_profile_and_the_environment_set_a_loops_defaults() -> None:
    settings = load_settings("imagerag-paper", environ={"IMAGELOOP_TOP_K": "2", "IMAGELOOP_SIZE": "64x48"})
    knobs = ImageRAGKnobs.from_settings(settings)
    assert (knobs.critic, knobs.top_k, knobs.size) == ("paper", 2, (64, 48))


@pytest.mark.parametrize(("loop", "model"), list(LOOPS.items()))
def test_an_unknown_knob_is_refused_naming_the_valid_ones(loop: str, model: type) -> None:
    with pytest.raises(ConfigError, match=rf"unknown {loop} knob 'top_kk': expected one of .*\bseed\b"):
        model.given({"top_kk": 2})


def test_a_value_past_its_bound_is_refused_in_the_tables_words() -> None:
    with pytest.raises(ConfigError, match=r"^max_iterations 11 is out of range: 1\.\.10$"):
        ImageRAGKnobs.given({"max_iterations": 11})


def test_a_value_of_the_wrong_kind_is_one_line_naming_the_knob() -> None:
    with pytest.raises(ConfigError, match=r"^invalid knob critic: "):
        ImageRAGKnobs.given({"critic": "harsh"})


def test_a_run_overrides_only_the_knobs_it_asks_for() -> None:
    defaults = ImageRAGKnobs(top_k=2, critic="paper")
    run = defaults.overridden({"max_iterations": 3, "top_k": None})
    assert (run.max_iterations, run.top_k, run.critic) == (3, 2, "paper")


def test_changed_by_names_only_the_knobs_that_differ() -> None:
    started = RAGEKnobs(k=5)
    assert started.changed_by({"k": 5, "review": "critic"}) == {"review": ("none", "critic")}


def test_the_run_context_makes_every_knob_optional_with_the_same_description_and_bound() -> None:
    context = CIRKnobs.context_schema()
    assert context.__name__ == "CIRContext" and context().set_values() == {}
    for name, info in CIRKnobs.model_fields.items():
        derived = context.model_fields[name]
        assert (derived.default, derived.description, derived.metadata) == (None, describe_knob(info), info.metadata)


def test_the_run_context_is_built_from_a_dict_as_langgraph_builds_it() -> None:
    context = ImageRAGKnobs.context_schema()(**{"max_iterations": 3, "size": "32x48"})
    assert context.set_values() == {"max_iterations": 3, "size": (32, 48)}


def test_a_frozen_knob_model_cannot_be_changed_after_a_run_resolved_it() -> None:
    with pytest.raises(ValidationError):
        ImageRAGKnobs().top_k = 3  # type: ignore[misc]
