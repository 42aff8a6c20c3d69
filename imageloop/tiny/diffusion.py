"""Tiny random diffusion pipelines: real OmniGen, SDXL (+ an IP-Adapter folder) and FLUX (+ Redux) architectures.

Each builder makes every component from `TINY_SEED` (a few hundred thousand random weights,
tokenizers over in-memory vocabularies) and saves it with `save_pretrained`, in the layout of the
hub repository it stands for; the generator backends then load it with the same `from_pretrained` /
`load_ip_adapter` calls that load the real checkpoint. Two denoising steps at 64x64 px take a
fraction of a second on a CPU. Their pictures are noise.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop.errors import ConfigError
from imageloop.runtime import diffusers_class
from imageloop.tiny import TINY_SEED, seeded, tiny_model_dir

if TYPE_CHECKING:
    import torch

TINY_SIZE = (64, 64)
"""What the tiny backends draw unless asked otherwise (width, height)."""
TINY_STEPS = 2

IP_ADAPTER_WEIGHT = "ip-adapter-plus_tiny.safetensors"
"""The tiny IP-Adapter's weight file, at the top of its folder (the real one is `sdxl_models/...`)."""
IP_ADAPTER_IMAGE_ENCODER = "image_encoder"

# Widths shared by the SDXL UNet and the IP-Adapter built against it.
_SDXL_BLOCKS = (32, 64)
_SDXL_CROSS_ATTENTION = 64  # the two text encoders' hidden sizes (32 + 32), as in SDXL (768 + 1280)
_FLUX_TEXT_WIDTH = 32  # T5 width = FLUX joint attention width = Redux output width
_CLIP_CONTEXT = 256


def _clip_tokenizer() -> Any:
    """CLIP's byte-level BPE over the 256 byte symbols (each also as a word end): any text tokenizes.

    With no merges every character is a token, so the context is longer than CLIP's 77 (a prompt
    that real CLIP reads whole must not be cut here).
    """
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for symbol in bytes_to_unicode().values():  # type: ignore[no-untyped-call]
        vocab[symbol] = len(vocab)
        vocab[symbol + "</w>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=_CLIP_CONTEXT)


def _clip_text_config(vocab_size: int, projection_dim: int = 32) -> Any:
    from transformers import CLIPTextConfig

    # eos_token_id 1 (not the legacy 2) makes the pooled output the first end-of-text token's state.
    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        projection_dim=projection_dim,
        max_position_embeddings=_CLIP_CONTEXT,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )


def _t5_tokenizer() -> Any:
    """A T5 unigram tokenizer over printable ASCII characters (others become `<unk>`)."""
    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


def _llama_tokenizer() -> Any:
    """A Llama BPE tokenizer over printable ASCII characters with byte fallback (OmniGen's kind)."""
    from transformers import LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for symbol in ["▁", *string.ascii_letters, *string.digits, *string.punctuation]:
        vocab[symbol] = len(vocab)
    return LlamaTokenizer(vocab=vocab, merges=[])


def _t5_encoder(vocab_size: int) -> Any:
    """A 2-layer T5 encoder as wide as the tiny FLUX and SD3 transformers' text input."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size, d_model=_FLUX_TEXT_WIDTH, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1,
    )  # fmt: skip
    return T5EncoderModel(config)


def _vae(blocks: int, latent_channels: int = 4, **kwargs: Any) -> Any:
    AutoencoderKL = diffusers_class("AutoencoderKL")

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8,) * blocks,
        down_block_types=("DownEncoderBlock2D",) * blocks,
        up_block_types=("UpDecoderBlock2D",) * blocks,
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=1,
        sample_size=32,
        **kwargs,
    )


def build_omnigen(directory: Path) -> None:
    """Save a tiny OmniGen pipeline: one transformer block of width 16, an 8x VAE, a Llama tokenizer."""
    FlowMatchEulerDiscreteScheduler = diffusers_class("FlowMatchEulerDiscreteScheduler")
    OmniGenPipeline = diffusers_class("OmniGenPipeline")
    OmniGenTransformer2DModel = diffusers_class("OmniGenTransformer2DModel")

    tokenizer = _llama_tokenizer()
    heads = 4
    head_dim = 16 // heads
    # Phi-3's "su" rotary scaling: one factor per rotary frequency (head_dim / 2 of them).
    rope_scaling = {"short_factor": [1.0] * (head_dim // 2), "long_factor": [1.0] * (head_dim // 2)}
    with seeded():
        transformer = OmniGenTransformer2DModel(
            in_channels=4,
            patch_size=2,
            hidden_size=16,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=32,
            num_layers=1,
            pad_token_id=tokenizer.pad_token_id or 0,
            vocab_size=len(tokenizer),
            rope_scaling=rope_scaling,
            pos_embed_max_size=64,
        )
        # OmniGen counts 16 px per image token (8x VAE, 2x2 patches), so its VAE has four blocks.
        vae = _vae(blocks=4)
    pipe = OmniGenPipeline(
        transformer=transformer, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer
    )
    pipe.save_pretrained(directory)


def _sdxl_unet() -> Any:
    UNet2DConditionModel = diffusers_class("UNet2DConditionModel")

    return UNet2DConditionModel(
        block_out_channels=_SDXL_BLOCKS,
        layers_per_block=1,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=6 * 8 + 32,  # six size/crop ids + text_encoder_2's projection
        cross_attention_dim=_SDXL_CROSS_ATTENTION,
        norm_num_groups=1,
    )


def build_sdxl(directory: Path) -> None:
    """Save a tiny Stable Diffusion XL pipeline (two CLIP text encoders, a text-time UNet, a 2x VAE)."""
    EulerDiscreteScheduler = diffusers_class("EulerDiscreteScheduler")
    StableDiffusionXLPipeline = diffusers_class("StableDiffusionXLPipeline")
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    with seeded():
        unet = _sdxl_unet()
        vae = _vae(blocks=2)
        text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer)))
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    pipe.save_pretrained(directory)


def _ip_adapter_state_dict(generator: torch.Generator) -> dict[str, torch.Tensor]:
    """An IP-Adapter *plus* checkpoint in the original file layout (Resampler + per-layer k/v projections)."""
    import torch

    def weight(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    image_width = 32  # the tiny image encoder's hidden size (ViT-H: 1280)
    width, queries, ff = 64, 4, 4 * 64  # one 64-wide head, as diffusers reads heads as width // 64
    state: dict[str, torch.Tensor] = {
        "image_proj.latents": weight(1, queries, width),
        "image_proj.proj_in.weight": weight(width, image_width),
        "image_proj.proj_in.bias": torch.zeros(width),
        "image_proj.proj_out.weight": weight(_SDXL_CROSS_ATTENTION, width),
        "image_proj.proj_out.bias": torch.zeros(_SDXL_CROSS_ATTENTION),
        "image_proj.norm_out.weight": torch.ones(_SDXL_CROSS_ATTENTION),
        "image_proj.norm_out.bias": torch.zeros(_SDXL_CROSS_ATTENTION),
    }
    for layer in range(4):  # diffusers builds the Resampler four layers deep, like the real one
        prefix = f"image_proj.layers.{layer}"
        for norm in ("norm1", "norm2"):
            state[f"{prefix}.0.{norm}.weight"] = torch.ones(width)
            state[f"{prefix}.0.{norm}.bias"] = torch.zeros(width)
        state[f"{prefix}.0.to_q.weight"] = weight(width, width)
        state[f"{prefix}.0.to_kv.weight"] = weight(2 * width, width)
        state[f"{prefix}.0.to_out.weight"] = weight(width, width)
        state[f"{prefix}.1.0.weight"] = torch.ones(width)
        state[f"{prefix}.1.0.bias"] = torch.zeros(width)
        state[f"{prefix}.1.1.weight"] = weight(ff, width)
        state[f"{prefix}.1.3.weight"] = weight(width, ff)
    # One k/v pair per cross-attention layer, numbered 1, 3, 5... over the UNet's attention layers.
    unet = _sdxl_unet()
    key_id = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        if name.startswith("mid_block"):
            hidden = _SDXL_BLOCKS[-1]
        elif name.startswith("up_blocks"):
            hidden = _SDXL_BLOCKS[::-1][int(name.split(".")[1])]
        else:
            hidden = _SDXL_BLOCKS[int(name.split(".")[1])]
        state[f"ip_adapter.{key_id}.to_k_ip.weight"] = weight(hidden, _SDXL_CROSS_ATTENTION)
        state[f"ip_adapter.{key_id}.to_v_ip.weight"] = weight(hidden, _SDXL_CROSS_ATTENTION)
        key_id += 2
    return state


def build_ip_adapter(directory: Path) -> None:
    """Save a tiny IP-Adapter plus folder for the tiny SDXL: the weight file and its CLIP image encoder."""
    import torch
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    with seeded():
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
                projection_dim=32,
            )
        )
        state = _ip_adapter_state_dict(torch.Generator().manual_seed(TINY_SEED))
    encoder.save_pretrained(directory / IP_ADAPTER_IMAGE_ENCODER)
    save_file(state, str(directory / IP_ADAPTER_WEIGHT))


def build_flux(directory: Path) -> None:
    """Save a tiny FLUX.1 pipeline: one double and one single block, CLIP + T5 text encoders, a 1-block VAE."""
    FlowMatchEulerDiscreteScheduler = diffusers_class("FlowMatchEulerDiscreteScheduler")
    FluxPipeline = diffusers_class("FluxPipeline")
    FluxTransformer2DModel = diffusers_class("FluxTransformer2DModel")
    from transformers import CLIPTextModel

    tokenizer = _clip_tokenizer()
    tokenizer_2 = _t5_tokenizer()
    with seeded():
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_FLUX_TEXT_WIDTH,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
            guidance_embeds=True,
        )
        text_encoder = CLIPTextModel(_clip_text_config(len(tokenizer)))
        text_encoder_2 = _t5_encoder(len(tokenizer_2))
        vae = _vae(blocks=1, latent_channels=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)


def build_sd3(directory: Path) -> None:
    """Save a tiny Stable Diffusion 3 pipeline: one joint block, two projecting CLIP encoders, T5, a 1-block VAE."""
    FlowMatchEulerDiscreteScheduler = diffusers_class("FlowMatchEulerDiscreteScheduler")
    SD3Transformer2DModel = diffusers_class("SD3Transformer2DModel")
    StableDiffusion3Pipeline = diffusers_class("StableDiffusion3Pipeline")
    from transformers import CLIPTextModelWithProjection

    tokenizer = _clip_tokenizer()
    tokenizer_3 = _t5_tokenizer()
    with seeded():
        transformer = SD3Transformer2DModel(
            sample_size=32,
            patch_size=1,
            in_channels=4,
            num_layers=1,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=_FLUX_TEXT_WIDTH,  # the T5 width; the CLIP states are cut to it, as SD3 does
            pooled_projection_dim=64,  # the two CLIP projections, concatenated
            out_channels=4,
        )
        text_encoder = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer)))
        text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config(len(tokenizer)))
        text_encoder_3 = _t5_encoder(len(tokenizer_3))
        vae = _vae(blocks=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
        transformer=transformer,
    )
    pipe.save_pretrained(directory)


def build_flux_redux(directory: Path) -> None:
    """Save a tiny FLUX.1 Redux prior (SigLIP image encoder + Redux embedder) for the tiny FLUX."""
    FluxPriorReduxPipeline = diffusers_class("FluxPriorReduxPipeline")
    from diffusers.pipelines.flux.modeling_flux import ReduxImageEncoder
    from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

    with seeded():
        image_encoder = SiglipVisionModel(
            SiglipVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                num_hidden_layers=1,
                num_attention_heads=4,
                image_size=32,
                patch_size=8,
            )
        )
        image_embedder = ReduxImageEncoder(redux_dim=32, txt_in_features=_FLUX_TEXT_WIDTH)
    prior = FluxPriorReduxPipeline(
        image_encoder=image_encoder,
        feature_extractor=SiglipImageProcessor(size={"height": 32, "width": 32}),
        image_embedder=image_embedder,
    )
    prior.save_pretrained(directory)


TINY_GENERATOR_MODELS: dict[str, Callable[[Path], None]] = {
    "omnigen": build_omnigen,
    "sdxl": build_sdxl,
    "ip-adapter": build_ip_adapter,
    "flux": build_flux,
    "flux-redux": build_flux_redux,
    "sd3": build_sd3,
}


def tiny_generator_dir(name: str) -> Path:
    """The directory of tiny diffusion model `name` (see TINY_GENERATOR_MODELS), built on first use."""
    build = TINY_GENERATOR_MODELS.get(name)
    if build is None:
        raise ConfigError(f"unknown tiny diffusion model {name!r}; known: {', '.join(TINY_GENERATOR_MODELS)}")
    return tiny_model_dir(f"gen-{name}", build)
