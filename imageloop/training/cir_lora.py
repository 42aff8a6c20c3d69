"""CIR-LoRA: an in-context LoRA on FLUX that draws CIR diptychs (reference | target), from a few real triplets.

DAIG (CVPR 2026) fine-tunes FLUX on 32 real triplets so that the diptychs it then synthesises look
like the target domain. Each training example is one canvas, the reference on the left and the target
on the right (`stitch_diptych`), described by one in-context prompt built from both captions and the
change (`imageloop.prompts.diptych`; the recipe of In-Context LoRA, Huang et al. 2024).

The training step is FLUX's flow matching as diffusers' `train_dreambooth_lora_flux.py` does it: VAE
latents shifted and scaled by the VAE's factors, a timestep index drawn by the weighting scheme's
density ("none": uniform), the noisy latent (1 - sigma) * x + sigma * noise packed into 2x2 patches
with the pipeline's image ids, the transformer asked (at timestep sigma, with FLUX.1-dev's guidance
embedding) for the velocity noise - x, and a mean squared error. Only the LoRA weights learn.

The mixture-of-experts option (`experts=K > 1`) gives every adapted layer K LoRA experts and one router
(a linear layer and a softmax over the description's pooled CLIP embedding) that mixes them per
example: delta W(description) = sum_k g_k(description) * B_k A_k. What a static `load_lora_weights`
file can hold: a fixed set of LoRA matrices, no router. For one description the mixture is exactly the
rank-K*r LoRA [g_1 B_1 ... g_K B_K][A_1; ...; A_K], but a file of that holds one description's routing
only. So we save what keeps the mixture whole: each expert as its own diffusers LoRA file (loaded as
named adapters) plus the router, and `apply_cir_lora(pipe, folder, description)` loads the experts once
and sets their adapter weights to the router's gates for the description about to be drawn. That is
exact for a call that draws one description (a batch of different descriptions would share one mix).
With one expert the folder holds a plain `pytorch_lora_weights.safetensors` that any FLUX LoRA loader reads.

Real triplets often come without captions (a benchmark's train split has the change only); with a
captioner, `train_cir_lora` describes each uncaptioned image once (journaled in `OUT/captions.jsonl`), so
the diptych descriptions carry both panels' captions as DAIG's do. A run checkpoints its LoRA weights,
optimizer and random generators (`imageloop.training.checkpoints`); the same call on the same folder, after
any interruption (`kill -9` included), resumes and ends with the weights an uninterrupted run saves.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn

from imageloop.errors import ConfigError
from imageloop.files import write_json_atomic
from imageloop.prompts.diptych import DIPTYCH_TEMPLATE, diptych_description
from imageloop.runtime import diffusers_class
from imageloop.tools.images import open_image
from imageloop.training.checkpoints import latest_checkpoint, save_checkpoint
from imageloop.training.options import CIRLoRAOptions
from imageloop.training.progress import (
    LossPoint,
    ProgressCallback,
    TrainProgress,
    TrainResult,
    finish_training,
)
from imageloop.training.triplets import Captioner, Triplet, describe_triplets, read_triplets

DEFAULT_BASE_MODEL = "black-forest-labs/FLUX.1-dev"
GUIDANCE_SCALE = 3.5
"""FLUX.1-dev is guidance-distilled: training feeds it the guidance it draws with (diffusers' script's default)."""
CAPTIONS_JOURNAL = "captions.jsonl"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""diffusers' default LoRA file name: `pipe.load_lora_weights(folder)` finds it without a weight_name."""
ROUTER_WEIGHTS = "router.safetensors"
CONFIG_FILE = "cir_lora.json"
CONFIG_FORMAT = "imageloop-cir-lora/1"
ATTENTION_PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
"""Attention projections of FLUX's blocks: the image stream's q, k, v and output (all diffusers' FLUX LoRA
script adapts by default) and the text stream's, through which the in-context description steers both panels."""


def stitch_diptych(reference: Image.Image, target: Image.Image, side: int) -> Image.Image:
    """One canvas: the reference left, the target right, each centre-cropped and scaled to side x side."""
    canvas = Image.new("RGB", (2 * side, side))
    canvas.paste(ImageOps.fit(reference.convert("RGB"), (side, side)), (0, 0))
    canvas.paste(ImageOps.fit(target.convert("RGB"), (side, side)), (side, 0))
    return canvas


def triplet_description(triplet: Triplet) -> str:
    """The in-context description of one triplet's diptych."""
    return diptych_description(triplet.change, triplet.reference_text, triplet.target_text, triplet.object)


# --- LoRA experts ------------------------------------------------------------------------------


class _Gates:
    """The current batch's expert weights (batch, K), shared by every adapted layer; None means one expert."""

    value: torch.Tensor | None = None


class LoRAExperts(nn.Module):
    """A frozen linear layer plus K low-rank updates, mixed per sample by the router's gates (K = 1: LoRA)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, experts: int, gates: _Gates) -> None:
        super().__init__()
        self.base = base
        # peft's "gaussian" initialisation: A ~ N(0, 1/r^2), B = 0, so training starts at the base model.
        self.lora_A = nn.Parameter(torch.randn(experts, rank, base.in_features) / rank)
        self.lora_B = nn.Parameter(torch.zeros(experts, base.out_features, rank))
        self.scale = alpha / rank
        self._gates = gates

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The base output plus the gated sum of the experts' low-rank updates."""
        hidden = torch.einsum("...i,kri->...kr", x.to(self.lora_A.dtype), self.lora_A)
        gates = self._gates.value
        if gates is not None:
            hidden = hidden * gates.view(gates.shape[0], *([1] * (x.ndim - 2)), gates.shape[1], 1)
        delta = torch.einsum("...kr,kor->...o", hidden, self.lora_B) * self.scale
        output: torch.Tensor = self.base(x)
        return output + delta.to(output.dtype)


class LoRAMixture(nn.Module):
    """K LoRA experts on a FLUX transformer's attention projections and the router that mixes them."""

    def __init__(
        self,
        transformer: nn.Module,
        *,
        pooled_dim: int,
        rank: int,
        alpha: float,
        experts: int,
        target_modules: Sequence[str] = ATTENTION_PROJECTIONS,
    ) -> None:
        super().__init__()
        self.gates = _Gates()
        self.names: list[str] = []
        layers: list[LoRAExperts] = []
        for name, module in list(transformer.named_modules()):
            if isinstance(module, nn.Linear) and any(name.endswith(f"attn.{t}") for t in target_modules):
                parent_name, _, child = name.rpartition(".")
                layer = LoRAExperts(module, rank, alpha, experts, self.gates)
                setattr(transformer.get_submodule(parent_name), child, layer)
                self.names.append(name)
                layers.append(layer)
        if not layers:
            raise ConfigError(f"no attention projection named {', '.join(target_modules)} in this transformer")
        self._layers = layers
        self.layers = nn.ModuleList(layers)  # registers their parameters with this module
        self.experts = experts
        # Zero weights: every expert starts with the same share, and the router learns to tell them apart.
        self.router = nn.Linear(pooled_dim, experts) if experts > 1 else None
        if self.router is not None:
            nn.init.zeros_(self.router.weight)
            nn.init.zeros_(self.router.bias)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The experts' A and B matrices and the router: everything that learns (the base layers never do)."""
        return [parameter for _, parameter in self.named_trainable_parameters()]

    def named_trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """`trainable_parameters` by name, as a checkpoint keeps them."""
        router = list(self.router.named_parameters("router")) if self.router is not None else []
        layers = [
            (f"layers.{index}.{name}", parameter)
            for index, layer in enumerate(self._layers)
            for name, parameter in (("lora_A", layer.lora_A), ("lora_B", layer.lora_B))
        ]
        return layers + router

    def route(self, pooled_description: torch.Tensor) -> torch.Tensor:
        """Set (and return) each example's expert weights from its description's pooled embedding."""
        if self.router is None:
            self.gates.value = None
            return torch.ones(pooled_description.shape[0], 1)
        self.gates.value = torch.softmax(self.router(pooled_description.to(self.router.weight.dtype)), dim=-1)
        return self.gates.value

    def expert_state_dict(self, expert: int) -> dict[str, torch.Tensor]:
        """Expert `expert` in diffusers' FLUX LoRA layout, its alpha / rank folded into B (loads at scale 1)."""
        state = {}
        for name, layer in zip(self.names, self._layers, strict=True):
            state[f"{name}.lora_A.weight"] = layer.lora_A[expert].detach().cpu().contiguous()
            state[f"{name}.lora_B.weight"] = (layer.lora_B[expert] * layer.scale).detach().cpu().contiguous()
        return state

    def save(self, directory: Path, config: dict[str, Any]) -> None:
        """Write the LoRA file(s), the router and `cir_lora.json` (written last: it marks the folder complete)."""
        FluxPipeline = diffusers_class("FluxPipeline")
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        files = [LORA_WEIGHTS] if self.experts == 1 else [f"expert_{k}.safetensors" for k in range(self.experts)]
        for expert, name in enumerate(files):
            FluxPipeline.save_lora_weights(
                directory, transformer_lora_layers=self.expert_state_dict(expert), weight_name=name
            )
        if self.router is not None:
            router = {k: v.detach().cpu().contiguous() for k, v in self.router.state_dict().items()}
            save_file(router, str(directory / ROUTER_WEIGHTS))
        write_json_atomic(
            directory / CONFIG_FILE,
            {
                "format": CONFIG_FORMAT,
                "experts": self.experts,
                "weights": files,
                "router": ROUTER_WEIGHTS if self.router is not None else None,
                "template": DIPTYCH_TEMPLATE,
                **config,
            },
        )


def resolve_base_model(spec: str) -> str:
    """The FLUX checkpoint a CIR-LoRA trains on: `flux:MODEL` or `MODEL` (hub id or folder), or `tiny:flux`."""
    provider, _, model = spec.partition(":")
    if provider == "flux" and model:
        return model
    if provider == "tiny":
        if model != "flux":
            raise ConfigError(f"{spec}: CIR-LoRA trains on FLUX; the tiny one is tiny:flux")
        from imageloop.tiny.diffusion import tiny_generator_dir

        return str(tiny_generator_dir("flux"))
    if model and "/" not in provider and not Path(spec).exists():
        raise ConfigError(f"{spec}: CIR-LoRA trains on FLUX; name it flux:MODEL, tiny:flux, a hub id or a folder")
    return spec


def apply_cir_lora(pipe: Any, lora_dir: Path, description: str) -> list[float]:
    """Make a FluxPipeline draw with the CIR-LoRA in `lora_dir` for `description`; return the experts' weights.

    The experts load once per pipeline (as named adapters); each call sets their weights to the router's
    gates for `description`, so call it before every diptych drawn with a different description.
    """
    config_path = lora_dir / CONFIG_FILE
    if not config_path.is_file():
        raise ConfigError(f"{lora_dir}: no CIR-LoRA here (expected {CONFIG_FILE})")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("format") != CONFIG_FORMAT:
        raise ConfigError(f"{lora_dir}: {config.get('format')!r} is not a CIR-LoRA format this version reads")
    # One adapter-name prefix per folder, so two CIR-LoRAs can be loaded into one pipeline side by side.
    prefix = "cir_lora_" + hashlib.sha256(str(lora_dir.resolve()).encode()).hexdigest()[:8]
    names = [f"{prefix}_{k}" for k in range(len(config["weights"]))]
    loaded = set(pipe.get_list_adapters().get("transformer", []))
    for name, weight_name in zip(names, config["weights"], strict=True):
        if name not in loaded:
            pipe.load_lora_weights(lora_dir, weight_name=weight_name, adapter_name=name)
    gates = [1.0]
    if config["router"]:
        from safetensors.torch import load_file

        router = load_file(str(lora_dir / config["router"]))
        with torch.inference_mode():
            _, pooled, _ = pipe.encode_prompt(
                prompt=description, prompt_2=None, max_sequence_length=config["max_sequence_length"]
            )
            logits = pooled.float().cpu() @ router["weight"].float().T + router["bias"].float()
            gates = torch.softmax(logits, dim=-1)[0].tolist()
    pipe.set_adapters(names, adapter_weights=gates)
    return gates


# --- the flow-matching step --------------------------------------------------------------------


@dataclass(frozen=True)
class FlowSchedule:
    """The training schedule's timestep and sigma tables (the scheduler's own, as diffusers' script uses)."""

    timesteps: torch.Tensor
    sigmas: torch.Tensor

    @classmethod
    def of(cls, scheduler_config: Any) -> FlowSchedule:
        """The tables of a FlowMatchEulerDiscreteScheduler built from `scheduler_config`."""
        FlowMatchEulerDiscreteScheduler = diffusers_class("FlowMatchEulerDiscreteScheduler")

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        return cls(scheduler.timesteps.clone(), scheduler.sigmas[: len(scheduler.timesteps)].clone())


def flow_matching_loss(
    transformer: Any,
    latents: torch.Tensor,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    text_ids: torch.Tensor,
    schedule: FlowSchedule,
    *,
    guidance_scale: float = 1.0,
    weighting_scheme: str = "none",
) -> torch.Tensor:
    """FLUX's rectified-flow loss on shifted, scaled VAE latents (batch, C, H, W): predict noise - latents."""
    FluxPipeline = diffusers_class("FluxPipeline")
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    batch, channels, height, width = latents.shape
    noise = torch.randn_like(latents)
    u = compute_density_for_timestep_sampling(
        weighting_scheme=weighting_scheme, batch_size=batch, logit_mean=0.0, logit_std=1.0, mode_scale=1.29
    )
    indices = (u * len(schedule.timesteps)).long().clamp_max(len(schedule.timesteps) - 1)
    timesteps = schedule.timesteps[indices].to(latents.device)
    sigmas = schedule.sigmas[indices].to(latents.device, latents.dtype).view(batch, 1, 1, 1)
    noisy = (1.0 - sigmas) * latents + sigmas * noise

    def pack(x: torch.Tensor) -> torch.Tensor:
        return FluxPipeline._pack_latents(x, batch, channels, height, width)  # type: ignore[no-any-return]

    guidance = None
    if transformer.config.guidance_embeds:
        guidance = torch.full((batch,), guidance_scale, device=latents.device, dtype=latents.dtype)
    prediction = transformer(
        hidden_states=pack(noisy),
        timestep=timesteps / 1000,
        guidance=guidance,
        pooled_projections=pooled_prompt_embeds,
        encoder_hidden_states=prompt_embeds,
        txt_ids=text_ids,
        img_ids=FluxPipeline._prepare_latent_image_ids(batch, height // 2, width // 2, latents.device, latents.dtype),
        return_dict=False,
    )[0]
    # Packing only reorders values, so the error is compared in the packed layout the transformer speaks.
    target = pack(noise - latents)
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=weighting_scheme, sigmas=sigmas).view(batch, 1, 1)
    loss: torch.Tensor = (weighting.float() * (prediction.float() - target.float()) ** 2).mean()
    return loss


# --- training ----------------------------------------------------------------------------------


def train_cir_lora(
    triplets: Path,
    out_dir: Path,
    *,
    image_folders: Sequence[Path] = (),
    options: CIRLoRAOptions | None = None,
    guidance_scale: float | None = None,
    device: str | None = None,
    dtype: str | None = None,
    captioner: Captioner | None = None,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Fine-tune a CIR-LoRA on FLUX `options.base_model` from the triplets of `triplets` (a folder or JSONL).

    The base model is a FLUX.1 diffusers checkpoint: `flux:MODEL`, a hub id, a folder, or `tiny:flux`.
    `captioner` describes the images whose captions a triplet lacks (journaled in `OUT/captions.jsonl`);
    images may also lie in `image_folders` (see `read_triplets`).
    Checkpoints go to `OUT/checkpoints` every `options.checkpoint_every` steps; the same call on the same
    folder resumes from the latest one and ends with the LoRA an uninterrupted run would have saved.
    """
    FluxPipeline = diffusers_class("FluxPipeline")

    from imageloop.tools.generators._diffusers_common import from_hub, resolve_placement

    options = options or CIRLoRAOptions()
    _check(options)
    base_model = resolve_base_model(options.base_model or DEFAULT_BASE_MODEL)
    examples = read_triplets(triplets, image_folders)
    if captioner is not None:
        examples = describe_triplets(examples, captioner, out_dir / CAPTIONS_JOURNAL)
    guidance = GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    placed_device, placed_dtype = resolve_placement(device, dtype, offload=False)
    fingerprint = _fingerprint(examples, options, base_model, guidance)
    # A private copy, never the generators' cached pipeline: training rewires its transformer.
    pipe = from_hub(base_model, lambda: FluxPipeline.from_pretrained(base_model, dtype=placed_dtype))
    multiple = 2 * pipe.vae_scale_factor
    if options.resolution % multiple:
        raise ConfigError(f"resolution must be a multiple of {multiple} for {base_model}, got {options.resolution}")
    pipe.to(placed_device)
    for part in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        part.requires_grad_(False)
    cuda = [torch.device(placed_device).index or 0] if placed_device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(options.seed)
        latents, texts = _encode_examples(pipe, examples, options, placed_device)
        if placed_device != "cpu":
            # Latents and text embeddings are cached: only the transformer stays on the accelerator.
            for part in (pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
                part.to("cpu")
        mixture = LoRAMixture(
            pipe.transformer,
            pooled_dim=texts[0][1].shape[-1],
            rank=options.rank,
            alpha=options.alpha,
            experts=options.experts,
        ).to(placed_device)
        trainable = dict(mixture.named_trainable_parameters())
        optimizer = torch.optim.AdamW(trainable.values(), lr=options.learning_rate, weight_decay=1e-4)
        schedule = FlowSchedule.of(pipe.scheduler.config)
        curve: list[LossPoint] = []
        out_dir.mkdir(parents=True, exist_ok=True)
        checkpoint = latest_checkpoint(out_dir, fingerprint, placed_device)
        if checkpoint is not None:
            with torch.no_grad():
                for name, parameter in trainable.items():
                    parameter.copy_(checkpoint.weights[name])
            optimizer.load_state_dict(checkpoint.optimizer)
            curve = [LossPoint(**point) for point in checkpoint.state["loss_curve"]]
        resumed_from = len(curve)
        started = time.perf_counter()
        for step in range(resumed_from + 1, options.steps + 1):
            chosen = torch.randperm(len(examples))[: options.batch_size].tolist()
            vae = pipe.vae.config
            batch = torch.cat([latents[i].sample() for i in chosen])
            batch = ((batch - vae.shift_factor) * vae.scaling_factor).to(placed_dtype)
            prompt_embeds = torch.cat([texts[i][0] for i in chosen])
            pooled = torch.cat([texts[i][1] for i in chosen])
            mixture.route(pooled)
            loss = flow_matching_loss(
                pipe.transformer,
                batch,
                prompt_embeds,
                pooled,
                texts[chosen[0]][2],
                schedule,
                guidance_scale=guidance,
                weighting_scheme=options.weighting_scheme,
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            torch.nn.utils.clip_grad_norm_(list(trainable.values()), options.max_grad_norm)
            optimizer.step()
            curve.append(LossPoint(step, "cir-lora", float(loss.item())))
            if progress is not None:
                progress(TrainProgress("cir-lora", step, options.steps, curve[-1].loss))
            if step % options.checkpoint_every == 0 or step == options.steps:
                save_checkpoint(
                    out_dir, step, weights=trainable, optimizer=optimizer, fingerprint=fingerprint,
                    state={"loss_curve": [asdict(point) for point in curve]}, device=placed_device,
                )  # fmt: skip
        seconds = time.perf_counter() - started
    mixture.save(
        out_dir,
        {
            "base_model": base_model,
            "rank": options.rank,
            "alpha": options.alpha,
            "resolution": options.resolution,
            "diptych_size": [2 * options.resolution, options.resolution],
            "max_sequence_length": options.max_sequence_length,
            "target_modules": list(ATTENTION_PROJECTIONS),
            "adapted_layers": len(mixture.names),
            "triplets": len(examples),
            "captioned": captioner is not None,
            "steps": options.steps,
            "final_loss": curve[-1].loss,
            "guidance_scale": guidance,
            "options": options.record(),
        },
    )
    title = f"CIR-LoRA flow-matching loss ({options.experts} expert(s))"
    return finish_training(out_dir, curve, title, seconds=seconds, resumed_from_step=resumed_from)


def _fingerprint(examples: Sequence[Triplet], options: CIRLoRAOptions, base_model: str, guidance: float) -> str:
    """What must match for a checkpoint to be resumed: the examples as described, the base model, every option."""
    knobs = options.model_dump(mode="json", exclude={"checkpoint_every", "base_model"})
    data = [[str(t.reference_image), str(t.target_image), triplet_description(t)] for t in examples]
    blob = json.dumps({"options": knobs, "base": base_model, "guidance": guidance, "examples": data}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check(options: CIRLoRAOptions) -> None:
    """Before any load: at least one step, and a FLUX base model."""
    if options.steps < 1:
        raise ConfigError(f"`steps` must be at least 1, got {options.steps}")
    resolve_base_model(options.base_model or DEFAULT_BASE_MODEL)


def _encode_examples(
    pipe: Any, examples: Sequence[Triplet], options: CIRLoRAOptions, device: str
) -> tuple[list[Any], list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]:
    """Each example's VAE latent distribution and description embeddings, computed once (both encoders are frozen)."""
    latents, texts = [], []
    encoded: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for triplet in examples:
            canvas = stitch_diptych(
                open_image(triplet.reference_image), open_image(triplet.target_image), options.resolution
            )
            pixels = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None]
            latents.append(pipe.vae.encode(pixels.to(device, pipe.vae.dtype)).latent_dist)
            description = triplet_description(triplet)
            if description not in encoded:
                encoded[description] = pipe.encode_prompt(
                    prompt=description, prompt_2=None, device=device, max_sequence_length=options.max_sequence_length
                )
            texts.append(encoded[description])
    return latents, texts
