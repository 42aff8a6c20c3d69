"""Evaluation throughput: the same evaluation at concurrency 1 and at concurrency N, side by side in one run.

Both run through the application layer, as the command line and the servers do: GenIR is
`App.eval_genir(..., concurrency=N)` (N targets searched at once), ImageRAG is N `App.generate` runs at
once (as N jobs of the MCP server). The application hands out its backends as process-wide
micro-batchers (`BatchingGenerator`, `BatchingVisionLanguageModel`, `BatchingEmbedder`), so concurrent
model calls share batched calls on the device. Printed: targets/s at 1 and at N, their ratio, the
device busy fraction (time inside the device lock / wall time), and how many model calls the batchers
made. Goal: concurrency N no slower than 1 on a CPU, and a busy device with a ratio well above 1 on a
GPU.

- `--size small`: the tiny random models (Qwen2-VL, OmniGen or SDXL + IP-Adapter, CLIP), on the CPU
  unless `--device` says otherwise. Their answers are noise, so every GenIR target ends after its
  first round (the simulated user gives nothing usable), and ImageRAG falls back to the raw prompt.
- `--size real`: real-size architectures with random weights, built on the device and saved once
  under `--cache` (nothing is downloaded): OmniGen-v1 (3.8B) or SDXL's UNet and text encoders as the
  generator, a Qwen2-VL-2B-sized VLM, open_clip ViT-B-32. For a GPU; there it also prints the peak
  GPU memory of one generator and one VLM batch per batch size. `--dry-run` only builds the
  real-size models on the meta device and prints their sizes (works anywhere).

    python bench/throughput.py [--workload genir|imagerag] [--targets 16] [--concurrency 8]
                               [--size small|real] [--generator omnigen|sdxl] [--device cuda]
                               [--dtype bfloat16] [--steps 10] [--image-size 512] [--new-tokens 64]
                               [--repeats 1] [--cache DIR] [--dry-run]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import imageloop.backends as backends
from imageloop.app import App
from imageloop.config import Settings
from imageloop.protocols import ChatCall, Embedder, GenerationRequest, ImageGenerator, VisionLanguageModel
from imageloop.runtime import device_lock, pick_device

SUBJECTS = ["blue jay", "red fox", "old lighthouse", "bowl of ramen", "vintage bicycle", "snow leopard", "glass teapot",
            "sailing boat", "paper lantern", "wooden chair", "hot-air balloon", "sunflower field"]  # fmt: skip
SETTINGS = ["at dawn", "on a snowy branch", "in the rain", "under neon lights", "in a watercolour style",
            "seen from above, in soft morning light", "on a kitchen table"]  # fmt: skip


@dataclass
class Models:
    """The three backends an evaluation uses, and what they are."""

    vlm: VisionLanguageModel
    generator: ImageGenerator
    embedder: Embedder
    description: str


@dataclass
class CallCounter:
    """Wraps a batched method (generate_batch, chat_batch): how many calls, how many requests, how long."""

    method: Callable[[Sequence[Any]], list[Any]]
    calls: int = 0
    requests: int = 0
    seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, batch: Sequence[Any]) -> list[Any]:
        started = time.perf_counter()
        try:
            return self.method(batch)
        finally:
            with self.lock:
                self.calls += 1
                self.requests += len(batch)
                self.seconds += time.perf_counter() - started

    def take(self) -> str:
        """'R requests in C calls, S s' since the last take, then start counting anew."""
        with self.lock:
            text = f"{self.requests} requests in {self.calls} calls, {self.seconds:.1f} s"
            self.calls = self.requests = 0
            self.seconds = 0.0
        return text


# --- models ------------------------------------------------------------------------------------------------


def small_models(generator: str, device: str | None, dtype: str | None) -> Models:
    """The tiny random models, through the production `tiny:` factories."""
    from imageloop.agents.vlms.transformers_local import tiny_transformers_vlm
    from imageloop.tools.embedders.local import tiny_clip_embedder
    from imageloop.tools.generators import tiny_generator

    name = "omnigen" if generator == "omnigen" else "sdxl-ip-adapter"
    return Models(
        tiny_transformers_vlm("qwen2-vl", device, dtype),
        tiny_generator(name, device, dtype),
        tiny_clip_embedder(device, dtype),
        f"tiny:qwen2-vl, tiny:{name}, tiny:clip",
    )


@contextmanager
def building_on(device: str, dtype: Any) -> Iterator[None]:
    """Modules made inside are created on `device` in `dtype` (random weights, no CPU copy first)."""
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(previous)


SDXL_VAE = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 2, "sample_size": 1024, "scaling_factor": 0.13025,
}  # fmt: skip
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280), "transformer_layers_per_block": (1, 2, 10),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "use_linear_projection": True,
    "addition_embed_type": "text_time", "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}  # fmt: skip
QWEN2_VL_2B_TEXT = {
    "vocab_size": 151936, "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
    "num_attention_heads": 12, "num_key_value_heads": 2, "max_position_embeddings": 32768,
    "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
}  # fmt: skip
QWEN2_VL_2B_VISION = {
    "depth": 32, "embed_dim": 1280, "hidden_size": 1536, "num_heads": 16, "mlp_ratio": 4, "patch_size": 14,
    "spatial_merge_size": 2, "temporal_patch_size": 2,
}  # fmt: skip


OMNIGEN_V1: dict[str, Any] = {}
"""OmniGen-v1's transformer sizes: diffusers' defaults are the released model's."""


def omnigen_v1_components(device: str, dtype: Any) -> dict[str, Any]:
    """OmniGen-v1's transformer (3.8B) and SDXL's VAE, random; the tiny tokenizer."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, OmniGenTransformer2DModel
    from transformers import AutoTokenizer

    from imageloop.tiny.diffusion import tiny_generator_dir

    sizes = {"hidden_size": 3072, "num_attention_heads": 32, **OMNIGEN_V1}
    head_dim = sizes["hidden_size"] // sizes["num_attention_heads"]
    # Phi-3's rotary scaling has one factor per rotary frequency; random weights make their values moot.
    rope_scaling = {"short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2)}
    with building_on(device, dtype):
        transformer = OmniGenTransformer2DModel(rope_scaling=rope_scaling, **sizes)
        vae = AutoencoderKL(**SDXL_VAE)
    tokenizer = AutoTokenizer.from_pretrained(tiny_generator_dir("omnigen") / "tokenizer")
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "tokenizer": tokenizer,
    }


def sdxl_components(device: str, dtype: Any) -> dict[str, Any]:
    """SDXL base's UNet (2.6B), VAE and two CLIP text encoders, random; the tiny tokenizer at CLIP's 77 tokens."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from imageloop.tiny.diffusion import tiny_generator_dir

    tokenizer = CLIPTokenizer.from_pretrained(tiny_generator_dir("sdxl") / "tokenizer", model_max_length=77)
    # The tiny byte-level tokenizer's ids: end-of-text is 1, so pooling reads the first 1.
    ids: dict[str, Any] = {
        "vocab_size": 49408,
        "max_position_embeddings": 77,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    }
    clip_l = CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                            hidden_act="quick_gelu", **ids)  # fmt: skip
    clip_g = CLIPTextConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                            hidden_act="gelu", projection_dim=1280, **ids)  # fmt: skip
    with building_on(device, dtype):
        text_encoder = CLIPTextModel(clip_l)
        text_encoder_2 = CLIPTextModelWithProjection(clip_g)
        unet = UNet2DConditionModel(**SDXL_UNET)
        vae = AutoencoderKL(**SDXL_VAE)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       steps_offset=1, timestep_spacing="leading")  # fmt: skip
    return {"vae": vae, "text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "tokenizer": tokenizer,
            "tokenizer_2": tokenizer, "unet": unet, "scheduler": scheduler}  # fmt: skip


def qwen2_vl_2b(device: str, dtype: Any) -> tuple[Any, Any]:
    """A Qwen2-VL-2B-sized model (random) and the tiny processor with Qwen2-VL's own image sizes."""
    from transformers import AutoProcessor, Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

    from imageloop.tiny.vlm import tiny_vlm_dir

    processor = AutoProcessor.from_pretrained(tiny_vlm_dir("qwen2-vl"))  # type: ignore[no-untyped-call]
    processor.image_processor = Qwen2VLImageProcessor()
    token = processor.tokenizer.convert_tokens_to_ids
    text = {**QWEN2_VL_2B_TEXT, "eos_token_id": token("<|im_end|>"), "pad_token_id": token("<|endoftext|>")}
    config = Qwen2VLConfig(
        text_config=text,
        vision_config=QWEN2_VL_2B_VISION,
        image_token_id=token("<|image_pad|>"),
        video_token_id=token("<|video_pad|>"),
        vision_start_token_id=token("<|vision_start|>"),
        vision_end_token_id=token("<|vision_end|>"),
        tie_word_embeddings=True,  # as Qwen2-VL-2B: the output head reuses the input embeddings
    )
    with building_on(device, dtype):
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = text["pad_token_id"]
    return model, processor


def parameters(*modules: Any) -> float:
    """Billions of parameters in `modules` (those that have any)."""
    count: int = sum(p.numel() for m in modules if hasattr(m, "parameters") for p in m.parameters())
    return count / 1e9


def dry_run() -> None:
    """Build every real-size model on the meta device (no memory) and print its size."""
    import open_clip
    import torch

    omnigen = omnigen_v1_components("meta", torch.float32)
    sdxl = sdxl_components("meta", torch.float32)
    vlm, _ = qwen2_vl_2b("meta", torch.float32)
    with torch.device("meta"):
        clip = open_clip.create_model("ViT-B-32", device="meta")
    print(f"OmniGen-v1 transformer {parameters(omnigen['transformer']):.2f}B, VAE {parameters(omnigen['vae']):.3f}B")
    print(f"SDXL UNet {parameters(sdxl['unet']):.2f}B, text encoders "
          f"{parameters(sdxl['text_encoder'], sdxl['text_encoder_2']):.2f}B")  # fmt: skip
    print(f"Qwen2-VL-2B-sized VLM {parameters(vlm):.2f}B; open_clip ViT-B-32 {parameters(clip):.3f}B")


def real_models(args: argparse.Namespace, device: str) -> Models:
    """Real-size random models: built on `device`, saved under `--cache` once, loaded by the production backends."""
    import torch
    from diffusers import OmniGenPipeline, StableDiffusionXLPipeline

    from imageloop.agents.vlms.transformers_local import TransformersVisionLanguageModel
    from imageloop.runtime import pick_dtype
    from imageloop.tools.embedders.local import OpenClipEmbedder
    from imageloop.tools.generators.omnigen import OmniGenGenerator
    from imageloop.tools.generators.text2image import Text2ImageGenerator

    dtype = pick_dtype(device, args.dtype)
    cache = Path(args.cache)
    size = (args.image_size, args.image_size)
    generator_dir = cache / f"{args.generator}-{str(dtype).removeprefix('torch.')}"
    if not (generator_dir / "model_index.json").exists():
        if args.generator == "omnigen":
            OmniGenPipeline(**omnigen_v1_components(device, dtype)).save_pretrained(generator_dir)
        else:
            StableDiffusionXLPipeline(**sdxl_components(device, dtype)).save_pretrained(generator_dir)
        torch.cuda.empty_cache() if device.startswith("cuda") else None
    vlm_dir = cache / f"qwen2-vl-2b-{str(dtype).removeprefix('torch.')}"
    if not (vlm_dir / "config.json").exists():
        model, processor = qwen2_vl_2b(device, dtype)
        model.save_pretrained(vlm_dir)
        processor.save_pretrained(vlm_dir)
        del model
    placement = {"device": device, "dtype": args.dtype}
    generator: ImageGenerator
    if args.generator == "omnigen":
        generator = OmniGenGenerator(str(generator_dir), steps=args.steps, size=size, **placement)
    else:
        generator = Text2ImageGenerator(str(generator_dir), steps=args.steps, size=size, **placement)
    vlm = TransformersVisionLanguageModel(str(vlm_dir), max_new_tokens=args.new_tokens, **placement)
    embedder = OpenClipEmbedder("ViT-B-32", None, model_id="bench:ViT-B-32", **placement)
    name = "OmniGen-v1" if args.generator == "omnigen" else "SDXL"
    return Models(vlm, generator, embedder, f"real-size random: Qwen2-VL-2B, {name} ({size[0]} px, {args.steps} "
                                            f"steps), ViT-B-32, {str(dtype).removeprefix('torch.')}")  # fmt: skip


def memory_profile(models: Models, picture: Path, batch_sizes: Sequence[int] = (1, 2, 4, 8)) -> None:
    """Peak GPU memory and seconds per item of one generator batch and one VLM batch, per batch size."""
    import torch

    from imageloop.protocols import BatchImageGenerator, BatchVisionLanguageModel, Message

    generator, vlm = models.generator, models.vlm
    assert isinstance(generator, BatchImageGenerator) and isinstance(vlm, BatchVisionLanguageModel)
    for size in batch_sizes:
        # One prompt, many seeds: requests of one kind (OmniGen batches only prompts of one token length).
        requests = [GenerationRequest(prompt_for(0), seed=i) for i in range(size)]
        calls = [ChatCall([Message("user", f"Describe picture {i}.", (picture,))]) for i in range(size)]
        runs: list[tuple[str, Callable[[], Any]]] = [
            ("generator", partial(generator.generate_batch, requests)),
            ("vlm", partial(vlm.chat_batch, calls)),
        ]
        for name, run in runs:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            started = time.perf_counter()
            run()
            torch.cuda.synchronize()
            seconds = (time.perf_counter() - started) / size
            peak = torch.cuda.max_memory_allocated() / 2**30
            print(f"memory: {name} batch {size}: peak {peak:.1f} GiB, {seconds:.2f} s per item")


# --- workloads -----------------------------------------------------------------------------------------------


def prompt_for(i: int) -> str:
    """A prompt of varied length, as real ones are (OmniGen batches only prompts of one token length)."""
    return f"a {SUBJECTS[i % len(SUBJECTS)]} {SETTINGS[(i // len(SUBJECTS) + i) % len(SETTINGS)]}"


def write_pictures(folder: Path, count: int, side: int) -> None:
    """`count` distinct pictures: a colour ramp plus noise each."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, side, dtype=np.float32)
    for i in range(count):
        base = np.stack(
            [ramp[None, :].repeat(side, 0), ramp[:, None].repeat(side, 1), np.full((side, side), 17 * i % 256)]
        )
        pixels = np.clip(base + rng.normal(0, 30, (3, side, side)), 0, 255).astype(np.uint8).transpose(1, 2, 0)
        Image.fromarray(pixels).save(folder / f"picture{i:04d}.png")


def bench_app(models: Models) -> App:
    """An application whose models are these (a `bench:` provider for each role), as a face would build it."""
    backends.VLM_PROVIDERS["bench"] = lambda *_: models.vlm
    backends.GENERATOR_PROVIDERS["bench"] = lambda *_: models.generator
    backends.EMBEDDER_PROVIDERS["bench"] = lambda *_: models.embedder
    backends.clear_backends()
    return App(
        Settings.model_validate({"vlm": "bench:vlm", "generator": "bench:generator", "embedder": "bench:embedder"})
    )


def genir(app: App, pictures: Path, count: int, concurrency: int, out: Path) -> float:
    """Seconds for a GenIR evaluation (visual feedback, 3 rounds) of `count` targets at `concurrency`."""
    out.mkdir()
    targets = out / "targets.txt"
    targets.write_text("".join(f"{p}\n" for p in sorted(pictures.glob("*.png"))[:count]))
    knobs = {"feedback": "visual", "rounds": 3, "k": 10, "rank_depth": 100}
    started = time.perf_counter()
    app.eval_genir(pictures, targets, out / "eval", knobs=knobs, concurrency=concurrency)
    return time.perf_counter() - started


def imagerag(app: App, pictures: Path, count: int, concurrency: int, out: Path) -> float:
    """Seconds for ImageRAG over `count` prompts, `concurrency` runs at a time (as the MCP server's jobs)."""

    def run(i: int) -> None:
        app.generate(prompt_for(i), pictures, out_dir=out / f"run{i}", knobs={"seed": i})

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(run, range(count)))
    return time.perf_counter() - started


WORKLOADS = {"genir": genir, "imagerag": imagerag}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="genir")
    parser.add_argument("--targets", type=int, default=16, help="GenIR targets, or ImageRAG prompts")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--size", choices=["small", "real"], default="small")
    parser.add_argument("--generator", choices=["omnigen", "sdxl"], default="omnigen")
    parser.add_argument("--device", default=None, help="cuda, mps or cpu (default: cpu for small, best for real)")
    parser.add_argument("--dtype", default=None, help="float32, float16 or bfloat16 (default per device)")
    parser.add_argument("--steps", type=int, default=10, help="real: denoising steps per picture")
    parser.add_argument("--image-size", type=int, default=512, help="real: picture side in pixels")
    parser.add_argument("--new-tokens", type=int, default=64, help="real: tokens per VLM answer (random weights)")
    parser.add_argument("--repeats", type=int, default=1, help="interleaved runs per side; medians are kept")
    parser.add_argument("--cache", default=str(Path.home() / ".cache" / "imageloop" / "bench-real"))
    parser.add_argument("--dry-run", action="store_true", help="build the real-size models on the meta device only")
    args = parser.parse_args()
    if args.dry_run:
        dry_run()
        return
    if args.size == "small":
        device = args.device or "cpu"
        models = small_models(args.generator, device, args.dtype)
    else:
        device = pick_device(args.device)
        models = real_models(args, device)
    workload = WORKLOADS[args.workload]
    counters = {"generator": CallCounter(models.generator.generate_batch), "vlm": CallCounter(models.vlm.chat_batch)}  # type: ignore[attr-defined]
    models.generator.generate_batch = counters["generator"]  # type: ignore[attr-defined]
    models.vlm.chat_batch = counters["vlm"]  # type: ignore[attr-defined]

    app = bench_app(models)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pictures = root / "pictures"
        pictures.mkdir()
        write_pictures(pictures, args.targets, 64 if args.size == "small" else 256)
        app.index_folder(pictures)
        if device.startswith("cuda"):
            memory_profile(models, next(pictures.glob("*.png")))
        # Warm-up: first calls pay for kernel selection and caches, on both paths.
        workload(app, pictures, 2, 1, root / "warm-1")
        workload(app, pictures, 2, 2, root / "warm-2")
        for counter in counters.values():
            counter.take()
        # Interleaved repeats, medians kept: a machine whose load drifts slows both sides alike.
        rates: dict[int, list[float]] = {1: [], args.concurrency: []}
        busy: dict[int, list[float]] = {1: [], args.concurrency: []}
        for repeat in range(args.repeats):
            for concurrency in (1, args.concurrency):
                before = device_lock.busy_s()
                seconds = workload(app, pictures, args.targets, concurrency, root / f"r{repeat}-c{concurrency}")
                rates[concurrency].append(args.targets / seconds)
                busy[concurrency].append((device_lock.busy_s() - before) / seconds)
                calls = ", ".join(f"{name} {counter.take()}" for name, counter in counters.items())
                print(f"concurrency {concurrency:3d}: {rates[concurrency][-1]:7.2f} targets/s, device busy "
                      f"{busy[concurrency][-1]:.0%} ({calls})")  # fmt: skip
        app.close()
    rate_1, rate_n = statistics.median(rates[1]), statistics.median(rates[args.concurrency])
    busy_n = statistics.median(busy[args.concurrency])
    ratio = rate_n / rate_1
    print(f"{args.workload}, {args.targets} targets, {models.description}, on {device}")
    print(f"median of {args.repeats}: {rate_1:.2f} vs {rate_n:.2f} targets/s; "
          f"ratio concurrency {args.concurrency} / 1: {ratio:.2f}  (goal >= 1)")  # fmt: skip
    print(json.dumps({
        "workload": args.workload, "concurrency": args.concurrency, "device": device,
        "targets_per_s_1": round(rate_1, 3), "targets_per_s_n": round(rate_n, 3),
        "ratio": round(ratio, 3), "busy_fraction": round(busy_n, 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
