"""The papers' settings as presets: every knob the released code fixes, with where it fixes it.

A preset is a profile that sets knobs only (no models), so it combines with a model profile:
`--profile openai,imagerag-paper` runs ImageRAG as published on OpenAI's models. The README's presets
table lists these values beside our defaults; `tests/test_presets.py` keeps the two in step.

Sources: ImageRAG's released code (rotem-shalev/ImageRAG @ 16c9502: `imageRAG_OmniGen.py`,
`imageRAG_SDXL.py`, `utils.py`, `retrieval.py`) and GenIR's (mikelmh025/generative_ir @ 58891a5:
`genIR_CaptionImageRefinement.py` and its two baselines, `ChatIR/eval_img.py`), read by line; GenIR's
hybrid feedback is described in its paper (arXiv:2506.06220) and not in its code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PaperValue:
    """A knob's value as published, and where it is set."""

    value: Any
    source: str


IMAGERAG_PAPER: dict[str, PaperValue] = {
    "mode": PaperValue("draft_first", "imageRAG_OmniGen.py `--mode omnigen_first`, imageRAG_SDXL.py `sd_first`"),
    "critic": PaperValue("paper", "utils.py `retrieval_caption_generation`: decision, concepts, captions"),
    "plan_scope": PaperValue("every", "utils.py l.96-100: generation mode asks for every concept"),
    "retrieval_query": PaperValue("caption", "both scripts retrieve with the VLM's captions (paper, Table 3)"),
    "rephrase_only": PaperValue(False, "`--only_rephrase` is off by default"),
    "max_iterations": PaperValue(1, "the scripts regenerate once, with no loop"),
    "max_concepts": PaperValue(
        None, "imageRAG_OmniGen.py l.67 sets `k_concepts` but l.96-99 never pass it; imageRAG_SDXL.py l.96 asks for 1"
    ),
    "top_k": PaperValue(1, "`k_imgs_per_caption = 1` (imageRAG_SDXL.py `k=1`)"),
    "similarity_threshold": PaperValue(None, "no threshold in the released scripts"),
    "references_policy": PaperValue("replace", "one pass: nothing to accumulate"),
    "final_image_policy": PaperValue("last", "the scripts return the regenerated image (the draft if it matched)"),
    "judge_last": PaperValue(
        False, "both scripts stop once they regenerate: imageRAG_OmniGen.py l.138-139, imageRAG_SDXL.py l.134-142"
    ),
    "reference_trim": PaperValue(
        "order", "imageRAG_OmniGen.py l.123-126 keeps the first 3 in caption order; imageRAG_SDXL.py l.112 the first"
    ),
    "rerank": PaperValue("none", "`--retrieval_method CLIP` (imageRAG_OmniGen.py l.42); `gpt_rerank` is the ablation"),
    "sdxl_max_references": PaperValue(1, "imageRAG_SDXL.py passes one image to the IP-Adapter"),
    "ip_adapter_scale": PaperValue(0.5, "imageRAG_SDXL.py `--ip_scale 0.5`"),
    "seed": PaperValue(0, "`--seed 0` in both scripts"),
}
"""ImageRAG as released. Steps and guidance are the backends' own defaults, already the scripts' values
(OmniGen 50 steps, guidance 2.5, image guidance 1.6; SDXL 50 steps)."""

GENIR_PAPER: dict[str, PaperValue] = {
    "simulated_user": PaperValue("paper", "genIR_*.py: a detailed caption, then compare and refine calls"),
    "user_temperature": PaperValue(0.7, "genIR_CaptionImageRefinement.py l.351-359, l.415-424"),
    "user_top_p": PaperValue(0.9, "genIR_CaptionImageRefinement.py l.351-359, l.415-424"),
    "user_repetition_penalty": PaperValue(1.1, "genIR_CaptionImageRefinement.py l.351-359, l.415-424"),
    "feedback": PaperValue("visual", "genIR_CaptionImageRefinement.py (the paper's method)"),
    "rounds": PaperValue(10, "`--refinement_rounds 10`; ChatIR/eval_img.py scores rounds 0..10"),
    "k": PaperValue(10, "ChatIR/eval_img.py `--hits_at 10`"),
    "flux_redux": PaperValue("none", "genIR_CaptionImageRefinement.py l.247-253: FluxPipeline from text alone"),
    "hybrid_rule": PaperValue("random", "paper (arXiv:2506.06220), hybrid feedback: chosen per query"),
    "hybrid_visual_fraction": PaperValue(0.223, "paper (arXiv:2506.06220), hybrid feedback"),
    "hybrid_fallback": PaperValue("verbal", "paper (arXiv:2506.06220), hybrid feedback: a drawing or text alone"),
    "index_route": PaperValue("image", "ChatIR/eval_img.py l.403-424: the corpus is embedded as images (BLIP)"),
}
"""GenIR as released. Its generators' own settings are the `preset:` generators (tools/generators/presets.py)."""

PRESETS: dict[str, dict[str, PaperValue]] = {"imagerag-paper": IMAGERAG_PAPER, "genir-paper": GENIR_PAPER}
