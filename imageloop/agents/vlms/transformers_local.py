"""A VisionLanguageModel over a local transformers checkpoint (Qwen2/2.5-VL, SmolVLM, Idefics3, Gemma 3, LLaVA...).

The checkpoint is loaded once per process through `AutoProcessor` and `AutoModelForImageTextToText`,
and every conversation is rendered by the checkpoint's own chat template, so any family whose
processor ships one works unchanged. Decoding is greedy. With a JSON schema the schema is added to
the system turn and the answer is forced to open with `{` (the generation prompt ends with it), which
rules out preambles and code fences but not invalid JSON: `imageloop.agents.structured` validates
and repairs, as for every backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imageloop.errors import ConfigError
from imageloop.prompts import JSON_SCHEMA_NOTE
from imageloop.protocols import GREEDY, Decoding, Message
from imageloop.runtime import (
    device_lock,
    explain_load_failure,
    explain_out_of_memory,
    load_cached,
    pick_device,
    pick_dtype,
)
from imageloop.tools.images import open_image

if TYPE_CHECKING:
    import torch

VLM_MEMORY_KNOBS = "use --dtype bfloat16 or float16, a smaller checkpoint, or --device cpu"
JSON_PREFIX = "{"
"""What a structured answer is forced to start with."""


def _load(model: str, device: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """The processor and the model of checkpoint `model` (hub id or local directory), placed on `device`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor: Any = AutoProcessor.from_pretrained(model)  # type: ignore[no-untyped-call]
        network: Any = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
    except OSError as e:
        raise explain_load_failure(model, e) from None
    except ValueError as e:
        # transformers says ValueError for a checkpoint of another kind (text-only, diffusion...).
        raise ConfigError(
            f"cannot load {model} as an image-text-to-text model: {str(e).splitlines()[0][:300]}"
        ) from None
    if getattr(processor, "chat_template", None) is None:
        raise ConfigError(f"{model} has no chat template: use an instruction-tuned checkpoint whose processor has one")
    try:
        network = network.to(device)
    except RuntimeError as e:
        if "out of memory" in str(e).lower():
            raise explain_out_of_memory(f"loading {model}", VLM_MEMORY_KNOBS) from None
        raise
    return processor, network.eval()


def _with_schema_note(messages: Sequence[Message], json_schema: Mapping[str, Any]) -> list[Message]:
    """`messages` with the schema appended to the system turn (one is added if there is none)."""
    schema = json.dumps(json_schema.get("schema", json_schema), separators=(",", ":"))
    note = JSON_SCHEMA_NOTE.format(schema=schema)
    if messages and messages[0].role == "system":
        first = messages[0]
        return [Message("system", f"{first.text}\n\n{note}", first.images), *messages[1:]]
    return [Message("system", note), *messages]


class TransformersVisionLanguageModel:
    """Chat with text and images through a local transformers VLM and its own chat template."""

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        max_new_tokens: int = 512,
        max_image_side: int = 768,
        model_id: str | None = None,
    ) -> None:
        self.model = model
        self.model_id = model_id or f"transformers:{model}"
        self.max_new_tokens = max_new_tokens
        # Larger pictures cost image tokens (quadratically, for Qwen-VL) without helping a critic.
        self.max_image_side = max_image_side
        self.device = pick_device(device)
        self.dtype = pick_dtype(self.device, dtype)
        self.processor, self.network = load_cached(
            ("transformers-vlm", model, self.device, str(self.dtype)),
            lambda: _load(model, self.device, self.dtype),
        )

    def _image(self, path: Path) -> Image.Image:
        image = open_image(path)
        image.thumbnail((self.max_image_side, self.max_image_side), Image.Resampling.LANCZOS)
        return image

    def _conversation(self, messages: Sequence[Message]) -> tuple[list[dict[str, Any]], list[Image.Image]]:
        """Messages in the chat-template shape (text, then one image slot per image) and their images in order."""
        conversation: list[dict[str, Any]] = []
        images: list[Image.Image] = []
        for message in messages:
            # Content is always a list: several families' templates iterate over it even for plain text.
            content: list[dict[str, Any]] = [{"type": "text", "text": message.text}]
            content += [{"type": "image"} for _ in message.images]
            conversation.append({"role": message.role, "content": content})
            images += [self._image(path) for path in message.images]
        return conversation, images

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        """Render `messages` with the checkpoint's chat template and return the answer (greedy by default)."""
        import torch

        if json_schema is not None:
            messages = _with_schema_note(messages, json_schema)
        conversation, images = self._conversation(messages)
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        prefix = JSON_PREFIX if json_schema is not None else ""
        inputs = self.processor(text=[prompt + prefix], images=images or None, return_tensors="pt")
        prompt_length = inputs["input_ids"].shape[1]
        try:
            with device_lock, torch.inference_mode():
                if not decoding.greedy and decoding.seed is not None:
                    torch.manual_seed(decoding.seed)  # under the device lock: no other call draws in between
                output = self.network.generate(
                    **inputs.to(self.device, dtype=self.dtype),
                    max_new_tokens=self.max_new_tokens,
                    **sampling_kwargs(decoding),
                )
        except RuntimeError as e:
            if "out of memory" in str(e).lower():
                raise explain_out_of_memory(f"running {self.model_id}", VLM_MEMORY_KNOBS) from None
            raise
        answer: str = self.processor.batch_decode(output[:, prompt_length:], skip_special_tokens=True)[0]
        return prefix + answer.strip()


def sampling_kwargs(decoding: Decoding) -> dict[str, Any]:
    """`generate` keywords for `decoding`: greedy, or sampling with temperature, top_p and repetition penalty."""
    kwargs: dict[str, Any] = {"repetition_penalty": decoding.repetition_penalty}
    if decoding.greedy:
        return {**kwargs, "do_sample": False}
    return {**kwargs, "do_sample": True, "temperature": decoding.temperature, "top_p": decoding.top_p}


def tiny_transformers_vlm(
    name: str, device: str | None = None, dtype: str | None = None
) -> TransformersVisionLanguageModel:
    """`tiny:NAME` (`qwen2-vl`, `smolvlm`): a random tiny VLM built once into the tiny cache; it answers noise."""
    from imageloop.tiny import print_noise_notice
    from imageloop.tiny.vlm import tiny_vlm_dir

    directory = tiny_vlm_dir(name)
    print_noise_notice()
    # Random weights never emit the end-of-turn token early: keep answers short so the loop stays fast.
    return TransformersVisionLanguageModel(
        str(directory), device=device, dtype=dtype, max_new_tokens=32, model_id=f"tiny:{name}"
    )
