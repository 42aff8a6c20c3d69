"""The ImageRAG critics: the single structured call, and the paper's three-turn conversation."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from imageloop.agents.critic import Critic, Critique, PaperCritic, answer_lines
from imageloop.agents.rewriter import RetrievalCaption
from imageloop.agents.vlms.openai_compatible import OpenAIVisionLanguageModel
from imageloop.config import Endpoint
from imageloop.errors import MalformedOutputError
from imageloop.prompts import (
    PAPER_CRITIC_CAPTIONS,
    PAPER_CRITIC_CONCEPTS,
    PAPER_CRITIC_DECISION,
    PAPER_PLAN_CONCEPTS,
    PLAN_EVERY_CONCEPT_PROMPT,
    PLAN_PROMPT,
)
from imageloop.protocols import GREEDY, Decoding, Message
from tests.fake_openai_server import FakeOpenAIServer, chat_completion
from tests.fakes import ScriptedVLM

PROMPT = "a Cyanocitta cristata perched on a snowy branch, ukiyo-e style"
IMAGE = Path("draft.png")
CONCEPTS = "Cyanocitta cristata\nukiyo-e style"
CAPTIONS = "1. A blue jay with a blue crest perched on a branch.\n2. A Japanese ukiyo-e woodblock print of a bird."


def texts(messages: list[Message]) -> list[tuple[str, str, tuple[Path, ...]]]:
    return [(m.role, m.text, m.images) for m in messages]


# --- the paper's critic --------------------------------------------------------------------------------


def test_the_paper_critic_first_asks_the_decision_alone_with_the_image() -> None:
    vlm = ScriptedVLM(["Yes."])
    critique = PaperCritic(vlm).judge(PROMPT, IMAGE, 3)

    assert critique == Critique(aligned=True, missing_concepts=[])
    ((messages, schema),) = vlm.calls
    assert texts(messages) == [("user", PAPER_CRITIC_DECISION.format(prompt=PROMPT), (IMAGE,))]
    assert messages[0].text.endswith("consider both content and style aspects. only answer yes or no.")
    assert schema is None  # plain text, as the released code asks
    assert vlm.decodings == [GREEDY]  # the code's temperature 0


def test_a_no_brings_the_missing_concepts_then_one_caption_each_in_the_same_conversation() -> None:
    vlm = ScriptedVLM(["No.", CONCEPTS, CAPTIONS])
    critique = PaperCritic(vlm).judge(PROMPT, IMAGE, 3)

    assert critique == Critique(
        aligned=False,
        missing_concepts=["Cyanocitta cristata", "ukiyo-e style"],
        retrieval_captions=[
            RetrievalCaption(
                concept="Cyanocitta cristata", caption="A blue jay with a blue crest perched on a branch."
            ),
            RetrievalCaption(concept="ukiyo-e style", caption="A Japanese ukiyo-e woodblock print of a bird."),
        ],
    )
    decision = ("user", PAPER_CRITIC_DECISION.format(prompt=PROMPT), (IMAGE,))
    concepts_question = ("user", PAPER_CRITIC_CONCEPTS + "\nReturn up to 3 concepts.", ())
    assert [texts(messages) for messages, _ in vlm.calls] == [
        [decision],
        [decision, ("assistant", "No.", ()), concepts_question],
        [decision, ("assistant", "No.", ()), concepts_question, ("assistant", CONCEPTS, ()),
         ("user", PAPER_CRITIC_CAPTIONS, ())],
    ]  # fmt: skip


def test_the_paper_critic_never_tells_the_model_to_ignore_details() -> None:
    vlm = ScriptedVLM(["No", CONCEPTS, CAPTIONS])
    PaperCritic(vlm).judge(PROMPT, IMAGE, 3)
    asked = " ".join(m.text for messages, _ in vlm.calls for m in messages if m.role == "user")
    assert "minor" not in asked and "ignore" not in asked


def test_without_a_limit_the_concepts_are_asked_as_the_omnigen_script_asks_them() -> None:
    vlm = ScriptedVLM(["No", "a\nb\nc\nd", "w\nx\ny\nz"])
    critique = PaperCritic(vlm).judge(PROMPT, IMAGE, None)
    assert vlm.calls[1][0][-1].text == PAPER_CRITIC_CONCEPTS
    assert critique.missing_concepts == ["a", "b", "c", "d"]


def test_concepts_beyond_the_limit_are_dropped_with_their_captions() -> None:
    vlm = ScriptedVLM(["No", "a\nb\nc", "caption a\ncaption b\ncaption c"])
    critique = PaperCritic(vlm).judge(PROMPT, IMAGE, 1)
    assert critique.missing_concepts == ["a"]
    assert critique.retrieval_captions == [RetrievalCaption(concept="a", caption="caption a")]


def test_a_repeated_concept_does_not_shift_the_captions_of_those_after_it() -> None:
    vlm = ScriptedVLM(["No", "a blue jay\nA blue jay.\nsnow", "jay photo\njay close-up\nsnow photo"])
    critique = PaperCritic(vlm).judge(PROMPT, IMAGE, 3)
    assert critique.retrieval_captions == [
        RetrievalCaption(concept="a blue jay", caption="jay photo"),
        RetrievalCaption(concept="snow", caption="snow photo"),
    ]


def test_the_paper_conversation_reaches_an_openai_endpoint_as_plain_text_turns_with_the_image_first(
    openai_server: FakeOpenAIServer, tmp_path: Path
) -> None:
    draft = tmp_path / "draft.png"
    Image.new("RGB", (8, 8), (90, 60, 30)).save(draft)
    for answer in ("No.", CONCEPTS, CAPTIONS):
        openai_server.push("/v1/chat/completions", 200, chat_completion(answer))
    vlm = OpenAIVisionLanguageModel("gpt-4o", Endpoint(base_url=openai_server.base_url, api_key="sk-test"))

    critique = PaperCritic(vlm).judge(PROMPT, draft, 3)

    assert len(critique.retrieval_captions) == 2
    last = openai_server.requests_to("/v1/chat/completions")[-1].json
    assert "response_format" not in last and last["temperature"] == 0.0
    first, *rest = last["messages"]
    assert [part["type"] for part in first["content"]] == ["text", "image_url"]
    assert [(m["role"], m["content"]) for m in rest] == [
        ("assistant", "No."),
        ("user", PAPER_CRITIC_CONCEPTS + "\nReturn up to 3 concepts."),
        ("assistant", CONCEPTS),
        ("user", PAPER_CRITIC_CAPTIONS),
    ]


def test_a_concepts_answer_that_says_unable_is_asked_again() -> None:
    vlm = ScriptedVLM(["No", "I'm unable to tell.", CONCEPTS, CAPTIONS])
    critique = PaperCritic(vlm).judge(PROMPT, IMAGE, 3)
    assert critique.missing_concepts == ["Cyanocitta cristata", "ukiyo-e style"]
    assert vlm.calls[1][0] == vlm.calls[2][0]  # the same question, not the refusal fed back


def test_three_refusals_are_a_malformed_answer() -> None:
    vlm = ScriptedVLM(["No", "I can't say.", "I'm unable.", "I can't."])
    with pytest.raises(MalformedOutputError, match="named no missing concepts in 3 tries"):
        PaperCritic(vlm).judge(PROMPT, IMAGE, 3)
    assert len(vlm.calls) == 4


def test_no_caption_lines_are_a_malformed_answer() -> None:
    with pytest.raises(MalformedOutputError, match="wrote no retrieval captions"):
        PaperCritic(ScriptedVLM(["No", CONCEPTS, '-\n""\n'])).judge(PROMPT, IMAGE, 3)


def test_generation_mode_asks_every_concept_the_prompt_needs_without_an_image() -> None:
    vlm = ScriptedVLM(["Cyanocitta cristata\nsnowy branch\nukiyo-e style", "c1\nc2\nc3"])
    critique = PaperCritic(vlm).critique(PROMPT, None, None)

    assert critique.missing_concepts == ["Cyanocitta cristata", "snowy branch", "ukiyo-e style"]
    assert [c.caption for c in critique.retrieval_captions] == ["c1", "c2", "c3"]
    plan_question = PAPER_PLAN_CONCEPTS.format(prompt=PROMPT)
    assert texts(vlm.calls[0][0]) == [("user", plan_question, ())]
    assert "need to know to generate an image" in plan_question
    assert all(not m.images for messages, _ in vlm.calls for m in messages)


def test_the_paper_critics_decoding_is_settable() -> None:
    sampled = Decoding(temperature=0.5, seed=1)
    vlm = ScriptedVLM(["No", CONCEPTS, CAPTIONS])
    PaperCritic(vlm, decoding=sampled).judge(PROMPT, IMAGE, 3)
    assert vlm.decodings == [sampled] * 3


def test_answer_lines_drop_numbers_bullets_and_quotes_as_the_released_code_does() -> None:
    answer = '1. "a blue jay"\n\n- ukiyo-e style\n* snow\n2) a bird\'s nest\n'
    assert answer_lines(answer) == ["a blue jay", "ukiyo-e style", "snow", "a birds nest"]


# --- the single-call critic ----------------------------------------------------------------------------


def test_the_single_call_critic_judges_in_one_structured_call_and_leaves_captions_to_the_rewriter() -> None:
    vlm = ScriptedVLM([{"aligned": False, "missing_concepts": ["Cyanocitta cristata"]}])
    critique = Critic(vlm).critique(PROMPT, IMAGE, 3)

    assert critique == Critique(aligned=False, missing_concepts=["Cyanocitta cristata"], retrieval_captions=[])
    ((messages, schema),) = vlm.calls
    assert schema is not None and schema["name"] == "CriticVerdict"
    assert messages[-1].images == (IMAGE,)


def test_the_single_call_critic_plans_rare_concepts_by_default() -> None:
    vlm = ScriptedVLM([{"missing_concepts": ["Cyanocitta cristata"]}])
    critique = Critic(vlm).critique(PROMPT, None, 3)
    assert critique == Critique(aligned=False, missing_concepts=["Cyanocitta cristata"])
    assert vlm.calls[0][0][-1].text == PLAN_PROMPT.format(prompt=PROMPT, max_concepts=3)


def test_the_single_call_critic_can_plan_every_concept_as_the_released_code_does() -> None:
    vlm = ScriptedVLM([{"missing_concepts": ["Cyanocitta cristata", "snowy branch", "ukiyo-e style", "extra"]}])
    concepts = Critic(vlm, plan_scope="every").plan(PROMPT, 3)
    assert concepts == ["Cyanocitta cristata", "snowy branch", "ukiyo-e style"]
    assert vlm.calls[0][0][-1].text == PLAN_EVERY_CONCEPT_PROMPT.format(prompt=PROMPT, max_concepts=3)


def test_the_single_call_critics_decoding_is_settable() -> None:
    sampled = Decoding(temperature=0.3)
    vlm = ScriptedVLM([{"aligned": True, "missing_concepts": []}])
    Critic(vlm, decoding=sampled).judge(PROMPT, IMAGE, 3)
    assert vlm.decodings == [sampled]
