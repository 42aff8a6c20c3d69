"""ChatIR's questioner: asks about the image someone searches for, from the dialogue so far (text only).

ChatIR (Levy et al., NeurIPS 2023) is the chat-based baseline GenIR compares with: each round a model asks
one question, the person searching answers it, and the dialogue (caption, then "question? answer" lines)
is the retrieval query. The questioner never sees the target nor the results, as ChatIR's does not.
"""

from __future__ import annotations

from collections.abc import Sequence

from imageloop.agents.structured import ask_text
from imageloop.prompts import CHATIR_QUESTION
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel

DIALOGUE_SEPARATOR = ", "
"""How ChatIR joins a dialogue into one query (ChatIR/eval.py l.51 with `sep_token`, l.207)."""


def dialogue_query(dialogue: Sequence[str]) -> str:
    """The retrieval query a dialogue makes: its turns joined as ChatIR joins them."""
    return DIALOGUE_SEPARATOR.join(dialogue)


def dialogue_turn(question: str, answer: str) -> str:
    """One round as ChatIR's dialogues write it: the question, then the answer ("is it daytime? yes")."""
    return f"{question.strip()} {answer.strip()}"


class Questioner:
    """Asks the next question; raises MalformedOutputError on an empty answer."""

    def __init__(self, vlm: VisionLanguageModel, *, decoding: Decoding = GREEDY) -> None:
        self.vlm = vlm
        self.decoding = decoding

    def ask(self, dialogue: Sequence[str]) -> str:
        """One new question about the image, given the description and the questions answered so far."""
        text = CHATIR_QUESTION.format(dialogue="\n".join(dialogue))
        return ask_text(self.vlm, [Message("user", text)], self.decoding).splitlines()[0].strip()
