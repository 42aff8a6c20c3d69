"""Rewrites a GenIR query from a person's feedback into the next stand-alone query."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict

from imageloop.agents.structured import ask_structured
from imageloop.prompts import QUERY_REFINER_PROMPT, QUERY_REFINER_SHOWN
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel


class RefinedQuery(BaseModel):
    """The refiner's answer."""

    model_config = ConfigDict(extra="forbid")

    query: str


class QueryRefiner:
    """Folds a person's feedback into the query; raises MalformedOutputError when it cannot."""

    def __init__(self, vlm: VisionLanguageModel, *, decoding: Decoding = GREEDY) -> None:
        self.vlm = vlm
        self.decoding = decoding

    def refine(self, query: str, feedback: str, shown: Path | None) -> str:
        """The next query; the synthetic image is attached when there is one, so "bluer" has a referent."""
        text = QUERY_REFINER_PROMPT.format(query=query, feedback=feedback, shown=QUERY_REFINER_SHOWN if shown else "")
        message = Message("user", text, (shown,) if shown else ())
        return ask_structured(self.vlm, [message], RefinedQuery, self.decoding).query.strip()
