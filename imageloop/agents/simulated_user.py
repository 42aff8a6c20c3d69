"""GenIR's simulated user: sees the target and the system's feedback, says what differs, rewrites.

This is the paper's compare-then-refine: the VLM first states the differences between the image it
looks for and the image it was shown, then writes a new query that stands alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from imageloop.agents.structured import ask_structured
from imageloop.prompts import (
    SIMULATED_USER_DESCRIBE,
    SIMULATED_USER_PREDICTION,
    SIMULATED_USER_VERBAL,
    SIMULATED_USER_VISUAL,
)
from imageloop.protocols import Message, VisionLanguageModel

ShownKind = Literal["visual", "prediction", "verbal"]


class SimulatedUserTurn(BaseModel):
    """What the simulated user says in one round."""

    model_config = ConfigDict(extra="forbid")

    differences: str
    query: str


class SimulatedUser:
    """Plays the person searching for `target`; raises MalformedOutputError when its VLM cannot answer."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.vlm = vlm

    def describe(self, target: Path) -> str:
        """The first query: a short from-memory description of the target."""
        turn = ask_structured(self.vlm, [Message("user", SIMULATED_USER_DESCRIBE, (target,))], SimulatedUserTurn)
        return turn.query.strip()

    def respond(self, target: Path, query: str, kind: ShownKind, shown: Path | None) -> SimulatedUserTurn:
        """Compare the target with what was shown (a synthetic or retrieved image, or nothing) and rewrite."""
        if kind == "verbal" or shown is None:
            message = Message("user", SIMULATED_USER_VERBAL.format(query=query), (target,))
        else:
            template = SIMULATED_USER_VISUAL if kind == "visual" else SIMULATED_USER_PREDICTION
            message = Message("user", template.format(query=query), (target, shown))
        turn = ask_structured(self.vlm, [message], SimulatedUserTurn)
        return SimulatedUserTurn(differences=turn.differences.strip(), query=turn.query.strip())
