"""The language roles of composed image retrieval: composing the edited description, and verifying a hit.

`EditComposer` is CIReVL's training-free step (prompt in `imageloop.prompts.cir`): reference
description + modification text → the target's description, read from the answer's
"Edited Description:" line; like CIReVL's code, an answer without one falls back to the modification
text itself. `ResultVerifier` is our addition: a VLM looks at the reference and the top hit and
either accepts the hit or rewrites the description.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from imageloop.agents.structured import ask_structured, ask_text
from imageloop.errors import MalformedOutputError
from imageloop.prompts.cir import COMPOSE_PROMPT, EDITED_DESCRIPTION_LABEL, VERIFY_PROMPT
from imageloop.protocols import Message, VisionLanguageModel


@dataclass(frozen=True)
class ComposedDescription:
    """The edited description and whether the model wrote it (False: the modification text stands in)."""

    text: str
    composed: bool


def edited_description(answer: str) -> str | None:
    """The text after the first line starting "Edited Description:" (CIReVL's rule), else None."""
    for line in answer.splitlines():
        stripped = line.strip()
        if stripped.lower().startswith(EDITED_DESCRIPTION_LABEL.lower()):
            return stripped[len(EDITED_DESCRIPTION_LABEL) :].strip() or None
    return None


class EditComposer:
    """Writes the description of the reference after the change, for text→image retrieval."""

    def __init__(self, llm: VisionLanguageModel) -> None:
        self.llm = llm

    def compose(self, description: str, change: str) -> ComposedDescription:
        """The edited description; the change text itself when the model gives no usable line."""
        prompt = COMPOSE_PROMPT.format(description=description.strip(), change=change.strip())
        try:
            text = edited_description(ask_text(self.llm, [Message("user", prompt)]))
        except MalformedOutputError:
            text = None
        return ComposedDescription(text, True) if text else ComposedDescription(change.strip(), False)


class Verdict(BaseModel):
    """The verifier's answer."""

    model_config = ConfigDict(extra="forbid")

    matches: bool
    description: str


class ResultVerifier:
    """Asks a VLM whether the top hit is the reference after the change; raises MalformedOutputError if unsure."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.vlm = vlm

    def verify(self, reference: Path, top_hit: Path, change: str, description: str) -> Verdict:
        """The verdict on `top_hit`, with a rewritten description when it does not match."""
        prompt = VERIFY_PROMPT.format(change=change.strip(), description=description.strip())
        verdict = ask_structured(self.vlm, [Message("user", prompt, (reference, top_hit))], Verdict)
        return Verdict(matches=verdict.matches, description=verdict.description.strip() or description)
