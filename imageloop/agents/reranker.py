"""ImageRAG's re-ranking ablation: a VLM picks the references among the embedder's top candidates.

The released code's `gpt_rerank` (rotem-shalev/ImageRAG @ 16c9502, retrieval.py l.175-207) takes CLIP's top 3
and SigLIP's top 3 for a caption and asks GPT-4o, with the six images attached, for the indices of the k most
relevant. With one embedder we take its top `RERANK_CANDIDATES`. As written the code passes the image list
where the client goes (l.200); we attach the images to the question, as it evidently means.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from imageloop.agents.structured import ask_text
from imageloop.prompts import PAPER_RERANK
from imageloop.protocols import GREEDY, Decoding, Message, VisionLanguageModel

RERANK_CANDIDATES = 6
"""retrieval.py l.176-181: CLIP's top 3 and SigLIP's top 3."""


class Reranker:
    """Asks a VLM which candidates match a caption best; raises MalformedOutputError on an empty answer."""

    def __init__(self, vlm: VisionLanguageModel, *, decoding: Decoding = GREEDY) -> None:
        self.vlm = vlm
        self.decoding = decoding

    def pick(self, caption: str, candidates: Sequence[Path], k: int) -> list[int]:
        """The positions (from 0) of the `k` candidates the VLM names, in its order; none if it named none."""
        question = Message("user", PAPER_RERANK.format(prompt=caption, k=k), tuple(candidates))
        answer = ask_text(self.vlm, [question], self.decoding)
        named = [int(digits) for digits in re.findall(r"\d+", answer)]
        return list(dict.fromkeys(i for i in named if i < len(candidates)))[:k]
