"""ImageRAG's rephrase-only ablation (Table 3) as released: the VLM rewrites the prompt; nothing is retrieved.

The released code (rotem-shalev/ImageRAG @ 16c9502, utils.py `get_rephrased_prompt`, l.120-127) asks after
the critic's decision, in its conversation, so the model sees the draft it judged; without an image
(generation mode, which the scripts never rephrase in) it asks the question alone.
"""

from __future__ import annotations

from pathlib import Path

from imageloop.agents.critic import decision_turn
from imageloop.agents.structured import ask_text
from imageloop.prompts import PAPER_REPHRASE, PAPER_REPHRASE_AFTER_DECISION
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel


class Rephraser:
    """Asks a VLM for a clearer prompt; raises MalformedOutputError on an empty answer."""

    def __init__(self, vlm: VisionLanguageModel, *, decoding: Decoding = GREEDY) -> None:
        self.vlm = vlm
        self.decoding = decoding

    def rephrase(self, prompt: str, image: Path | None, decision: str | None = None) -> str:
        """The prompt rephrased: after the paper critic's `decision` about `image` (its conversation), or with the
        image attached to the question (another critic), or from the prompt alone (no image yet)."""
        if image is None:
            messages = [Message("user", PAPER_REPHRASE.format(prompt=prompt))]
        elif decision is None:
            messages = [Message("user", PAPER_REPHRASE_AFTER_DECISION.format(prompt=prompt), (image,))]
        else:
            question = Message("user", PAPER_REPHRASE_AFTER_DECISION.format(prompt=prompt))
            messages = [decision_turn(prompt, image), Message("assistant", decision), question]
        # utils.py l.127 drops every quote mark from the answer.
        return ask_text(self.vlm, messages, self.decoding).replace('"', "").replace("'", "").strip()
