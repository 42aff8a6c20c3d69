"""How references reach a generator: which ones a backend keeps, and the prompt that names them.

Two families of backends word the prompt differently (the template texts are in `imageloop.prompts`):

- in context: the text can point at each image (OmniGen's `<img><|image_i|></img>` tokens, gpt-image's
  "image i"), so ImageRAG's prompt pairs every retrieval caption with its image;
- adapter: the images enter beside the text (SDXL's IP-Adapter, FLUX Redux), whose encoders cannot
  resolve "image 1", so the prompt only says what the images show.

A request's `template` picks ImageRAG's wording or the user's prompt verbatim (RAGE). `render` is the
one path every backend (diffusers and OpenAI) takes from a request to what its model is given: the
references it keeps, the prompt in its family's wording, their pictures, notes on the rest. Imports
nothing heavy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

from PIL import Image

from imageloop.prompts import (
    ADAPTER_TEMPLATE_MANY,
    ADAPTER_TEMPLATE_ONE,
    IN_CONTEXT_EXAMPLE,
    IN_CONTEXT_TEMPLATE,
    VERBATIM_WITH_PLACEHOLDERS,
)
from imageloop.protocols import GenerationRequest, ReferenceImage
from imageloop.tools.images import open_image

Wording = Callable[[GenerationRequest, Sequence[ReferenceImage]], str]
"""A backend family's prompt for a request and the references it kept (`adapter_prompt`, or an in-context one)."""


def keep_references(
    request: GenerationRequest, max_references: int, model_id: str
) -> tuple[tuple[ReferenceImage, ...], tuple[str, ...]]:
    """The references a backend taking at most `max_references` uses, in the given order, and a note on the rest.

    ImageRAG's references compete by retrieval score, so the best-scoring stay; a person's picks
    ("verbatim") are kept first-come, as picked. The graphs trim before calling; this guards every
    other caller, so a backend never fails on too many.
    """
    references = request.references
    if len(references) <= max_references:
        return tuple(references), ()
    if max_references == 0:
        return (), (f"{model_id} draws from text alone: left out {len(references)} reference(s)",)
    if request.template == "verbatim":
        kept_positions = list(range(max_references))
        how = f"kept the first {max_references} as given, dropped"
    else:
        ranked = sorted(range(len(references)), key=lambda i: references[i].score, reverse=True)
        kept_positions = sorted(ranked[:max_references])
        how = "dropped the lowest-scoring"
    kept = set(kept_positions)
    listing = ", ".join(f"{r.path.name} ({r.score:.3f})" for i, r in enumerate(references) if i not in kept)
    note = f"{model_id} takes at most {max_references} references: {how} {listing}"
    return tuple(references[i] for i in kept_positions), (note,)


def in_context_prompt(
    request: GenerationRequest,
    references: Sequence[ReferenceImage],
    placeholders: Sequence[str],
    placeholders_required: bool = False,
) -> str:
    """The prompt for a backend whose text points at each image by `placeholders` (one per reference, in order).

    ImageRAG's template names each image by its retrieval caption. Verbatim, the prompt is the user's;
    a backend that sees no image its text does not point at (`placeholders_required`, OmniGen) gets
    the placeholders appended unless the user already wrote them.
    """
    if not references:
        return request.prompt
    if request.template == "verbatim":
        if placeholders_required and not any(p in request.prompt for p in placeholders):
            return VERBATIM_WITH_PLACEHOLDERS.format(prompt=request.prompt, images=" ".join(placeholders))
        return request.prompt
    examples = ", ".join(
        IN_CONTEXT_EXAMPLE.format(label=r.label, image=p) for r, p in zip(references, placeholders, strict=True)
    )
    return IN_CONTEXT_TEMPLATE.format(examples=examples, prompt=request.prompt)


def adapter_prompt(request: GenerationRequest, references: Sequence[ReferenceImage]) -> str:
    """The prompt for a backend whose images enter beside the text: what they show, never "image i"."""
    if not references or request.template == "verbatim":
        return request.prompt
    if len(references) == 1:
        return ADAPTER_TEMPLATE_ONE.format(label=references[0].label, prompt=request.prompt)
    labels = ", ".join(dict.fromkeys(r.label for r in references))
    return ADAPTER_TEMPLATE_MANY.format(labels=labels, prompt=request.prompt)


class Rendered(NamedTuple):
    """One request as a model takes it: the prompt sent, the kept references' pictures (none: text only), notes."""

    prompt: str
    images: list[Image.Image]
    notes: tuple[str, ...]


def render(request: GenerationRequest, max_references: int, model_id: str, wording: Wording) -> Rendered:
    """Keep what a backend taking `max_references` keeps, word the prompt with `wording`, open the kept pictures."""
    references, notes = keep_references(request, max_references, model_id)
    return Rendered(wording(request, references), [open_image(r.path) for r in references], notes)
