"""The diffusers generators, on tiny random pipelines saved to disk and loaded like hub checkpoints.

Session fixtures build each tiny model once (`save_pretrained` into a private tiny cache); every
backend is made by its production factory from that directory, so `from_pretrained` /
`load_ip_adapter` run exactly as they would on a real checkpoint. Spies wrap the real pipeline
classes to see what reaches them; nothing about the models is faked.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FluxPipeline,
    FluxPriorReduxPipeline,
    OmniGenPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image

import imageloop.tiny
from imageloop import runtime
from imageloop.backends import GENERATOR_PROVIDERS, GeneratorOptions, Placement, clear_backends, make_generator
from imageloop.cli import _settings, build_parser
from imageloop.config import Endpoint, Settings, load_settings
from imageloop.errors import ConfigError, ImageloopError
from imageloop.protocols import (
    BatchImageGenerator,
    GenerationRequest,
    GenerationResult,
    ImageGenerator,
    PromptTemplate,
    ReferenceImage,
)
from imageloop.tiny.diffusion import IP_ADAPTER_IMAGE_ENCODER, IP_ADAPTER_WEIGHT, tiny_generator_dir
from imageloop.tools.generators import flux, omnigen, sdxl_ip_adapter
from imageloop.tools.generators.batching import BatchingGenerator
from tests.fakes import ScriptedGenerator

SIZE = (64, 64)
PROMPT = "a Cyanocitta cristata on a snowy branch"


# --- fixtures: tiny checkpoints on disk, reference pictures ----------------------------------------


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A private tiny-model cache: the fixtures below and the `tiny:` providers build into it."""
    root = tmp_path_factory.mktemp("tiny-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("IMAGELOOP_TINY_CACHE", str(root))
        yield root


@pytest.fixture(scope="session")
def model_dirs(tiny_cache: Path) -> dict[str, Path]:
    """Every tiny diffusion checkpoint, saved with save_pretrained (the IP-Adapter as its own folder)."""
    return {name: tiny_generator_dir(name) for name in ("omnigen", "sdxl", "ip-adapter", "flux", "flux-redux")}


@pytest.fixture(scope="session")
def references(tmp_path_factory: pytest.TempPathFactory) -> list[ReferenceImage]:
    """Four distinct 32 px pictures with their retrieval captions, scored so the second is the weakest."""
    folder = tmp_path_factory.mktemp("references")
    found = []
    for i, (color, score) in enumerate([((200, 30, 30), 0.9), ((30, 200, 30), 0.1), ((30, 30, 200), 0.8),
                                        ((200, 200, 30), 0.7)]):  # fmt: skip
        pixels = np.zeros((32, 32, 3), dtype=np.uint8)
        pixels[:, :] = color
        pixels[: 8 * (i + 1), :8] = 255  # a different white bar each, so no two are alike
        path = folder / f"ref{i + 1}.png"
        Image.fromarray(pixels).save(path)
        found.append(
            ReferenceImage(path, concept=f"concept {i + 1}", caption=f"a photo of concept {i + 1}", score=score)
        )
    return found


def options(model_dirs: dict[str, Path], **changes: Any) -> GeneratorOptions:
    """Generator options as the settings give them, with the IP-Adapter and Redux pointed at tiny ones."""
    settings = Settings(
        ip_adapter=str(model_dirs["ip-adapter"]),
        ip_adapter_weight=IP_ADAPTER_WEIGHT,
        ip_adapter_image_encoder=IP_ADAPTER_IMAGE_ENCODER,
        flux_redux=str(model_dirs["flux-redux"]),
    )
    return GeneratorOptions.of(settings.model_copy(update=changes))


BASE_MODEL = {"omnigen": "omnigen", "sdxl-ip-adapter": "sdxl", "flux": "flux", "diffusers": "sdxl"}


def build(provider: str, model_dirs: dict[str, Path], model: str | None = None, **changes: Any) -> ImageGenerator:
    """A generator made by the production factory for `provider`, from the tiny checkpoint directory."""
    model = model or str(model_dirs[BASE_MODEL[provider]])
    return GENERATOR_PROVIDERS[provider](model, Endpoint(), Placement(), options(model_dirs, **changes))


def request(
    references: list[ReferenceImage] | None = None, seed: int | None = 0, template: PromptTemplate = "imagerag"
) -> GenerationRequest:
    return GenerationRequest(PROMPT, tuple(references or ()), seed=seed, size=SIZE, steps=2, template=template)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def spy(monkeypatch: pytest.MonkeyPatch, cls: type, method: str = "__call__") -> list[dict[str, Any]]:
    """Record the arguments and result of every call to `cls.method` (which still runs)."""
    calls: list[dict[str, Any]] = []
    original = getattr(cls, method)

    def recording(self: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append({"self": self, "args": args, **kwargs})
        calls[-1]["returned"] = original(self, *args, **kwargs)
        return calls[-1]["returned"]

    monkeypatch.setattr(cls, method, recording)
    return calls


def same_pictures(images: list[Image.Image], references: list[ReferenceImage]) -> bool:
    return len(images) == len(references) and all(
        np.array_equal(pixels(image), pixels(Image.open(r.path))) for image, r in zip(images, references, strict=True)
    )


# --- every backend loads from a saved directory and honours its seed --------------------------------

PROVIDERS = ["omnigen", "sdxl-ip-adapter", "flux", "diffusers"]


@pytest.mark.parametrize("provider", PROVIDERS)
def test_each_backend_loads_a_saved_checkpoint_and_draws_from_text(provider: str, model_dirs: dict[str, Path]) -> None:
    generator = build(provider, model_dirs)
    result = generator.generate(request())
    assert isinstance(generator, ImageGenerator)
    assert generator.model_id.startswith(f"{provider}:")
    assert isinstance(result, GenerationResult)
    assert result.image.size == SIZE and result.image.mode == "RGB"
    assert result.prompt_used == PROMPT and result.notes == ()


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("with_references", [False, True], ids=["text", "references"])
def test_a_fixed_seed_gives_the_same_picture_twice_and_after_reloading(
    provider: str, with_references: bool, model_dirs: dict[str, Path], references: list[ReferenceImage]
) -> None:
    chosen = references[:2] if with_references else []
    generator = build(provider, model_dirs)
    first = pixels(generator.generate(request(chosen, seed=7)).image)
    assert np.array_equal(first, pixels(generator.generate(request(chosen, seed=7)).image))
    assert not np.array_equal(first, pixels(generator.generate(request(chosen, seed=8)).image))
    runtime.clear_cache()
    reloaded = build(provider, model_dirs)
    assert reloaded._pipe is not generator._pipe  # type: ignore[attr-defined]
    assert np.array_equal(first, pixels(reloaded.generate(request(chosen, seed=7)).image))


# --- OmniGen: references as numbered image tokens -----------------------------------------------------


def test_omnigen_gets_the_references_in_order_with_one_numbered_token_each(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, OmniGenPipeline)
    encoded = spy(monkeypatch, AutoencoderKL, "encode")
    chosen = [references[0], references[2], references[3]]
    result = build("omnigen", model_dirs).generate(request(chosen))

    (call,) = calls
    (pictures,) = call["input_images"]  # a batch of one request
    assert same_pictures(pictures, chosen)
    assert call["prompt"] == [result.prompt_used]
    assert re.findall(r"<img><\|image_(\d+)\|></img>", result.prompt_used) == ["1", "2", "3"]
    # Each image follows the retrieval caption that found it, as the released imageRAG_OmniGen.py words it.
    assert result.prompt_used == (
        "According to these images of a photo of concept 1: <img><|image_1|></img>, "
        "a photo of concept 3: <img><|image_2|></img>, a photo of concept 4: <img><|image_3|></img>, "
        f"generate {PROMPT}"
    )
    # The pictures reach the VAE: the conditional branch and the image-guidance branch encode all three.
    assert len(encoded) == 2 * len(chosen)
    assert result.notes == ()


def test_omnigen_takes_three_of_four_references_by_score_and_says_which_it_dropped(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, OmniGenPipeline)
    generator = build("omnigen", model_dirs)
    result = generator.generate(request(references))

    assert generator.max_references == 3
    assert same_pictures(calls[0]["input_images"][0], [references[0], references[2], references[3]])
    assert result.prompt_used.count("<img><|image_") == 3
    (note,) = result.notes
    assert "at most 3 references" in note and "ref2.png (0.100)" in note


def test_omnigen_verbatim_keeps_the_prompt_and_the_first_three_picks_in_order(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, OmniGenPipeline)
    generator = build("omnigen", model_dirs)
    picked = [references[3], references[1], references[0], references[2]]
    result = generator.generate(request(picked, template="verbatim"))

    assert same_pictures(calls[0]["input_images"][0], picked[:3])
    # The prompt is the user's; OmniGen sees no image its text does not point at, so the tokens follow it.
    tokens = "<img><|image_1|></img> <img><|image_2|></img> <img><|image_3|></img>"
    assert result.prompt_used == f"{PROMPT} {tokens}"
    (note,) = result.notes
    assert "kept the first 3 as given, dropped ref3.png" in note


def test_references_change_the_omnigen_picture(model_dirs: dict[str, Path], references: list[ReferenceImage]) -> None:
    generator = build("omnigen", model_dirs)
    plain = pixels(generator.generate(request()).image)
    assert not np.array_equal(plain, pixels(generator.generate(request(references[:2])).image))


# --- SDXL + IP-Adapter: every reference to one adapter, at the set scale -----------------------------


def ip_adapter_scales(pipe: Any) -> set[float]:
    """The scales set on the pipeline's IP-Adapter attention layers (one list per layer, one adapter)."""
    scales = [p.scale for p in pipe.unet.attn_processors.values() if hasattr(p, "scale")]
    assert scales and all(len(s) == 1 for s in scales)
    return {s[0] for s in scales}


def adapter_encoding(embeds: list[dict[str, Any]]) -> tuple[list[Image.Image], torch.Tensor]:
    """The pictures the SDXL backend gave its one adapter to encode, and the embeddings that came back.

    The backend encodes each request's references itself; the pipeline then takes those embeddings as given.
    """
    (encoding,) = [e for e in embeds if e["args"][0] is not None]
    (adapter_images,) = encoding["args"][0]  # one adapter
    (adapter_embeds,) = encoding["returned"]
    return list(adapter_images), adapter_embeds


def sdxl_with(model_dirs: dict[str, Path], **kwargs: Any) -> sdxl_ip_adapter.SDXLIPAdapterGenerator:
    """The SDXL backend on the tiny checkpoint and adapter, with constructor options the settings do not reach."""
    return sdxl_ip_adapter.SDXLIPAdapterGenerator(
        str(model_dirs["sdxl"]),
        ip_adapter=str(model_dirs["ip-adapter"]),
        ip_adapter_weight=IP_ADAPTER_WEIGHT,
        ip_adapter_image_encoder=IP_ADAPTER_IMAGE_ENCODER,
        **kwargs,
    )


def test_sdxl_takes_one_reference_as_in_the_paper_and_names_it_by_its_caption(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, StableDiffusionXLPipeline)
    embeds = spy(monkeypatch, StableDiffusionXLPipeline, "prepare_ip_adapter_image_embeds")
    generator = build("sdxl-ip-adapter", model_dirs, ip_adapter_scale=0.7)
    result = generator.generate(request(references[:3]))

    assert generator.max_references == 1
    (call,) = calls
    assert same_pictures(adapter_encoding(embeds)[0], references[:1])  # the best-scoring of the three
    assert ip_adapter_scales(call["self"]) == {0.7}
    # The released imageRAG_SDXL.py's wording: no "image 1", which SDXL's text encoders cannot resolve.
    assert result.prompt_used == f"According to this image of a photo of concept 1, generate {PROMPT}"
    assert call["prompt"] == [result.prompt_used]
    assert call["negative_prompt"] == sdxl_ip_adapter.PAPER_NEGATIVE_PROMPT
    (note,) = result.notes
    assert "at most 1 references" in note and "ref2.png (0.100)" in note and "ref3.png (0.800)" in note


def test_sdxl_with_several_references_gives_them_all_to_one_adapter_without_numbering_them(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, StableDiffusionXLPipeline)
    embeds = spy(monkeypatch, StableDiffusionXLPipeline, "prepare_ip_adapter_image_embeds")
    chosen = references[:3]
    result = sdxl_with(model_dirs, max_references=3).generate(request(chosen))

    (call,) = calls
    adapter_images, adapter_embeds = adapter_encoding(embeds)
    assert same_pictures(adapter_images, chosen)  # one adapter given all three pictures, in order
    captions = "a photo of concept 1, a photo of concept 2, a photo of concept 3"
    assert call["prompt"] == [result.prompt_used]
    assert result.prompt_used == f"According to these images of {captions}, generate {PROMPT}"
    assert "image 1" not in result.prompt_used
    assert call["negative_prompt"] == sdxl_ip_adapter.PAPER_NEGATIVE_PROMPT
    # The image encoder turned them into one adapter's embeddings: (guidance batch, 3 pictures, tokens, width).
    assert adapter_embeds.shape[:2] == (2, 3)
    (passed,) = call["ip_adapter_image_embeds"]
    assert torch.equal(passed, adapter_embeds)


def test_sdxl_verbatim_sends_the_prompt_unchanged_with_the_first_pick(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, StableDiffusionXLPipeline)
    embeds = spy(monkeypatch, StableDiffusionXLPipeline, "prepare_ip_adapter_image_embeds")
    picked = [references[1], references[0]]
    result = build("sdxl-ip-adapter", model_dirs).generate(request(picked, template="verbatim"))

    assert [result.prompt_used] == [PROMPT] == calls[0]["prompt"]
    assert same_pictures(adapter_encoding(embeds)[0], picked[:1])  # the weaker pick, because it came first
    (note,) = result.notes
    assert "kept the first 1 as given, dropped ref1.png (0.900)" in note


def test_sdxl_ip_adapter_scale_steers_the_picture(
    model_dirs: dict[str, Path], references: list[ReferenceImage]
) -> None:
    generator = build("sdxl-ip-adapter", model_dirs)
    weak = build("sdxl-ip-adapter", model_dirs, ip_adapter_scale=0.1)
    assert weak._pipe is generator._pipe  # type: ignore[attr-defined]  # one pipeline, the scale is per call
    assert not np.array_equal(
        pixels(generator.generate(request(references[:2])).image), pixels(weak.generate(request(references[:2])).image)
    )


def test_sdxl_drafts_run_the_adapter_at_scale_zero_which_is_plain_sdxl(
    model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, StableDiffusionXLPipeline)
    with_adapter = sdxl_with(model_dirs, negative_prompt=None)
    draft = with_adapter.generate(request())
    assert ip_adapter_scales(calls[0]["self"]) == {0.0}
    plain = build("diffusers", model_dirs).generate(request())
    assert np.array_equal(pixels(draft.image), pixels(plain.image))


# --- FLUX: references through Redux --------------------------------------------------------------------


def test_flux_sends_every_reference_through_redux_with_equal_weights(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    priors = spy(monkeypatch, FluxPriorReduxPipeline)
    calls = spy(monkeypatch, FluxPipeline)
    chosen = references[:3]
    generator = build("flux", model_dirs)
    result = generator.generate(request(chosen))

    (prior,) = priors
    assert same_pictures(prior["image"], chosen)
    assert prior["prompt"] == result.prompt_used
    captions = "a photo of concept 1, a photo of concept 2, a photo of concept 3"
    assert result.prompt_used == f"According to these images of {captions}, generate {PROMPT}"
    assert prior["prompt_embeds_scale"] == pytest.approx([1 / 3] * 3)
    (call,) = calls
    assert call.get("prompt") is None
    # The prompt's T5 tokens (512) followed by the references' image tokens (16 for the tiny SigLIP).
    assert call["prompt_embeds"].shape[:2] == (1, 512 + 16)
    text_only = pixels(generator.generate(request()).image)
    assert not np.array_equal(text_only, pixels(result.image))


def test_flux_without_redux_draws_from_text_and_notes_the_references_it_left_out(
    model_dirs: dict[str, Path], references: list[ReferenceImage]
) -> None:
    generator = build("flux", model_dirs, flux_redux="none")
    result = generator.generate(request(references[:2]))
    assert generator.max_references == 0
    assert result.prompt_used == PROMPT
    assert result.notes == (f"{generator.model_id} draws from text alone: left out 2 reference(s)",)


def test_a_text_to_image_pipeline_leaves_references_out_with_a_note(
    model_dirs: dict[str, Path], references: list[ReferenceImage]
) -> None:
    result = build("diffusers", model_dirs).generate(request(references[:1]))
    assert result.prompt_used == PROMPT
    assert result.notes and "draws from text alone" in result.notes[0]


# --- one load per process --------------------------------------------------------------------------------


def _count_loads(monkeypatch: pytest.MonkeyPatch, cls: type) -> list[Any]:
    loads: list[Any] = []
    original: Callable[..., Any] = cls.from_pretrained  # type: ignore[attr-defined]

    def counting(*args: Any, **kwargs: Any) -> Any:
        loads.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", counting)
    return loads


@pytest.mark.parametrize(("provider", "cls"), [("omnigen", OmniGenPipeline), ("flux", FluxPriorReduxPipeline)])
def test_a_pipeline_loads_once_across_calls_and_backend_objects(
    provider: str, cls: type, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    runtime.clear_cache()
    loads = _count_loads(monkeypatch, cls)
    first, second = build(provider, model_dirs), build(provider, model_dirs)
    for generator in (first, second, first):
        generator.generate(request())
    assert len(loads) == 1
    assert first._pipe is second._pipe  # type: ignore[attr-defined]


# --- bad input ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("provider", "model", "changes", "missing"),
    [
        ("omnigen", "imageloop-test/no-such-omnigen", {}, "imageloop-test/no-such-omnigen"),
        ("flux", "imageloop-test/no-such-flux", {}, "imageloop-test/no-such-flux"),
        ("diffusers", "imageloop-test/no-such-pipeline", {}, "imageloop-test/no-such-pipeline"),
        ("sdxl-ip-adapter", None, {"ip_adapter": "imageloop-test/no-such-adapter"}, "imageloop-test/no-such-adapter"),
        ("flux", None, {"flux_redux": "imageloop-test/no-such-redux"}, "imageloop-test/no-such-redux"),
    ],
)
def test_a_model_missing_offline_fails_fast_saying_how_to_get_it(
    provider: str,
    model: str | None,
    changes: dict[str, str],
    missing: str,
    model_dirs: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # The hub reads the variable once, at import; without this a missing model costs minutes of retries.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(
        ConfigError, match=rf"'{missing}' is not available: HF_HUB_OFFLINE is set.*hf download {missing}"
    ):
        build(provider, model_dirs, model, **changes)


def test_a_missing_local_directory_is_named_as_such(model_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"no-such-dir: no such directory"):
        build("omnigen", model_dirs, str(tmp_path / "no-such-dir"))


def test_offload_without_a_cuda_device_is_refused_before_loading(model_dirs: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match=r"`offload` .* CUDA GPU; the device is cpu"):
        GENERATOR_PROVIDERS["omnigen"](
            str(model_dirs["omnigen"]), Endpoint(), Placement(device="cpu", offload=True), options(model_dirs)
        )


@pytest.mark.parametrize(
    ("provider", "cls"), [("omnigen", OmniGenPipeline), ("sdxl-ip-adapter", StableDiffusionXLPipeline)]
)
def test_running_out_of_gpu_memory_names_the_size_dtype_and_offload_knobs(
    provider: str, cls: type, model_dirs: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = build(provider, model_dirs)

    def out_of_memory(self: Any, *args: Any, **kwargs: Any) -> Any:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 79.1 GiB total)")

    monkeypatch.setattr(cls, "__call__", out_of_memory)
    with pytest.raises(ImageloopError) as raised:
        generator.generate(request())
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"out of GPU memory while generating 64x64 with {generator.model_id}: ")
    assert "`size`" in message and "`dtype`" in message and "`offload`" in message  # each face spells them


# --- the tiny: providers and the settings --------------------------------------------------------------


@pytest.mark.parametrize("name", ["omnigen", "sdxl-ip-adapter", "flux", "sd"])
def test_tiny_generators_draw_noise_in_seconds_and_say_so(
    name: str,
    tiny_cache: Path,
    references: list[ReferenceImage],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(imageloop.tiny, "_noticed", False)
    clear_backends()  # another test may have built this tiny backend already, without a fresh notice
    generator = make_generator(load_settings(overrides={"generator": f"tiny:{name}"}))
    result = generator.generate(GenerationRequest(PROMPT, tuple(references[:2]), seed=0))
    assert result.image.size == (64, 64)
    assert imageloop.tiny.NOISE_NOTICE in capsys.readouterr().err


def test_an_unknown_tiny_generator_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="tiny:omnigen, tiny:sdxl-ip-adapter, tiny:flux, tiny:sd"):
        make_generator(load_settings(overrides={"generator": "tiny:kandinsky"}))


def test_the_settings_default_to_the_papers_ip_adapter_and_the_backends_agree() -> None:
    defaults = GeneratorOptions.of(Settings())
    assert defaults == GeneratorOptions(
        guidance_scale=None,
        ip_adapter=sdxl_ip_adapter.DEFAULT_IP_ADAPTER,
        ip_adapter_weight=sdxl_ip_adapter.DEFAULT_IP_ADAPTER_WEIGHT,
        ip_adapter_image_encoder=sdxl_ip_adapter.DEFAULT_IP_ADAPTER_IMAGE_ENCODER,
        ip_adapter_scale=sdxl_ip_adapter.DEFAULT_IP_ADAPTER_SCALE,
        flux_redux=flux.DEFAULT_REDUX,
        sdxl_max_references=sdxl_ip_adapter.MAX_REFERENCES,
    )
    assert (defaults.ip_adapter, defaults.ip_adapter_scale) == ("h94/IP-Adapter", 0.5)
    assert defaults.ip_adapter_weight == "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
    assert (omnigen.DEFAULT_GUIDANCE_SCALE, omnigen.DEFAULT_IMAGE_GUIDANCE_SCALE) == (2.5, 1.6)


def test_generator_options_come_from_the_command_line() -> None:
    args = build_parser().parse_args(
        ["generate", PROMPT, "--index", "idx", "--out", "run", "--generator", "sdxl-ip-adapter:my/sdxl",
         "--ip-adapter", "./adapters/ip", "--ip-adapter-weight", "ip.safetensors", "--ip-adapter-image-encoder",
         "encoder", "--ip-adapter-scale", "0.8", "--guidance-scale", "4", "--flux-redux", "none",
         "--sdxl-max-references", "2"]
    )  # fmt: skip
    assert GeneratorOptions.of(_settings(args)) == GeneratorOptions(
        4.0, "./adapters/ip", "ip.safetensors", "encoder", 0.8, None, 2
    )


def test_sdxl_max_references_from_the_settings_reaches_the_sdxl_backend(model_dirs: dict[str, Path]) -> None:
    assert build("sdxl-ip-adapter", model_dirs).max_references == 1  # the paper's one reference
    assert build("sdxl-ip-adapter", model_dirs, sdxl_max_references=3).max_references == 3


# --- generator presets: the settings a paper drew with ---------------------------------------------------


def recording_pipe(generator: Any) -> list[dict[str, Any]]:
    """Replace the backend's loaded pipeline by one that records its call and answers with a blank picture."""
    calls: list[dict[str, Any]] = []

    @dataclass
    class Output:
        images: list[Image.Image]

    def pipe(**kwargs: Any) -> Output:
        calls.append(kwargs)
        return Output([Image.new("RGB", SIZE)])

    generator._pipe = pipe
    return calls


def test_the_flux_preset_loads_the_checkpoint_given_and_draws_from_text(model_dirs: dict[str, Path]) -> None:
    generator = make_generator(load_settings(overrides={"generator": f"preset:flux.1-dev:{model_dirs['flux']}"}))
    result = generator.generate(request())
    assert result.image.size == SIZE and generator.model_id == f"preset:flux.1-dev:{model_dirs['flux']}"
    assert generator.max_references == 0  # GenIR draws its feedback from the query alone, no Redux


def test_the_flux_preset_draws_at_genir_settings(model_dirs: dict[str, Path], references: list[ReferenceImage]) -> None:
    generator = make_generator(load_settings(overrides={"generator": f"preset:flux.1-dev:{model_dirs['flux']}"}))
    calls = recording_pipe(generator)
    result = generator.generate(GenerationRequest(PROMPT, tuple(references[:1]), seed=0))
    (call,) = calls
    assert (call["num_inference_steps"], call["guidance_scale"]) == (50, 3.5)
    assert (call["width"], call["height"], call["max_sequence_length"]) == (1024, 1024, 512)
    assert "draws from text alone" in result.notes[0]


def test_the_sd35_preset_draws_with_genirs_28_steps_and_guidance_3_5_unless_asked_otherwise(
    tiny_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, StableDiffusion3Pipeline)
    generator = make_generator(
        load_settings(overrides={"generator": f"preset:sd3.5-large:{tiny_generator_dir('sd3')}"})
    )
    drawn = generator.generate(GenerationRequest(PROMPT, seed=0))
    generator.generate(GenerationRequest(PROMPT, seed=0, size=SIZE, steps=2))
    assert [(c["num_inference_steps"], c["guidance_scale"], c["width"]) for c in calls] == [
        (28, 3.5, None),
        (2, 3.5, 64),
    ]
    assert drawn.image.mode == "RGB" and drawn.prompt_used == PROMPT


def test_every_generator_preset_has_its_pipeline_in_the_installed_diffusers() -> None:
    from imageloop.tools.generators.presets import GENERATOR_PRESETS, resolve_preset

    assert set(GENERATOR_PRESETS) == {"sd3.5-large", "flux.1-dev", "lumina-2", "hidream-i1-fast"}
    for name, preset in GENERATOR_PRESETS.items():
        assert resolve_preset(name) == (preset.model, preset)
    assert GENERATOR_PRESETS["hidream-i1-fast"].llama_text_encoder == "meta-llama/Meta-Llama-3.1-8B-Instruct"


def test_a_preset_whose_pipeline_diffusers_lacks_is_refused_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from imageloop.tools.generators import presets

    missing = presets.GeneratorPreset("NoSuchPipeline", "org/model", 10, 1.0, None, "test")
    monkeypatch.setitem(presets.GENERATOR_PRESETS, "future-model", missing)
    with pytest.raises(ConfigError, match=r"preset:future-model needs diffusers' NoSuchPipeline, which diffusers "):
        make_generator(load_settings(overrides={"generator": "preset:future-model"}))
    with pytest.raises(ConfigError, match=r"unknown generator preset; known: sd3\.5-large, flux\.1-dev"):
        make_generator(load_settings(overrides={"generator": "preset:sd4"}))


# --- batches: concurrent requests drawn in one pipeline call ------------------------------------------

# Prompts of one length: OmniGen batches only requests whose rows line up token for token.
BATCH_PROMPTS = [f"a {colour} jay on a snowy branch" for colour in ("blue", "grey", "pink", "gold", "teal")]
BATCH_CASES = [("omnigen", 0), ("omnigen", 2), ("sdxl-ip-adapter", 0), ("sdxl-ip-adapter", 2), ("flux", 0),
               ("flux", 2), ("diffusers", 0)]  # fmt: skip
ROUNDING_LEVELS = 1
"""How far (of 255) a batched picture may be from the lone one: kernels pick their summation order by batch size."""


def batch_requests(references: list[ReferenceImage], count: int) -> list[GenerationRequest]:
    """One request per batch prompt, each with its own seed and the first `count` references."""
    return [
        GenerationRequest(p, tuple(references[:count]), seed=i, size=SIZE, steps=2) for i, p in enumerate(BATCH_PROMPTS)
    ]


def batched(provider: str, model_dirs: dict[str, Path]) -> BatchImageGenerator:
    """The backend for `provider`, taking up to 3 references (SDXL too, so several are batched per picture)."""
    generator = build(provider, model_dirs, sdxl_max_references=3)
    assert isinstance(generator, BatchImageGenerator)
    return generator


def submit_while_the_device_is_busy(wrapper: BatchingGenerator, requests: list[GenerationRequest]) -> list[Any]:
    """Submit every request from its own thread while another model holds the device: all queue for one batch.

    The device is let go once every request is queued, not after a fixed pause: on a loaded machine (the suite
    beside a ten-million-vector build) 0.2 s was too short for seven threads to start, and they split."""
    batcher = wrapper._batcher
    assert batcher is not None
    with ThreadPoolExecutor(len(requests)) as pool:
        with runtime.device_lock:
            futures = [pool.submit(wrapper.generate, r) for r in requests]
            deadline = time.monotonic() + 30
            while len(batcher.queue) < len(requests) and time.monotonic() < deadline:
                time.sleep(0.01)
        return [f.result() for f in futures]


@pytest.mark.parametrize(("provider", "count"), BATCH_CASES)
def test_a_picture_does_not_depend_on_the_requests_it_is_batched_with(
    provider: str, count: int, model_dirs: dict[str, Path], references: list[ReferenceImage]
) -> None:
    generator = batched(provider, model_dirs)
    r = batch_requests(references, count)
    assert len({generator.batch_key(request) for request in r}) == 1
    first = generator.generate_batch([r[0], r[1], r[2], r[3]])
    second = generator.generate_batch([r[4], r[2], r[0], r[1]])
    assert np.array_equal(pixels(first[0].image), pixels(second[2].image))
    assert np.array_equal(pixels(first[2].image), pixels(second[1].image))
    assert not np.array_equal(pixels(first[0].image), pixels(first[1].image))
    assert [x.prompt_used for x in first] == [generator.generate(request).prompt_used for request in r[:4]]


@pytest.mark.parametrize(("provider", "count"), BATCH_CASES)
def test_a_batched_picture_is_the_picture_drawn_alone_up_to_rounding(
    provider: str, count: int, model_dirs: dict[str, Path], references: list[ReferenceImage]
) -> None:
    generator = batched(provider, model_dirs)
    r = batch_requests(references, count)[:4]
    for alone, together in zip([generator.generate(x) for x in r], generator.generate_batch(r), strict=True):
        difference = np.abs(pixels(alone.image).astype(int) - pixels(together.image).astype(int))
        assert difference.max() <= ROUNDING_LEVELS


def test_concurrent_requests_share_calls_only_with_requests_of_their_kind(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = spy(monkeypatch, OmniGenPipeline)
    generator = batched("omnigen", model_dirs)
    same = batch_requests(references, 0)[:3]
    longer = GenerationRequest(PROMPT, seed=3, size=SIZE, steps=2)  # another prompt length: its rows do not line up
    with_references = batch_requests(references, 2)[:2]
    bigger = GenerationRequest(BATCH_PROMPTS[0], seed=4, size=(128, 128), steps=2)
    requests = [*same, longer, *with_references, bigger]
    results = submit_while_the_device_is_busy(BatchingGenerator(generator, max_batch=8), requests)

    assert sorted(len(call["prompt"]) for call in calls) == [1, 1, 2, 3]
    assert len({generator.batch_key(r) for r in requests}) == 4
    # Each caller gets its own picture: the one its request gets in a batch of its kind.
    expected = generator.generate_batch(same)
    assert all(np.array_equal(pixels(a.image), pixels(b.image)) for a, b in zip(results[:3], expected, strict=True))
    assert [r.prompt_used for r in results[4:6]] == [x.prompt_used for x in generator.generate_batch(with_references)]
    assert results[-1].image.size == (128, 128)


def test_a_batch_that_runs_out_of_gpu_memory_is_split_in_halves_and_every_picture_drawn(
    model_dirs: dict[str, Path], references: list[ReferenceImage], monkeypatch: pytest.MonkeyPatch
) -> None:
    generator = batched("sdxl-ip-adapter", model_dirs)
    original = StableDiffusionXLPipeline.__call__
    sizes: list[int] = []

    def fits_two(self: Any, *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(kwargs["prompt"]))
        if len(kwargs["prompt"]) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(StableDiffusionXLPipeline, "__call__", fits_two)
    r = batch_requests(references, 2)[:4]
    results = submit_while_the_device_is_busy(BatchingGenerator(generator), r)

    assert sizes == [4, 2, 2]
    halves = generator.generate_batch(r[:2]) + generator.generate_batch(r[2:])
    assert all(np.array_equal(pixels(a.image), pixels(b.image)) for a, b in zip(results, halves, strict=True))


def test_a_generator_that_cannot_batch_is_called_directly() -> None:
    inner = ScriptedGenerator()
    wrapper = BatchingGenerator(inner)
    result = wrapper.generate(GenerationRequest(PROMPT, seed=1))
    assert inner.requests == [GenerationRequest(PROMPT, seed=1)] and result.prompt_used == PROMPT
    assert (wrapper.model_id, wrapper.max_references) == (inner.model_id, inner.max_references)
