"""The ImageRAG critic: does an image match its prompt, which concepts are missing, how to search for them?

Two critics, one interface (`ImageCritic.critique`):

- `Critic` asks the decision and the missing concepts in ONE structured call (JSON, few-shot); the
  `QueryRewriter` then writes the retrieval captions in a second call.
- `PaperCritic` asks as the paper's released code does (rotem-shalev/ImageRAG @ 16c9502, utils.py
  `retrieval_caption_generation`): the decision alone, then the missing concepts, then one caption per
  concept, in one conversation whose first turn carries the image, with plain-text answers. It writes
  the retrieval captions itself.

`bench/critic.py` measures what the extra turns cost per judged image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, ConfigDict

from imageloop import limits
from imageloop.agents.rewriter import RetrievalCaption
from imageloop.agents.structured import ask_structured, ask_text
from imageloop.errors import MalformedOutputError
from imageloop.knobs import PlanScope
from imageloop.prompts import (
    CRITIC_PROMPT,
    CRITIC_SYSTEM,
    PAPER_CONCEPT_LIMIT,
    PAPER_CRITIC_CAPTIONS,
    PAPER_CRITIC_CONCEPTS,
    PAPER_CRITIC_DECISION,
    PAPER_PLAN_CONCEPTS,
    PLAN_EVERY_CONCEPT_PROMPT,
    PLAN_PROMPT,
)
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel

"""Generation mode's question: the concepts a model is likely not to know ("rare"), or every concept the
prompt needs, as the released code asks ("every")."""

PAPER_CONCEPT_TRIES = 3
"""utils.py l.44-59: a concepts answer saying "unable" or "can't" is asked again, 3 times in all."""

PAPER_REFUSAL_MARKERS = ("unable", "can't")
"""utils.py l.51, matched case-sensitively as there."""

_LIST_MARK = re.compile(r"^(?:\d+[.)]|[-*•])\s*")


class CriticVerdict(BaseModel):
    """The single-call critic's answer about one image (also the JSON schema it is asked for)."""

    model_config = ConfigDict(extra="forbid")

    aligned: bool
    missing_concepts: list[str]


class ConceptPlan(BaseModel):
    """The concepts a prompt needs references for (generation mode, before any image exists)."""

    model_config = ConfigDict(extra="forbid")

    missing_concepts: list[str]


@dataclass(frozen=True)
class Critique:
    """What a critic says about one image, or (generation mode) about a prompt before any image exists.

    `retrieval_captions` holds the captions when the critic wrote them itself (`PaperCritic`), one per
    concept in order, possibly fewer than the concepts; empty when a rewriter must write them.
    """

    aligned: bool
    missing_concepts: list[str]
    retrieval_captions: list[RetrievalCaption] = field(default_factory=list)


class ImageCritic(Protocol):
    """What the ImageRAG graph asks a critic: judge `image` against `prompt`, or plan from the prompt alone."""

    def critique(self, prompt: str, image: Path | None, max_concepts: int | None) -> Critique: ...


def clean_concepts(concepts: list[str], max_concepts: int | None) -> list[str]:
    """Strip, drop empties and case-insensitive duplicates, and keep at most `max_concepts` (None: all)."""
    seen: set[str] = set()
    kept: list[str] = []
    for concept in concepts:
        text = concept.strip().strip(".")
        if text and text.lower() not in seen:
            seen.add(text.lower())
            kept.append(text)
    return kept if max_concepts is None else kept[:max_concepts]


def answer_lines(text: str) -> list[str]:
    """One item per non-empty line, without list numbers, bullets or quotes (as utils.py l.3-14 cleans captions)."""
    items = (_LIST_MARK.sub("", line.strip()).replace('"', "").replace("'", "").strip() for line in text.splitlines())
    return [item for item in items if item]


def stated_limit(max_concepts: int | None) -> int:
    """The limit our critic's questions state: `max_concepts`, or with none the most a critique may name."""
    return int(limits.BOUNDS["max_concepts"].high) if max_concepts is None else max_concepts


class Critic:
    """Asks a VLM the paper's questions in one structured call; raises MalformedOutputError when it cannot answer."""

    def __init__(
        self, vlm: VisionLanguageModel, *, plan_scope: PlanScope = "rare", decoding: Decoding = GREEDY
    ) -> None:
        self.vlm = vlm
        self.plan_scope = plan_scope
        self.decoding = decoding

    def judge(self, prompt: str, image: Path, max_concepts: int | None) -> CriticVerdict:
        """Check `image` against `prompt`; an aligned verdict carries no missing concepts."""
        limit = stated_limit(max_concepts)
        messages = [
            Message("system", CRITIC_SYSTEM),
            Message("user", CRITIC_PROMPT.format(prompt=prompt, max_concepts=limit), (image,)),
        ]
        verdict = ask_structured(self.vlm, messages, CriticVerdict, self.decoding)
        concepts = [] if verdict.aligned else clean_concepts(verdict.missing_concepts, limit)
        return CriticVerdict(aligned=verdict.aligned, missing_concepts=concepts)

    def plan(self, prompt: str, max_concepts: int | None) -> list[str]:
        """Name the concepts `prompt` needs references for, without a draft (generation mode)."""
        limit = stated_limit(max_concepts)
        question = PLAN_EVERY_CONCEPT_PROMPT if self.plan_scope == "every" else PLAN_PROMPT
        messages = [
            Message("system", CRITIC_SYSTEM),
            Message("user", question.format(prompt=prompt, max_concepts=limit)),
        ]
        plan = ask_structured(self.vlm, messages, ConceptPlan, self.decoding)
        return clean_concepts(plan.missing_concepts, limit)

    def critique(self, prompt: str, image: Path | None, max_concepts: int | None) -> Critique:
        """`judge` the image, or `plan` when there is none; the captions are left to the rewriter."""
        if image is None:
            return Critique(aligned=False, missing_concepts=self.plan(prompt, max_concepts))
        verdict = self.judge(prompt, image, max_concepts)
        return Critique(aligned=verdict.aligned, missing_concepts=verdict.missing_concepts)


def decision_turn(prompt: str, image: Path) -> Message:
    """The released critic's first turn: the decision question, with the image (utils.py l.68-70)."""
    return Message("user", PAPER_CRITIC_DECISION.format(prompt=prompt), (image,))


class PaperCritic:
    """The released code's critic: three turns of one conversation, plain text; raises MalformedOutputError.

    Greedy by default, as the code's `message_gpt` (temperature 0). `max_concepts=None` asks with no
    limit, as the OmniGen script does; a number adds the code's "Return up to k concepts." (the SDXL
    script asks for 1).
    """

    def __init__(self, vlm: VisionLanguageModel, *, decoding: Decoding = GREEDY) -> None:
        self.vlm = vlm
        self.decoding = decoding

    def decide(self, prompt: str, image: Path) -> tuple[bool, str]:
        """The decision alone (whether `image` matches), and the answer as given: the conversation's next turn."""
        answer = ask_text(self.vlm, [decision_turn(prompt, image)], self.decoding)
        return "yes" in answer.lower(), answer  # utils.py l.71

    def judge(self, prompt: str, image: Path, max_concepts: int | None) -> Critique:
        """Ask the decision alone; if not aligned, the missing concepts and their captions in the same conversation."""
        aligned, answer = self.decide(prompt, image)
        if aligned:
            return Critique(aligned=True, missing_concepts=[])
        return self._concepts_then_captions(
            [decision_turn(prompt, image), Message("assistant", answer)], PAPER_CRITIC_CONCEPTS, max_concepts
        )

    def plan(self, prompt: str, max_concepts: int | None) -> Critique:
        """Generation mode: every concept the prompt needs (no image), then their captions in the same conversation."""
        return self._concepts_then_captions([], PAPER_PLAN_CONCEPTS.format(prompt=prompt), max_concepts)

    def critique(self, prompt: str, image: Path | None, max_concepts: int | None) -> Critique:
        """`judge` the image, or `plan` when there is none."""
        return self.plan(prompt, max_concepts) if image is None else self.judge(prompt, image, max_concepts)

    def _concepts_then_captions(self, conversation: list[Message], question: str, max_concepts: int | None) -> Critique:
        """Ask for the concepts (again after a refusal, as the code does), then one caption per concept."""
        if max_concepts is not None:
            question += "\n" + PAPER_CONCEPT_LIMIT.format(max_concepts=max_concepts)
        asked = Message("user", question)
        for _ in range(PAPER_CONCEPT_TRIES):
            concepts_answer = ask_text(self.vlm, [*conversation, asked], self.decoding)
            if not any(marker in concepts_answer for marker in PAPER_REFUSAL_MARKERS):
                break
        else:
            raise MalformedOutputError(
                f"{self.vlm.model_id} named no missing concepts in {PAPER_CONCEPT_TRIES} tries: {concepts_answer[:200]}"
            )
        named = answer_lines(concepts_answer)
        concepts = clean_concepts(named, max_concepts)
        if not concepts:
            raise MalformedOutputError(f"{self.vlm.model_id} named no missing concepts: {concepts_answer[:200]}")
        conversation = [
            *conversation,
            asked,
            Message("assistant", concepts_answer),
            Message("user", PAPER_CRITIC_CAPTIONS),
        ]
        captions = answer_lines(ask_text(self.vlm, conversation, self.decoding))
        if not captions:
            raise MalformedOutputError(f"{self.vlm.model_id} wrote no retrieval captions")
        # One caption per line of the concepts answer, in order (k_captions_per_concept=1); the concepts
        # dropped as duplicates or beyond the limit take their captions with them.
        by_concept: dict[str, str] = {}
        for line, caption in zip(named, captions, strict=False):
            by_concept.setdefault(line.strip(".").lower(), caption)
        paired = [
            RetrievalCaption(concept=c, caption=by_concept[c.lower()]) for c in concepts if c.lower() in by_concept
        ]
        return Critique(aligned=False, missing_concepts=concepts, retrieval_captions=paired)
