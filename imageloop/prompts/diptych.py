"""The in-context description of a CIR diptych (left: reference, right: target), for CIR-LoRA.

In-context LoRA (Huang et al., "In-Context LoRA for Diffusion Transformers", 2024) trains a FLUX LoRA
on several images stitched into one canvas, described by one prompt that first says what the set is
and then captions each panel; DAIG (CVPR 2026) does this for CIR with two panels, the reference on the
left and the target on the right. Training (`imageloop.training.cir_lora`) and generation with a
trained CIR-LoRA must render the same description, so both call `diptych_description`.
"""

DIPTYCH_TEMPLATE = (
    "This two-panel image shows {subject} side by side: the right panel is the left panel after one change, {change}."
)
"""The opening sentence; `[LEFT] reference caption` and `[RIGHT] target caption` follow when known."""


def diptych_description(change: str, reference_text: str = "", target_text: str = "", subject: str = "") -> str:
    """The diptych's description; captions and the subject may be empty (real triplets often lack them)."""
    text = DIPTYCH_TEMPLATE.format(
        subject=f"the same {subject}" if subject else "the same scene", change=change.strip().rstrip(".")
    )
    if reference_text:
        text += f" [LEFT] {reference_text.strip()}"
    if target_text:
        text += f" [RIGHT] {target_text.strip()}"
    return text
