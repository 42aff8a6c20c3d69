"""DAIG's triplet scripter and the optional check of a drawn triplet (DAIG itself uses no filter).

The scripter asks an LLM for a reference caption T_r, a modification text T_c and a target caption
T_t for one (object, edit type) pair, as structured output, with a few of the user's real triplets
as examples of style. The checker shows a VLM both halves of a drawn diptych with the script and asks
whether they show it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, field_validator

from imageloop.agents.structured import ask_structured
from imageloop.prompts.cir import (
    EDIT_GUIDANCE,
    TRIPLET_CHECK_PROMPT,
    TRIPLET_EXAMPLES,
    TRIPLET_PROMPT,
    TRIPLET_SYSTEM,
)
from imageloop.protocols import Message, VisionLanguageModel


class TripletScript(BaseModel):
    """T_r, T_c and T_t: the reference caption, the modification text, the target caption."""

    model_config = ConfigDict(extra="forbid")

    reference: str
    change: str
    target: str

    @field_validator("reference", "change", "target")
    @classmethod
    def _not_empty(cls, value: str) -> str:
        """An empty caption or change is no script (a repair retry asks again)."""
        if not value.strip():
            raise ValueError("must not be empty")
        return value.strip()


class TripletCheck(BaseModel):
    """The checker's verdict on one drawn triplet."""

    model_config = ConfigDict(extra="forbid")

    valid: bool
    reason: str


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


class TripletScripter:
    """Scripts one triplet; raises MalformedOutputError when the model gives no usable script."""

    def __init__(self, llm: VisionLanguageModel) -> None:
        self.llm = llm

    def script(self, subject: str, edit: str, examples: Sequence[Mapping[str, str]] = ()) -> TripletScript:
        """The captions and change for `subject` under edit type `edit`, in the style of `examples`.

        An example is `{"reference", "change", "target"}`; a real triplet without captions shows its change only.
        """
        shown = "\n".join(json.dumps({k: v for k, v in e.items() if v}, ensure_ascii=False) for e in examples)
        prompt = TRIPLET_PROMPT.format(
            object=subject,
            object_article=_article(subject),
            edit=edit,
            edit_guidance=EDIT_GUIDANCE[edit],
            examples=TRIPLET_EXAMPLES.format(examples=shown) if examples else "",
        )
        messages = [Message("system", TRIPLET_SYSTEM), Message("user", prompt)]
        return ask_structured(self.llm, messages, TripletScript)


class TripletChecker:
    """Asks a VLM whether a drawn reference and target show their script."""

    def __init__(self, vlm: VisionLanguageModel) -> None:
        self.vlm = vlm

    def check(self, reference: Path, target: Path, script: TripletScript) -> TripletCheck:
        """The verdict on the pair; raises MalformedOutputError when the VLM gives none."""
        prompt = TRIPLET_CHECK_PROMPT.format(reference=script.reference, change=script.change, target=script.target)
        return ask_structured(self.vlm, [Message("user", prompt, (reference, target))], TripletCheck)
