"""Training speed and memory: the CIR models (combiner, clip4cir, sprc) and CIR-LoRA (one LoRA vs a mixture of
experts, and what checkpointing every step costs), short runs.

--size tiny (CPU is fine): `train_cir` on tiny:clip features of a toy triplet set (the combiner), on
tiny:clip itself (clip4cir: CLIP's two encoders fine-tuned, then the Combiner) and on a tiny BLIP-2
(sprc), and `train_cir_lora` on the tiny FLUX pipeline, end to end through the public functions; steps/s
counts the optimisation loop only (frozen features, latents and text embeddings are computed before it).
--size real (CUDA only): the real-size architectures with random weights: `train_cir` on open_clip
ViT-L-14 features (768-d, CLIP4CIR widths), and CIR-LoRA steps on the FLUX.1-dev transformer (bf16,
a 1024x512 diptych, 512 T5 tokens) through the same `LoRAMixture` and `flow_matching_loss` that
`train_cir_lora` runs. Without CUDA it builds both on the meta device, prints their sizes and says
that timing needs CUDA (exit status 2).
Side by side: the mixture of `--experts` LoRA experts vs one LoRA, as a steps/s ratio; runs are repeated
interleaved (a shared machine's slow spells hit every variant alike) and medians reported.
Peak memory: CUDA's peak allocation per phase, or on the CPU the process's peak resident set so far.

    python bench/training.py [--size tiny|real] [--steps 200] [--model-steps 20] [--lora-steps 30] [--experts 4]
                             [--rank 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imageloop.tools.embedders.local import OpenClipEmbedder
from imageloop.training.cir import train_cir
from imageloop.training.cir_lora import FlowSchedule, LoRAMixture, flow_matching_loss, train_cir_lora
from imageloop.training.combiner import Combiner, CombinerConfig
from imageloop.training.options import CIRLoRAOptions, CIRTrainingOptions
from tests.tiny_blip2 import build_tiny_blip2
from tests.triplet_folders import all_combos, colour_triplets, write_dataset, write_jsonl

# FLUX.1-dev's transformer and scheduler (black-forest-labs/FLUX.1-dev, transformer/ and scheduler/ configs).
FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_DEV_SCHEDULER = {"shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15}
REAL_CLIP = ("ViT-L-14", 768)


def peak_memory_mib(device: str) -> float:
    """CUDA's peak allocation since the last reset, else the process's peak RSS so far."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


Run = Callable[[int], float]
"""One timed run: given the repeat's number (for a fresh output folder), it returns steps/s."""


def measure(device: str, runs: dict[str, Run], steps: dict[str, int], repeats: int) -> list[dict[str, Any]]:
    """Time every run `repeats` times, interleaved (a shared machine's slow spells hit all alike); report medians."""
    rates: dict[str, list[float]] = {name: [] for name in runs}
    peaks: dict[str, float] = dict.fromkeys(runs, 0.0)
    for repeat in range(repeats):
        for name, run in runs.items():
            if device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            rates[name].append(run(repeat))
            peaks[name] = max(peaks[name], peak_memory_mib(device))
            if device.startswith("cuda"):
                torch.cuda.empty_cache()  # the run's models are gone with its frame; hand their memory back
    rows = []
    for name in runs:
        rate = statistics.median(rates[name])
        rows.append(
            {"phase": name, "steps": steps[name], "steps_per_s": round(rate, 2), "peak_mib": round(peaks[name])}
        )
        print(
            f"{name:34s} {rate:9.2f} steps/s   peak {peaks[name]:8.0f} MiB   ({steps[name]} steps, median of {repeats})"
        )
    return rows


def toy_data(root: Path, side: int) -> tuple[Path, Path]:
    """The colour-and-pattern toy world: all synthetic triplets, and four 'real' ones as a JSONL file."""
    combos = all_combos()
    random.Random(0).shuffle(combos)
    synthetic = write_dataset(root / "synthetic", combos, size=side)
    real = write_jsonl(root / "real" / "real.jsonl", colour_triplets(root / "real", combos[:4], size=side))
    return synthetic, real


def tiny(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    from imageloop.tiny.clip import tiny_clip_dir
    from imageloop.tiny.diffusion import tiny_generator_dir

    synthetic, real = toy_data(root, 32)
    embedder = OpenClipEmbedder(f"local-dir:{tiny_clip_dir()}", None, model_id="tiny:clip", device="cpu")
    flux = str(tiny_generator_dir("flux"))
    options = CIRTrainingOptions(batch_size=32, checkpoint_every=10_000, steps=args.steps)

    def cir(repeat: int) -> float:
        out = root / f"cir-{repeat}"
        return train_cir(synthetic, out, embedder=embedder, options=options, device="cpu").steps_per_second

    def lora(experts: int, steps: int) -> Run:
        def run(repeat: int) -> float:
            lora_options = CIRLoRAOptions(
                rank=args.rank, experts=experts, resolution=16, max_sequence_length=64, base_model=flux, steps=steps
            )
            out = root / f"lora-{experts}-{repeat}"
            return train_cir_lora(real, out, options=lora_options, device="cpu").steps_per_second

        return run

    def fine_tuned(model: str, base: str) -> Run:
        def run(repeat: int) -> float:
            tuned = CIRTrainingOptions(
                model=model, base_model=base, batch_size=16, steps=args.model_steps, checkpoint_every=10_000
            )
            return train_cir(
                synthetic, root / f"{model}-{repeat}", embedder=None, options=tuned, device="cpu"
            ).steps_per_second

        return run

    def checkpointed(repeat: int) -> float:
        lora_options = CIRLoRAOptions(
            rank=args.rank, resolution=16, max_sequence_length=64, base_model=flux, steps=args.lora_steps,
            checkpoint_every=1,
        )  # fmt: skip
        return train_cir_lora(real, root / f"lora-ckpt-{repeat}", options=lora_options, device="cpu").steps_per_second

    lora(1, 3)(-1)  # warm-up, untimed: the first backward passes pay for lazy initialisation in torch
    blip2 = str(build_tiny_blip2(root / "tiny-blip2"))
    names = (
        "cir combiner (tiny:clip)", "cir-lora, 1 expert", f"cir-lora, {args.experts} experts",
        "cir clip4cir (tiny:clip, 2 parts)", "cir sprc (tiny BLIP-2)", "cir-lora, 1 expert, ckpt every step",
    )  # fmt: skip
    chosen = (
        cir, lora(1, args.lora_steps), lora(args.experts, args.lora_steps), fine_tuned("clip4cir", "tiny:clip"),
        fine_tuned("sprc", blip2), checkpointed,
    )  # fmt: skip
    counts = (args.steps, args.lora_steps, args.lora_steps, 2 * args.model_steps, args.model_steps, args.lora_steps)
    return measure("cpu", dict(zip(names, chosen, strict=True)), dict(zip(names, counts, strict=True)), args.repeats)


def real_flux_transformer(device: str | torch.device) -> Any:
    from diffusers import FluxTransformer2DModel

    with torch.device(device):
        return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER).to(torch.bfloat16).requires_grad_(False)


def lora_steps(args: argparse.Namespace, experts: int) -> float:
    """CIR-LoRA steps/s on the FLUX.1-dev transformer (random weights): a 1024x512 diptych, 512 text tokens."""
    transformer = real_flux_transformer("cuda")
    mixture = LoRAMixture(transformer, pooled_dim=768, rank=args.rank, alpha=args.rank, experts=experts).cuda()
    optimizer = torch.optim.AdamW(mixture.trainable_parameters(), lr=1e-4)
    schedule = FlowSchedule.of({"num_train_timesteps": 1000, **FLUX_DEV_SCHEDULER})
    # 1024x512 pixels -> 16-channel latents at 1/8 -> 64x128, packed into 32x64 patches of 64 channels.
    latents = torch.randn(1, 16, 64, 128, device="cuda", dtype=torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16)
    text_ids = torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16)

    def step() -> None:
        mixture.route(pooled)
        loss = flow_matching_loss(transformer, latents, prompt, pooled, text_ids, schedule)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    step()  # warm-up: kernels, allocator
    torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(args.lora_steps):
        step()
    torch.cuda.synchronize()
    return args.lora_steps / (time.perf_counter() - started)


def real(args: argparse.Namespace, root: Path) -> list[dict[str, Any]]:
    synthetic, _ = toy_data(root, 224)
    embedder = OpenClipEmbedder(REAL_CLIP[0], None, model_id=f"bench:{REAL_CLIP[0]}-random", device="cuda")
    options = CIRTrainingOptions(batch_size=64, checkpoint_every=10_000, steps=args.steps)

    def cir(repeat: int) -> float:
        out = root / f"cir-{repeat}"
        return train_cir(synthetic, out, embedder=embedder, options=options, device="cuda").steps_per_second

    names = (
        f"cir combiner ({REAL_CLIP[0]})",
        "cir-lora FLUX.1-dev, 1 expert",
        f"cir-lora FLUX.1-dev, {args.experts} experts",
    )
    runs: dict[str, Run] = {
        names[0]: cir,
        names[1]: lambda repeat: lora_steps(args, 1),
        names[2]: lambda repeat: lora_steps(args, args.experts),
    }
    steps = dict(zip(names, (args.steps, args.lora_steps, args.lora_steps), strict=True))
    return measure("cuda", runs, steps, args.repeats)


def describe_real_without_cuda(args: argparse.Namespace) -> None:
    """Build the real-size models on the meta device (no memory) and say what they are."""
    combiner = Combiner(CombinerConfig.for_features(REAL_CLIP[1])).to("meta")
    transformer = real_flux_transformer("meta")
    mixture = LoRAMixture(transformer, pooled_dim=768, rank=args.rank, alpha=args.rank, experts=args.experts)
    lora = sum(p.numel() for p in mixture.trainable_parameters())
    frozen = sum(p.numel() for p in transformer.parameters()) - lora
    print(
        f"cir combiner for {REAL_CLIP[0]} ({REAL_CLIP[1]}-d): {sum(p.numel() for p in combiner.parameters()):,} params"
    )
    print(
        f"FLUX.1-dev transformer: {frozen:,} frozen params; {len(mixture.names)} adapted projections, "
        f"{args.experts} experts of rank {args.rank}: {lora:,} trainable"
    )
    print("--size real times training on a CUDA GPU; none is available here, so nothing was timed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=("tiny", "real"), default="tiny")
    parser.add_argument("--steps", type=int, default=200, help="combiner training steps")
    parser.add_argument("--model-steps", type=int, default=20, help="clip4cir and sprc steps per part (tiny)")
    parser.add_argument("--lora-steps", type=int, default=30, help="CIR-LoRA training steps per variant")
    parser.add_argument("--experts", type=int, default=4, help="experts in the mixture variant")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    args = parser.parse_args()

    if args.size == "real" and not torch.cuda.is_available():
        describe_real_without_cuda(args)
        sys.exit(2)
    with tempfile.TemporaryDirectory() as tmp:
        rows = (tiny if args.size == "tiny" else real)(args, Path(tmp))
    ratio = rows[2]["steps_per_s"] / rows[1]["steps_per_s"]
    print(f"ratio {args.experts} experts / 1 expert: {ratio:.3f} (the mixture's cost per step)")
    figures: dict[str, Any] = {"benchmark": "training", "size": args.size, "phases": rows, "moe_ratio": round(ratio, 3)}
    if len(rows) > 5:
        figures["checkpoint_every_step_ratio"] = round(rows[5]["steps_per_s"] / rows[1]["steps_per_s"], 3)
        print(f"ratio checkpoint every step / once at the end: {figures['checkpoint_every_step_ratio']:.3f}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
