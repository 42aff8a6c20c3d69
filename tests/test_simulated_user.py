"""GenIR's simulated user: the released code's prompts and sampling ("paper"), and our one-call style ("ours")."""

from __future__ import annotations

from pathlib import Path

import pytest

from imageloop.agents.simulated_user import PAPER_DECODING, ShownKind, SimulatedUser, SimulatedUserTurn
from imageloop.errors import MalformedOutputError
from imageloop.prompts import (
    GENIR_CAPTION,
    GENIR_CAPTION_SYSTEM,
    GENIR_COMPARE,
    GENIR_COMPARE_SYSTEM,
    GENIR_PREDICTION_CAPTION,
    GENIR_PREDICTION_CAPTION_SYSTEM,
    GENIR_PREDICTION_COMPARE,
    GENIR_PREDICTION_REFINE,
    GENIR_REFINE,
    GENIR_REFINE_SYSTEM,
    GENIR_VERBAL_REFINE,
    SIMULATED_USER_DESCRIBE,
)
from imageloop.protocols import GREEDY, Decoding, Message
from tests.fakes import ScriptedVLM

TARGET = Path("target.png")
SHOWN = Path("shown.png")
QUERY = "A red double-decker bus on a wet London street at dusk, reflections on the asphalt."
DIFFERENCES = "The target bus is green and the street is dry."
REFINED = "A green double-decker bus on a dry London street at dusk."


def texts(messages: list[Message]) -> list[tuple[str, str, tuple[Path, ...]]]:
    return [(m.role, m.text, m.images) for m in messages]


def paper_user(*answers: str) -> tuple[SimulatedUser, ScriptedVLM]:
    vlm = ScriptedVLM(list(answers))
    return SimulatedUser(vlm, style="paper"), vlm


def test_the_paper_users_first_query_is_a_detailed_diffusion_ready_caption_of_the_target() -> None:
    user, vlm = paper_user(f"  {QUERY}\n")
    assert user.describe(TARGET) == QUERY
    ((messages, schema),) = vlm.calls
    assert texts(messages) == [
        ("system", GENIR_CAPTION_SYSTEM.format(max_tokens=500), ()),
        ("user", GENIR_CAPTION, (TARGET,)),
    ]
    assert "for use as a prompt in a diffusion model" in GENIR_CAPTION
    assert schema is None


def test_the_paper_user_samples_as_the_released_code_does() -> None:
    user, vlm = paper_user(QUERY)
    user.describe(TARGET)
    assert vlm.decodings == [PAPER_DECODING]
    assert (PAPER_DECODING.temperature, PAPER_DECODING.top_p, PAPER_DECODING.repetition_penalty) == (0.7, 0.9, 1.1)


def test_prediction_feedback_starts_from_the_retrieval_caption_its_script_writes() -> None:
    user, vlm = paper_user(QUERY)
    user.describe(TARGET, kind="prediction")
    assert texts(vlm.calls[0][0]) == [
        ("system", GENIR_PREDICTION_CAPTION_SYSTEM.format(max_tokens=200), ()),
        ("user", GENIR_PREDICTION_CAPTION, (TARGET,)),
    ]


def test_visual_feedback_is_compared_then_refined_in_two_calls() -> None:
    user, vlm = paper_user(DIFFERENCES, REFINED)
    turn = user.respond(TARGET, QUERY, "visual", SHOWN)

    assert turn == SimulatedUserTurn(differences=DIFFERENCES, query=REFINED)
    compare, refine = (texts(messages) for messages, _ in vlm.calls)
    assert compare == [
        ("system", GENIR_COMPARE_SYSTEM.format(max_tokens=400), ()),
        ("user", GENIR_COMPARE.format(query=QUERY), (TARGET, SHOWN)),
    ]
    # The refinement sees the target alone, the differences and the previous caption, and stands alone.
    assert refine == [
        ("system", GENIR_REFINE_SYSTEM.format(max_tokens=500), ()),
        ("user", GENIR_REFINE.format(differences=DIFFERENCES, query=QUERY), (TARGET,)),
    ]
    assert vlm.decodings == [PAPER_DECODING, PAPER_DECODING]


def test_prediction_feedback_refines_from_both_images_and_records_the_comparison() -> None:
    user, vlm = paper_user(DIFFERENCES, REFINED)
    turn = user.respond(TARGET, QUERY, "prediction", SHOWN)

    assert turn == SimulatedUserTurn(differences=DIFFERENCES, query=REFINED)
    compare, refine = (messages[-1] for messages, _ in vlm.calls)
    assert (compare.text, compare.images) == (GENIR_PREDICTION_COMPARE.format(query=QUERY), (TARGET, SHOWN))
    assert (refine.text, refine.images) == (GENIR_PREDICTION_REFINE.format(query=QUERY, rank=0), (TARGET, SHOWN))
    assert DIFFERENCES not in refine.text


@pytest.mark.parametrize(("kind", "shown"), [("verbal", SHOWN), ("visual", None)])
def test_verbal_feedback_is_a_detail_critique_then_a_refinement(kind: ShownKind, shown: Path | None) -> None:
    user, vlm = paper_user(DIFFERENCES, REFINED)
    turn = user.respond(TARGET, QUERY, kind, shown)

    assert turn == SimulatedUserTurn(differences=DIFFERENCES, query=REFINED)
    critique, refine = (messages[-1] for messages, _ in vlm.calls)
    assert "'Detail Critic'" in critique.text and QUERY in critique.text and critique.images == (TARGET,)
    assert refine.text == GENIR_VERBAL_REFINE.format(differences=DIFFERENCES, query=QUERY, max_tokens=200)


def test_an_empty_answer_from_the_paper_user_is_malformed() -> None:
    user, _ = paper_user("   ")
    with pytest.raises(MalformedOutputError, match="empty answer"):
        user.describe(TARGET)


def test_the_paper_users_decoding_is_settable() -> None:
    seeded = Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1, seed=11)
    vlm = ScriptedVLM([DIFFERENCES, REFINED])
    SimulatedUser(vlm, style="paper", decoding=seeded).respond(TARGET, QUERY, "visual", SHOWN)
    assert vlm.decodings == [seeded, seeded]


# --- our style ---------------------------------------------------------------------------------------------


def test_our_user_answers_each_round_in_one_greedy_structured_call() -> None:
    vlm = ScriptedVLM([{"differences": "", "query": "a bus"}, {"differences": DIFFERENCES, "query": REFINED}])
    user = SimulatedUser(vlm)
    assert user.describe(TARGET) == "a bus"
    assert user.respond(TARGET, "a bus", "visual", SHOWN) == SimulatedUserTurn(differences=DIFFERENCES, query=REFINED)

    assert texts(vlm.calls[0][0]) == [("user", SIMULATED_USER_DESCRIBE, (TARGET,))]
    assert vlm.calls[1][0][-1].images == (TARGET, SHOWN)
    assert all(schema is not None for _, schema in vlm.calls)
    assert vlm.decodings == [GREEDY, GREEDY]
