"""GenIR's simulated user: sees the target and the system's feedback, says what differs, rewrites its query.

Two styles:

- "paper", as the released code does it (mikelmh025/generative_ir @ 58891a5): round 0 is a detailed,
  diffusion-ready caption of the target; each later round is two plain-text calls, the differences
  between the target and what was shown, then a stand-alone refined caption. One script per kind of
  feedback, each with its own prompts and token budgets; sampling at temperature 0.7, top_p 0.9,
  repetition penalty 1.1 (genIR_CaptionImageRefinement.py l.351-359 and l.415-424).
- "ours": one structured call per round (differences and the new query as JSON), a one-sentence
  from-memory description at round 0, greedy.

With ChatIR feedback (the baseline GenIR compares with, not in its code) the user answers a question about
its target instead, in either style.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict

from imageloop.agents.structured import ask_structured, ask_text
from imageloop.knobs import SimulatedUserStyle
from imageloop.prompts import (
    CHATIR_ANSWER,
    GENIR_CAPTION,
    GENIR_CAPTION_SYSTEM,
    GENIR_COMPARE,
    GENIR_COMPARE_SYSTEM,
    GENIR_CRITIQUE,
    GENIR_CRITIQUE_SYSTEM,
    GENIR_PREDICTION_CAPTION,
    GENIR_PREDICTION_CAPTION_SYSTEM,
    GENIR_PREDICTION_COMPARE,
    GENIR_PREDICTION_COMPARE_SYSTEM,
    GENIR_PREDICTION_REFINE,
    GENIR_PREDICTION_REFINE_SYSTEM,
    GENIR_REFINE,
    GENIR_REFINE_SYSTEM,
    GENIR_VERBAL_REFINE,
    GENIR_VERBAL_REFINE_SYSTEM,
    SIMULATED_USER_DESCRIBE,
    SIMULATED_USER_PREDICTION,
    SIMULATED_USER_VERBAL,
    SIMULATED_USER_VISUAL,
)
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel

ShownKind = Literal["visual", "prediction", "verbal", "chatir"]

PAPER_DECODING = Decoding(temperature=0.7, top_p=0.9, repetition_penalty=1.1)
"""The released code's sampling for every simulated-user call."""

# Token budgets the released prompts name ("Keep your ... under N tokens"), per script and call.
VISUAL_CAPTION_TOKENS = 500  # genIR_CaptionImageRefinement.py l.263 (round 0 and refinements)
COMPARE_TOKENS = 400  # genIR_CaptionImageRefinement.py l.367, VIsualPredictionFeedBack.py l.421
BASELINE_TOKENS = 200  # VIsualPredictionFeedBack.py l.264, TextOnly.py l.110/183/250
PREDICTION_RANK = 0  # VIsualPredictionFeedBack.py l.646: the shown result is the top-ranked one
CRITIC_ROLE = "Detail Critic"  # TextOnly.py l.442


def user_decoding(
    style: SimulatedUserStyle,
    temperature: float | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
) -> Decoding:
    """The style's own decoding (the paper's sampling, or greedy for "ours") with any value given replacing its own."""
    base = PAPER_DECODING if style == "paper" else GREEDY
    return replace(
        base,
        temperature=base.temperature if temperature is None else temperature,
        top_p=base.top_p if top_p is None else top_p,
        repetition_penalty=base.repetition_penalty if repetition_penalty is None else repetition_penalty,
    )


class SimulatedUserTurn(BaseModel):
    """What the simulated user says in one round."""

    model_config = ConfigDict(extra="forbid")

    differences: str
    query: str


class SimulatedUser:
    """Plays the person searching for `target`; raises MalformedOutputError when its VLM cannot answer.

    `decoding` defaults to the style's own: the paper's sampling, or greedy for "ours".
    """

    def __init__(
        self, vlm: VisionLanguageModel, *, style: SimulatedUserStyle = "ours", decoding: Decoding | None = None
    ) -> None:
        self.vlm = vlm
        self.style = style
        self.decoding = decoding if decoding is not None else user_decoding(style)

    def describe(self, target: Path, kind: ShownKind = "visual") -> str:
        """The first query: the paper's detailed caption of the target (a retrieval caption for prediction
        feedback, as that script writes one), or our one-sentence from-memory description."""
        if self.style == "ours":
            message = Message("user", SIMULATED_USER_DESCRIBE, (target,))
            return ask_structured(self.vlm, [message], SimulatedUserTurn, self.decoding).query.strip()
        if kind == "prediction":
            system = GENIR_PREDICTION_CAPTION_SYSTEM.format(max_tokens=BASELINE_TOKENS)
            return self._ask(system, GENIR_PREDICTION_CAPTION, (target,))
        tokens = BASELINE_TOKENS if kind in ("verbal", "chatir") else VISUAL_CAPTION_TOKENS
        return self._ask(GENIR_CAPTION_SYSTEM.format(max_tokens=tokens), GENIR_CAPTION, (target,))

    def respond(self, target: Path, query: str, kind: ShownKind, shown: Path | None) -> SimulatedUserTurn:
        """Compare the target with what was shown (a synthetic or retrieved image, or nothing) and rewrite."""
        if self.style == "ours":
            return self._respond_in_one_call(target, query, kind, shown)
        if kind == "verbal" or shown is None:
            critique = self._ask(
                GENIR_CRITIQUE_SYSTEM.format(role_lower=CRITIC_ROLE.lower()),
                GENIR_CRITIQUE.format(role=CRITIC_ROLE, query=query, max_tokens=BASELINE_TOKENS),
                (target,),
            )
            refined = self._ask(
                GENIR_VERBAL_REFINE_SYSTEM,
                GENIR_VERBAL_REFINE.format(differences=critique, query=query, max_tokens=BASELINE_TOKENS),
                (target,),
            )
            return SimulatedUserTurn(differences=critique, query=refined)
        if kind == "prediction":
            # The code refines from both images and the rank; its comparison is recorded, not passed on.
            differences = self._ask(
                GENIR_PREDICTION_COMPARE_SYSTEM.format(max_tokens=COMPARE_TOKENS),
                GENIR_PREDICTION_COMPARE.format(query=query),
                (target, shown),
            )
            refined = self._ask(
                GENIR_PREDICTION_REFINE_SYSTEM.format(max_tokens=BASELINE_TOKENS),
                GENIR_PREDICTION_REFINE.format(query=query, rank=PREDICTION_RANK),
                (target, shown),
            )
            return SimulatedUserTurn(differences=differences, query=refined)
        differences = self._ask(
            GENIR_COMPARE_SYSTEM.format(max_tokens=COMPARE_TOKENS), GENIR_COMPARE.format(query=query), (target, shown)
        )
        refined = self._ask(
            GENIR_REFINE_SYSTEM.format(max_tokens=VISUAL_CAPTION_TOKENS),
            GENIR_REFINE.format(differences=differences, query=query),
            (target,),
        )
        return SimulatedUserTurn(differences=differences, query=refined)

    def answer(self, target: Path, question: str) -> str:
        """ChatIR feedback: a short answer to the system's question about the target."""
        message = Message("user", CHATIR_ANSWER.format(question=question), (target,))
        return ask_text(self.vlm, [message], self.decoding)

    def _ask(self, system: str, question: str, images: tuple[Path, ...]) -> str:
        """One plain-text call as the released code makes it: a system turn, then the images and the question."""
        return ask_text(self.vlm, [Message("system", system), Message("user", question, images)], self.decoding)

    def _respond_in_one_call(self, target: Path, query: str, kind: ShownKind, shown: Path | None) -> SimulatedUserTurn:
        """Our style: differences and the new query in one structured answer."""
        if kind == "verbal" or shown is None:
            message = Message("user", SIMULATED_USER_VERBAL.format(query=query), (target,))
        else:
            template = SIMULATED_USER_VISUAL if kind == "visual" else SIMULATED_USER_PREDICTION
            message = Message("user", template.format(query=query), (target, shown))
        turn = ask_structured(self.vlm, [message], SimulatedUserTurn, self.decoding)
        return SimulatedUserTurn(differences=turn.differences.strip(), query=turn.query.strip())
