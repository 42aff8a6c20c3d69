"""How a generator words a prompt with references, per backend family, and which references it keeps.

The real backends are tested with these prompts on tiny pipelines (test_diffusers_generators.py) and
a local OpenAI server (test_openai_backends.py); these tests pin the wording itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from imageloop.protocols import GenerationRequest, PromptTemplate, ReferenceImage
from imageloop.tools.generators.references import adapter_prompt, in_context_prompt, keep_references

PROMPT = "a Cyanocitta cristata on a snowy branch, ukiyo-e style"
JAY = ReferenceImage(Path("jay.png"), "Cyanocitta cristata", caption="a blue jay perched on a branch", score=0.9)
PRINT = ReferenceImage(Path("print.png"), "ukiyo-e style", caption="a ukiyo-e woodblock print of a bird", score=0.6)
BARE = ReferenceImage(Path("bare.png"), "snowy branch", score=0.3)
TOKENS = ["<img><|image_1|></img>", "<img><|image_2|></img>"]


def request(
    *references: ReferenceImage, template: PromptTemplate = "imagerag", prompt: str = PROMPT
) -> GenerationRequest:
    return GenerationRequest(prompt, references, template=template)


def test_the_in_context_prompt_pairs_each_image_with_its_retrieval_caption_in_order() -> None:
    assert in_context_prompt(request(JAY, PRINT), [JAY, PRINT], TOKENS) == (
        "According to these images of a blue jay perched on a branch: <img><|image_1|></img>, "
        f"a ukiyo-e woodblock print of a bird: <img><|image_2|></img>, generate {PROMPT}"
    )


def test_a_reference_without_a_retrieval_caption_is_named_by_its_concept() -> None:
    assert in_context_prompt(request(BARE), [BARE], ["image 1"]) == (
        f"According to these images of snowy branch: image 1, generate {PROMPT}"
    )


def test_verbatim_sends_the_users_prompt_when_the_images_travel_beside_it() -> None:
    assert in_context_prompt(request(JAY, PRINT, template="verbatim"), [JAY, PRINT], ["image 1", "image 2"]) == PROMPT


def test_verbatim_appends_placeholders_a_backend_needs_to_see_the_images() -> None:
    rendered = in_context_prompt(request(JAY, PRINT, template="verbatim"), [JAY, PRINT], TOKENS, True)
    assert rendered == f"{PROMPT} <img><|image_1|></img> <img><|image_2|></img>"


def test_verbatim_keeps_placeholders_the_user_already_wrote() -> None:
    prompt = "the bird of <img><|image_1|></img> in the style of <img><|image_2|></img>"
    rendered = in_context_prompt(request(JAY, PRINT, template="verbatim", prompt=prompt), [JAY, PRINT], TOKENS, True)
    assert rendered == prompt


def test_the_adapter_prompt_names_one_reference_as_the_released_sdxl_script_does() -> None:
    assert (
        adapter_prompt(request(JAY), [JAY])
        == f"According to this image of a blue jay perched on a branch, generate {PROMPT}"
    )


def test_the_adapter_prompt_names_several_references_once_each_and_never_numbers_them() -> None:
    twin = ReferenceImage(Path("jay2.png"), "Cyanocitta cristata", caption=JAY.caption)
    rendered = adapter_prompt(request(JAY, twin, PRINT), [JAY, twin, PRINT])
    assert rendered == (
        "According to these images of a blue jay perched on a branch, a ukiyo-e woodblock print of a bird, "
        f"generate {PROMPT}"
    )


@pytest.mark.parametrize("template", ["imagerag", "verbatim"])
def test_no_references_leave_the_prompt_alone(template: PromptTemplate) -> None:
    assert in_context_prompt(request(template=template), [], []) == PROMPT
    assert adapter_prompt(request(template=template), []) == PROMPT


def test_imagerag_keeps_the_best_scoring_references_in_their_given_order() -> None:
    kept, notes = keep_references(request(BARE, JAY, PRINT), 2, "m")
    assert kept == (JAY, PRINT)
    assert notes == ("m takes at most 2 references: dropped the lowest-scoring bare.png (0.300)",)


def test_verbatim_keeps_the_first_picks_whatever_their_scores() -> None:
    kept, notes = keep_references(request(BARE, JAY, PRINT, template="verbatim"), 2, "m")
    assert kept == (BARE, JAY)
    assert notes == ("m takes at most 2 references: kept the first 2 as given, dropped print.png (0.600)",)


def test_a_text_only_backend_keeps_no_reference_and_says_so() -> None:
    assert keep_references(request(JAY, PRINT), 0, "m") == ((), ("m draws from text alone: left out 2 reference(s)",))


def test_the_readme_quotes_the_in_context_prompt_as_the_generators_word_it() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "these examples of" not in readme  # the paper's wording, which the released code (and we) do not send
    assert readme.count('"According to these images of <caption 1>: ') == 2  # the OpenAI and OmniGen lines
