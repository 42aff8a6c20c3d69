"""Tiny random vision-language models: real Qwen2-VL and SmolVLM architectures with processors and chat templates.

Each is a few hundred thousand random weights over a byte-level vocabulary (every UTF-8 text
tokenizes, every answer decodes), with a chat template written in the family's own turn format and
an image processor that keeps pictures to a handful of image tokens. They are saved with
`save_pretrained` and load through `AutoProcessor` / `AutoModelForImageTextToText` exactly like a hub
checkpoint; their answers are noise.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from imageloop.errors import ConfigError
from imageloop.tiny import seeded, tiny_model_dir

QWEN2_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen2-VL's turn format: `<|im_start|>role ... <|im_end|>`, one vision span per image."""

SMOLVLM_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}: "
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<image>{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
"""SmolVLM's turn format: `Role: ...<end_of_utterance>`, one `<image>` per image (expanded by the processor)."""

QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
SMOLVLM_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    # The processor names these when it splits large images into tiles; tiny never splits, but its
    # tokenizer must still know them.
    *(f"<row_{row}_col_{col}>" for row in range(1, 7) for col in range(1, 7)),
)


def _byte_level_vocab(special_tokens: tuple[str, ...]) -> dict[str, int]:
    """The 256 byte-level symbols then the special tokens: any text encodes, any id sequence decodes."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    vocab = {symbol: i for i, symbol in enumerate(bytes_to_unicode().values())}  # type: ignore[no-untyped-call]
    for token in special_tokens:
        vocab[token] = len(vocab)
    return vocab


def build_qwen2_vl(directory: Path) -> None:
    """Save a tiny random Qwen2-VL (2 text and 2 vision layers, width 32) with its processor."""
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )
    from transformers.models.qwen2.tokenization_qwen2 import Qwen2Tokenizer

    vocab = _byte_level_vocab(QWEN2_VL_SPECIAL_TOKENS)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN2_VL_SPECIAL_TOKENS[1:]),
    )
    # 28 px per merged patch: a picture becomes 1 to 4 image tokens.
    image_processor = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=56 * 56)
    processor = Qwen2VLProcessor(  # type: ignore[no-untyped-call]
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # Multimodal rotary sections (time, height, width) must sum to head_dim / 2 = 4.
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
            "bos_token_id": None,
            "eos_token_id": vocab["<|im_end|>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": 32,
            "num_heads": 4,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=vocab["<|image_pad|>"],
        video_token_id=vocab["<|video_pad|>"],
        vision_start_token_id=vocab["<|vision_start|>"],
        vision_end_token_id=vocab["<|vision_end|>"],
    )
    with seeded():
        model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


def build_smolvlm(directory: Path) -> None:
    """Save a tiny random SmolVLM (2 text and 2 vision layers, width 32, 32 px images) with its processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import (
        SmolVLMConfig,
        SmolVLMForConditionalGeneration,
        SmolVLMImageProcessor,
        SmolVLMProcessor,
        SmolVLMVideoProcessor,
    )
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    vocab = _byte_level_vocab(SMOLVLM_SPECIAL_TOKENS)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = TokenizersBackend(  # type: ignore[no-untyped-call]
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<image>",
            "fake_image_token": "<fake_token_around_image>",
            "global_image_token": "<global-img>",
            "end_of_utterance_token": "<end_of_utterance>",
        },
    )
    tokenizer.add_tokens([AddedToken(token, special=True) for token in SMOLVLM_SPECIAL_TOKENS])
    image_size, patch_size, scale_factor = 32, 8, 2
    image_processor = SmolVLMImageProcessor(
        do_image_splitting=False, size={"longest_edge": image_size}, max_image_size={"longest_edge": image_size}
    )
    processor = SmolVLMProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(),
        image_seq_len=(image_size // patch_size) ** 2 // scale_factor**2,
        chat_template=SMOLVLM_CHAT_TEMPLATE,
    )
    config = SmolVLMConfig(
        text_config={
            "model_type": "llama",
            "vocab_size": len(vocab),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "bos_token_id": vocab["<|im_start|>"],
            "eos_token_id": vocab["<end_of_utterance>"],
            "pad_token_id": vocab["<|endoftext|>"],
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": image_size,
            "patch_size": patch_size,
        },
        scale_factor=scale_factor,
        image_token_id=vocab["<image>"],
    )
    with seeded():
        model = SmolVLMForConditionalGeneration(config)
    model.generation_config.pad_token_id = vocab["<|endoftext|>"]
    model.save_pretrained(directory)
    processor.save_pretrained(directory)


TINY_VLMS: dict[str, Callable[[Path], None]] = {"qwen2-vl": build_qwen2_vl, "smolvlm": build_smolvlm}


def tiny_vlm_dir(name: str) -> Path:
    """The directory of tiny VLM `name` (`qwen2-vl`, `smolvlm`), built on first use."""
    build = TINY_VLMS.get(name)
    if build is None:
        raise ConfigError(f"unknown tiny VLM {name!r}; known: {', '.join(f'tiny:{n}' for n in TINY_VLMS)}")
    return tiny_model_dir(f"vlm-{name}", build)
