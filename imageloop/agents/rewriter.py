"""The query rewriter: one stand-alone, detailed retrieval caption per missing concept."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from imageloop.agents.structured import ask_structured
from imageloop.errors import MalformedOutputError
from imageloop.prompts import CAPTIONS_PROMPT, CRITIC_SYSTEM
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel


class RetrievalCaption(BaseModel):
    """A caption to search the index with, and the concept it stands for."""

    model_config = ConfigDict(extra="forbid")

    concept: str
    caption: str


class RetrievalCaptions(BaseModel):
    """The rewriter's answer."""

    model_config = ConfigDict(extra="forbid")

    captions: list[RetrievalCaption]


class QueryRewriter:
    """Turns concepts into retrieval captions; raises MalformedOutputError when it cannot."""

    def __init__(self, vlm: VisionLanguageModel, *, decoding: Decoding = GREEDY) -> None:
        self.vlm = vlm
        self.decoding = decoding

    def write_captions(self, prompt: str, concepts: list[str]) -> list[RetrievalCaption]:
        """One caption per concept, in the concepts' order, matched by concept name or position."""
        messages = [
            Message("system", CRITIC_SYSTEM),
            Message("user", CAPTIONS_PROMPT.format(prompt=prompt, concepts=json.dumps(concepts))),
        ]
        answer = ask_structured(self.vlm, messages, RetrievalCaptions, self.decoding).captions
        by_concept = {c.concept.strip().lower(): c.caption.strip() for c in answer}
        captions: list[RetrievalCaption] = []
        for position, concept in enumerate(concepts):
            text = by_concept.get(concept.lower())
            if text is None and len(answer) == len(concepts):
                text = answer[position].caption.strip()
            if not text:
                raise MalformedOutputError(f"{self.vlm.model_id} wrote no retrieval caption for {concept!r}")
            captions.append(RetrievalCaption(concept=concept, caption=text))
        return captions
