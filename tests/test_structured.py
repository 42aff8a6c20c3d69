"""Structured output: what a model may answer, and what ask_structured makes of it."""

from __future__ import annotations

import contextlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imageloop.agents.critic import CriticVerdict
from imageloop.agents.rewriter import RetrievalCaption, RetrievalCaptions
from imageloop.agents.structured import ask_structured
from imageloop.errors import MalformedOutputError
from imageloop.protocols import Message
from tests.fakes import ScriptedVLM
from tests.strategies import SCALARS, json_values

JUDGE = [Message("user", "Judge.")]
VERDICT_KEYS = ("aligned", "missing_concepts")
verdicts = st.builds(CriticVerdict, aligned=st.booleans(), missing_concepts=st.lists(st.text(max_size=10), max_size=3))
# Prose a model wraps around its JSON; a backtick would open another code fence.
prose = st.text(alphabet=st.characters(blacklist_characters="`"), max_size=30)


def test_an_answer_with_an_extra_key_is_used_as_it_is_without_a_repair() -> None:
    vlm = ScriptedVLM([{"aligned": False, "missing_concepts": ["a red kite"], "confidence": 0.9}])
    verdict = ask_structured(vlm, JUDGE, CriticVerdict)
    assert verdict == CriticVerdict(aligned=False, missing_concepts=["a red kite"])
    assert len(vlm.calls) == 1


def test_extra_keys_inside_nested_objects_are_ignored_too() -> None:
    answer = {"captions": [{"concept": "kite", "caption": "a red kite in the sky", "why": "absent"}], "note": "ok"}
    captions = ask_structured(ScriptedVLM([answer]), JUDGE, RetrievalCaptions)
    assert captions.captions == [RetrievalCaption(concept="kite", caption="a red kite in the sky")]


def test_a_missing_key_gets_one_repair_that_names_the_problem() -> None:
    vlm = ScriptedVLM([{"aligned": False}, {"aligned": False, "missing_concepts": ["a kite"]}])
    verdict = ask_structured(vlm, JUDGE, CriticVerdict)
    assert verdict.missing_concepts == ["a kite"]
    replayed, repair = vlm.calls[1][0][-2:]
    assert replayed == Message("assistant", '{"aligned": false}')
    assert repair.role == "user" and "Field required" in repair.text


def test_two_answers_with_a_missing_key_raise_malformed_output() -> None:
    with pytest.raises(MalformedOutputError, match="CriticVerdict"):
        ask_structured(ScriptedVLM([{"aligned": True}, {"missing_concepts": []}]), JUDGE, CriticVerdict)


@settings(max_examples=200, deadline=None)
@given(first=st.text(), second=st.text())
def test_any_text_gives_a_verdict_or_malformed_output(first: str, second: str) -> None:
    with contextlib.suppress(MalformedOutputError):
        assert isinstance(ask_structured(ScriptedVLM([first, second]), JUDGE, CriticVerdict), CriticVerdict)


@settings(max_examples=200, deadline=None)
@given(first=json_values(VERDICT_KEYS), second=json_values(VERDICT_KEYS))
def test_json_of_any_shape_gives_a_verdict_or_malformed_output(first: object, second: object) -> None:
    answers = [json.dumps(first), json.dumps(second)]
    with contextlib.suppress(MalformedOutputError):
        assert isinstance(ask_structured(ScriptedVLM(answers), JUDGE, CriticVerdict), CriticVerdict)


@settings(max_examples=100, deadline=None)
@given(
    verdict=verdicts,
    extra=st.dictionaries(st.text(max_size=8).filter(lambda k: k not in VERDICT_KEYS), SCALARS, max_size=4),
)
def test_extra_keys_never_change_the_answer(verdict: CriticVerdict, extra: dict[str, object]) -> None:
    vlm = ScriptedVLM([{**verdict.model_dump(), **extra}])
    assert ask_structured(vlm, JUDGE, CriticVerdict) == verdict


@settings(max_examples=100, deadline=None)
@given(verdict=verdicts, before=prose, after=prose, tag=st.sampled_from(["json", ""]))
def test_fenced_json_is_read_whatever_prose_surrounds_it(
    verdict: CriticVerdict, before: str, after: str, tag: str
) -> None:
    answer = f"{before}\n```{tag}\n{verdict.model_dump_json()}\n```\n{after}"
    assert ask_structured(ScriptedVLM([answer]), JUDGE, CriticVerdict) == verdict


def test_json_nested_deeper_than_the_stack_is_malformed_output() -> None:
    deep = "[" * 100_000
    with pytest.raises(MalformedOutputError):
        ask_structured(ScriptedVLM([deep, deep]), JUDGE, CriticVerdict)


def test_a_number_beyond_the_digit_limit_is_malformed_output() -> None:
    huge = '{"aligned": true, "missing_concepts": [], "n": ' + "9" * 5000 + "}"
    with pytest.raises(MalformedOutputError):
        ask_structured(ScriptedVLM([huge, huge]), JUDGE, CriticVerdict)
