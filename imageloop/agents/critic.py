"""The ImageRAG critic: does an image match its prompt, and which concepts are missing?"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from imageloop.agents.structured import ask_structured
from imageloop.prompts import CRITIC_PROMPT, CRITIC_SYSTEM, PLAN_PROMPT
from imageloop.protocols import Message, VisionLanguageModel


class CriticVerdict(BaseModel):
    """The critic's answer about one image."""

    model_config = ConfigDict(extra="forbid")

    aligned: bool
    missing_concepts: list[str]


class ConceptPlan(BaseModel):
    """The concepts a prompt needs references for (generation mode, before any image exists)."""

    model_config = ConfigDict(extra="forbid")

    missing_concepts: list[str]


def clean_concepts(concepts: list[str], max_concepts: int) -> list[str]:
    """Strip, drop empties and case-insensitive duplicates, and keep at most `max_concepts`."""
    seen: set[str] = set()
    kept: list[str] = []
    for concept in concepts:
        text = concept.strip().strip(".")
        if text and text.lower() not in seen:
            seen.add(text.lower())
            kept.append(text)
    return kept[:max_concepts]


class Critic:
    """Asks a VLM the paper's questions; raises MalformedOutputError when it cannot answer."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.vlm = vlm

    def judge(self, prompt: str, image: Path, max_concepts: int) -> CriticVerdict:
        """Check `image` against `prompt`; an aligned verdict carries no missing concepts."""
        messages = [
            Message("system", CRITIC_SYSTEM),
            Message("user", CRITIC_PROMPT.format(prompt=prompt, max_concepts=max_concepts), (image,)),
        ]
        verdict = ask_structured(self.vlm, messages, CriticVerdict)
        concepts = [] if verdict.aligned else clean_concepts(verdict.missing_concepts, max_concepts)
        return CriticVerdict(aligned=verdict.aligned, missing_concepts=concepts)

    def plan(self, prompt: str, max_concepts: int) -> list[str]:
        """Name the concepts `prompt` needs references for, without a draft (generation mode)."""
        messages = [
            Message("system", CRITIC_SYSTEM),
            Message("user", PLAN_PROMPT.format(prompt=prompt, max_concepts=max_concepts)),
        ]
        plan = ask_structured(self.vlm, messages, ConceptPlan)
        return clean_concepts(plan.missing_concepts, max_concepts)
