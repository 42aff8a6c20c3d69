"""What the composed-image-retrieval (CIR) loop and DAIG's triplet scripter say to models.

Composing (training-free, after CIReVL: Karthik et al., "Vision-by-Language for Training-Free
Compositional Image Retrieval", ICLR 2024; ExplainableML/Vision_by_Language, src/prompts.py and
src/utils.py): a captioner describes the reference image, then a language model is given that
description after "Image Content:" and the modification after "Instruction:", and answers the
target's description on a line starting "Edited Description:", which is what text→image retrieval
searches with. Its prompts ask for a short description of the edited image that covers the kinds
of change CIR queries make (cardinality, addition, negation, direct addressing, compare & change,
comparative, conjunction, spatial relations and background, viewpoint) without inventing things.
Ours keeps that recipe and its line format, worded anew with examples of our own.

Verifying (beyond the papers): a VLM sees the reference and the top hit, and says whether the hit
shows the reference after the change; if not, it rewrites the description.

Scripting triplets (DAIG, CVPR 2026): an LLM turns an (object, edit type) pair into a reference
caption T_r, a modification text T_c and a target caption T_t, with a few real triplets as examples.
"""

COMPOSE_PROMPT = """\
I have an image. Given an instruction to edit it, carefully write a description of the edited image. \
The image content follows "Image Content:" and the instruction follows "Instruction:". Start your \
answer with "Edited Description:". The description covers what the edited image shows, whatever the \
kind of edit: how many things there are, something added or taken away, one thing replaced by \
another, an attribute changed or compared, the arrangement, the background, the viewpoint. Describe \
only the edited image, never the original; keep it short and simple, and add nothing the image \
content and the instruction do not imply.

Image Content: A brown dog lies on a sofa next to a cushion.
Instruction: add a second dog and make the sofa blue
Edited Description: Two brown dogs lie on a blue sofa next to a cushion.

Image Content: A red sports car parked on a city street at night.
Instruction: show it from above, in daylight
Edited Description: A red sports car on a city street in daylight, seen from above.

Image Content: A woman in a white sleeveless dress standing in a garden.
Instruction: is black and has long sleeves
Edited Description: A woman in a black long-sleeved dress standing in a garden.

Image Content: {description}
Instruction: {change}"""

EDITED_DESCRIPTION_LABEL = "Edited Description:"
"""The line the composer's answer is read from (CIReVL reads the first line that starts with it)."""

VERIFY_PROMPT = """\
The first image is a reference picture. Someone asked for a picture like it, changed as follows: \
"{change}". A search for the description "{description}" returned the second image.

Does the second image show the reference after exactly that change (what should stay the same \
stays, what should change has changed)? If it does not, write a better search description of the \
wanted picture: one stand-alone description of the changed reference, naming what the second image \
got wrong by saying what the wanted picture shows instead.

Answer with JSON: {{"matches": true or false, "description": "..."}} (description: the new one, \
or the current one when it matches)."""

TRIPLET_SYSTEM = (
    "You write training data for composed image retrieval: a picture, a change to it, and the changed picture, "
    "each described in words. You answer only with JSON."
)

TRIPLET_PROMPT = """\
Write one example about {object_article} "{object}", of the edit type "{edit}": {edit_guidance}

- "reference": a caption of a realistic photo showing the {object}: one sentence, concrete and visual \
(appearance, setting, how many, the viewpoint).
- "change": the modification as a person would ask for it, one short phrase that names only the change.
- "target": a caption of the same photo after the change: the same sentence, edited, so that \
everything the change does not touch stays exactly as in the reference.
{examples}
Answer with JSON: {{"reference": "...", "change": "...", "target": "..."}}."""

TRIPLET_EXAMPLES = "\nExamples of real triplets, for their style:\n{examples}\n"

EDIT_GUIDANCE = {
    "add": "the change adds something to the scene (an object, a person, an animal, an accessory).",
    "delete": "the change removes something from the scene, and the rest stays.",
    "replace": "the change replaces one thing, or one attribute such as a colour or material, by another.",
    "viewpoint": "the change shows the same scene from another viewpoint, distance or angle.",
    "count": "the change makes the number of some thing different.",
}
"""DAIG's edit types and what each asks the scripter for."""

TRIPLET_CHECK_PROMPT = """\
The first image should show: "{reference}". The second image should show it after this change: \
"{change}", that is: "{target}".

Do the two images show that (the same scene, and the change made)? Answer with JSON: \
{{"valid": true or false, "reason": "..."}}."""
