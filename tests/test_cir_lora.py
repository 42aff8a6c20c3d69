"""CIR-LoRA on a tiny FLUX: diptychs, descriptions, training end to end, and files diffusers loads back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("peft")
torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from imageloop.errors import ConfigError  # noqa: E402
from imageloop.prompts.diptych import diptych_description  # noqa: E402
from imageloop.tiny.diffusion import build_flux  # noqa: E402
from imageloop.training.cir_lora import (  # noqa: E402
    CONFIG_FILE,
    LORA_WEIGHTS,
    LoRAMixture,
    apply_cir_lora,
    resolve_base_model,
    stitch_diptych,
    train_cir_lora,
)
from imageloop.training.options import CIRLoRAOptions  # noqa: E402
from imageloop.training.progress import TrainProgress  # noqa: E402
from imageloop.training.triplets import read_triplets  # noqa: E402
from tests.triplet_folders import COLOURS, colour_triplets, picture, write_jsonl  # noqa: E402

FluxPipeline = diffusers.FluxPipeline
TINY = CIRLoRAOptions(rank=4, resolution=16, learning_rate=1e-2, max_sequence_length=32)


def tiny(flux_dir: Path, **changes: Any) -> CIRLoRAOptions:
    """TINY on the tiny FLUX, with `changes`."""
    return TINY.overridden({"base_model": str(flux_dir), **changes})


DESCRIPTION = diptych_description("make it blue", "red dot on grey", "blue dot on grey", "dot")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-flux")
    build_flux(directory)
    return directory


@pytest.fixture(scope="module")
def real_triplets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four real triplets in a JSONL file, as `--real` / `--triplets` would name them."""
    root = tmp_path_factory.mktemp("real")
    combos = [("dot", "red", "blue"), ("bars", "green", "red"), ("checks", "blue", "yellow"), ("frame", "cyan", "red")]
    return write_jsonl(root / "real.jsonl", colour_triplets(root, combos, size=16))


def load(flux_dir: Path) -> Any:
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe: Any) -> np.ndarray:
    output = pipe(
        prompt=DESCRIPTION,
        width=32,
        height=16,
        num_inference_steps=2,
        max_sequence_length=32,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
    )
    return np.asarray(output.images[0])


def transformer_inputs(pipe: Any) -> dict[str, Any]:
    """One fixed denoising call's inputs for the tiny transformer (a 16x32 latent diptych)."""
    prompt_embeds, pooled, text_ids = pipe.encode_prompt(prompt=DESCRIPTION, prompt_2=None, max_sequence_length=32)
    latents = torch.randn(1, 1, 16, 32, generator=torch.Generator().manual_seed(1))
    return {
        "hidden_states": FluxPipeline._pack_latents(latents, 1, 1, 16, 32),
        "timestep": torch.tensor([0.5]),
        "guidance": torch.tensor([1.0]),
        "pooled_projections": pooled,
        "encoder_hidden_states": prompt_embeds,
        "txt_ids": text_ids,
        "img_ids": FluxPipeline._prepare_latent_image_ids(1, 8, 16, "cpu", torch.float32),
        "return_dict": False,
    }


def test_the_diptych_puts_the_reference_left_and_the_target_right() -> None:
    canvas = stitch_diptych(picture("dot", "red", 40), picture("dot", "blue", 24), side=16)
    assert canvas.size == (32, 16)
    assert canvas.getpixel((8, 8)) == COLOURS["red"]
    assert canvas.getpixel((24, 8)) == COLOURS["blue"]


def test_the_description_names_the_subject_both_captions_and_the_change() -> None:
    assert DESCRIPTION == (
        "This two-panel image shows the same dot side by side: the right panel is the left panel after one "
        "change, make it blue. [LEFT] red dot on grey [RIGHT] blue dot on grey"
    )


def test_a_description_without_captions_keeps_only_what_is_known() -> None:
    text = diptych_description("add a hat.")
    assert text.endswith("the same scene side by side: the right panel is the left panel after one change, add a hat.")
    assert "[LEFT]" not in text and "[RIGHT]" not in text


@pytest.mark.parametrize("experts", [1, 2])
def test_saved_experts_load_into_flux_and_reproduce_the_trained_transformer(
    flux_dir: Path, tmp_path: Path, experts: int
) -> None:
    pipe = load(flux_dir)
    inputs = transformer_inputs(pipe)
    base = pipe.transformer(**inputs)[0]
    mixture = LoRAMixture(pipe.transformer, pooled_dim=32, rank=4, alpha=8.0, experts=experts)
    with torch.no_grad():  # stand-ins for trained weights: every expert and the router away from their start
        for parameter in mixture.trainable_parameters():
            parameter.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(parameter.numel()))
        gates = mixture.route(inputs["pooled_projections"])
        trained = pipe.transformer(**inputs)[0]
    mixture.save(tmp_path, {"max_sequence_length": 32})

    fresh = load(flux_dir)
    applied = apply_cir_lora(fresh, tmp_path, DESCRIPTION)
    with torch.no_grad():
        loaded = fresh.transformer(**inputs)[0]
    assert not torch.allclose(trained, base, atol=1e-3)
    assert torch.allclose(loaded, trained, atol=1e-5)
    assert applied == pytest.approx(gates[0].tolist(), abs=1e-6)


def test_training_a_cir_lora_end_to_end_changes_what_flux_draws(
    flux_dir: Path, real_triplets: Path, tmp_path: Path
) -> None:
    heard: list[TrainProgress] = []
    result = train_cir_lora(real_triplets, tmp_path, options=tiny(flux_dir, steps=3), progress=heard.append)
    assert [p.step for p in heard] == [1, 2, 3] and len(result.loss_curve) == 3
    assert all(np.isfinite(p.loss) for p in result.loss_curve)
    assert (tmp_path / LORA_WEIGHTS).is_file() and result.loss_curve_svg.is_file()

    pipe = load(flux_dir)
    before = draw(pipe)
    pipe.load_lora_weights(tmp_path)  # the plain diffusers call: a one-expert CIR-LoRA is an ordinary FLUX LoRA
    assert np.abs(draw(pipe) - before).max() > 1e-3


def test_a_mixture_of_experts_saves_each_expert_and_its_router_and_draws_with_the_routed_mix(
    flux_dir: Path, real_triplets: Path, tmp_path: Path
) -> None:
    train_cir_lora(real_triplets, tmp_path, options=tiny(flux_dir, steps=2, experts=2))
    assert {p.name for p in tmp_path.iterdir()} >= {
        "expert_0.safetensors",
        "expert_1.safetensors",
        "router.safetensors",
    }

    pipe = load(flux_dir)
    before = draw(pipe)
    gates = apply_cir_lora(pipe, tmp_path, DESCRIPTION)
    assert len(gates) == 2 and sum(gates) == pytest.approx(1.0)
    assert np.abs(draw(pipe) - before).max() > 1e-3


def test_a_real_triplet_without_captions_still_trains(flux_dir: Path, tmp_path: Path) -> None:
    records = colour_triplets(tmp_path / "pictures", [("dot", "red", "blue")], size=16, relative=False)
    for record in records:
        record["reference_text"] = record["target_text"] = record["object"] = ""
    source = write_jsonl(tmp_path / "real.jsonl", records)
    assert read_triplets(source)[0].reference_text == ""
    result = train_cir_lora(source, tmp_path / "lora", options=tiny(flux_dir, steps=1))
    assert (result.out_dir / CONFIG_FILE).is_file()


def test_a_panel_size_flux_cannot_patch_is_refused(flux_dir: Path, real_triplets: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="multiple of 2"):
        train_cir_lora(real_triplets, tmp_path, options=tiny(flux_dir, steps=1, resolution=15))


def test_an_unknown_weighting_scheme_is_refused_by_the_options() -> None:
    with pytest.raises(ConfigError, match="weighting_scheme"):
        CIRLoRAOptions().overridden({"weighting_scheme": "uniform", "base_model": "imageloop-test/no-such-flux"})


def test_a_folder_without_a_cir_lora_is_refused(flux_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no CIR-LoRA here"):
        apply_cir_lora(load(flux_dir), tmp_path, DESCRIPTION)


def test_the_base_model_is_named_as_a_flux_provider_string_or_a_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve_base_model("flux:black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    assert resolve_base_model("black-forest-labs/FLUX.1-dev") == "black-forest-labs/FLUX.1-dev"
    monkeypatch.setenv("IMAGELOOP_TINY_CACHE", str(tmp_path))
    assert Path(resolve_base_model("tiny:flux")) == tmp_path / "gen-flux"


@pytest.mark.parametrize("spec", ["tiny:omnigen", "omnigen:Shitao/OmniGen-v1-diffusers"])
def test_a_base_model_that_is_not_flux_is_refused(spec: str) -> None:
    with pytest.raises(ConfigError, match="CIR-LoRA trains on FLUX"):
        resolve_base_model(spec)


# Checkpoints and resume.


def lora_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / LORA_WEIGHTS))


def test_an_interrupted_run_resumes_to_the_weights_and_curve_of_an_uninterrupted_one(
    flux_dir: Path, real_triplets: Path, tmp_path: Path
) -> None:
    options = tiny(flux_dir, steps=4, checkpoint_every=1, batch_size=2)
    whole = train_cir_lora(real_triplets, tmp_path / "whole", options=options)

    class Interrupted(Exception):
        pass

    def stop_at_3(progress: TrainProgress) -> None:
        if progress.step == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        train_cir_lora(real_triplets, tmp_path / "resumed", options=options, progress=stop_at_3)
    resumed = train_cir_lora(real_triplets, tmp_path / "resumed", options=options)

    assert resumed.resumed_from_step == 2
    assert resumed.loss_curve == whole.loss_curve
    expected = lora_weights(whole.out_dir)
    assert all(torch.equal(weight, expected[name]) for name, weight in lora_weights(resumed.out_dir).items())


def test_a_folder_holding_a_run_with_other_options_is_refused(
    flux_dir: Path, real_triplets: Path, tmp_path: Path
) -> None:
    train_cir_lora(real_triplets, tmp_path, options=tiny(flux_dir, steps=1))
    with pytest.raises(ConfigError, match="other data or settings"):
        train_cir_lora(real_triplets, tmp_path, options=tiny(flux_dir, steps=1, rank=2))


def test_killed_with_sigkill_and_run_again_it_resumes_from_its_last_checkpoint(
    real_triplets: Path, tmp_path: Path
) -> None:
    import json
    import os
    import signal
    import subprocess
    import sys
    import time

    from imageloop.training.checkpoints import CHECKPOINTS_DIR, LATEST

    out = tmp_path / "lora"
    steps = 40
    command = [sys.executable, "-m", "imageloop.cli", "train", "cir-lora", "--generator", "tiny:flux", "--triplets",
               str(real_triplets), "--out", str(out), "--steps", str(steps), "--checkpoint-every", "1", "--rank", "4",
               "--resolution", "16", "--batch-size", "2", "--max-sequence-length", "32", "--learning-rate", "0.01",
               "--json"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    latest = out / CHECKPOINTS_DIR / LATEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and first.poll() is None:
        if latest.is_file() and json.loads(latest.read_text() or "{}").get("step", 0) >= 3:
            break
        time.sleep(0.01)
    first.send_signal(signal.SIGKILL)  # no cleanup, no finally
    first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stderr
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert 3 <= summary["resumed_from_step"] < steps and summary["steps"] == steps

    whole = train_cir_lora(
        real_triplets, tmp_path / "whole", options=tiny(resolve_base_model("tiny:flux"), steps=steps, batch_size=2)
    )
    assert json.loads((out / "loss_curve.json").read_text())["points"] == [vars(p) for p in whole.loss_curve]


# Captions for real triplets that come without them.


class ScriptedCaptioner:
    """Describes an image by its file name, counting the images it was asked about."""

    def __init__(self) -> None:
        self.asked: list[Path] = []

    def __call__(self, image: Path) -> str:
        self.asked.append(image)
        return f"a picture called {image.stem}"


def test_uncaptioned_images_are_described_once_and_the_descriptions_reach_the_diptych_prompts(
    flux_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from imageloop.training import cir_lora

    records = colour_triplets(tmp_path / "pictures", [("dot", "red", "blue"), ("bars", "blue", "red")], size=16)
    for record in records:
        record["reference_text"] = record["target_text"] = ""
    source = write_jsonl(tmp_path / "pictures" / "real.jsonl", records)
    described: list[str] = []
    real_description = cir_lora.triplet_description
    monkeypatch.setattr(
        cir_lora, "triplet_description", lambda t: described.append(real_description(t)) or described[-1]
    )
    captioner = ScriptedCaptioner()

    train_cir_lora(source, tmp_path / "lora", options=tiny(flux_dir, steps=1), captioner=captioner)
    assert sorted(path.stem for path in captioner.asked) == ["bars-blue", "bars-red", "dot-blue", "dot-red"]
    assert "[LEFT] a picture called dot-red [RIGHT] a picture called dot-blue" in described[0]

    again = train_cir_lora(source, tmp_path / "lora", options=tiny(flux_dir, steps=1), captioner=captioner)
    assert len(captioner.asked) == 4 and again.resumed_from_step == 1  # the journal kept every description
