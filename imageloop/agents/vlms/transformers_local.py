"""A VisionLanguageModel over a local transformers checkpoint (Qwen2/2.5-VL, SmolVLM, Idefics3, Gemma 3, LLaVA...).

The checkpoint is loaded once per process through `AutoProcessor` and `AutoModelForImageTextToText`,
and every conversation is rendered by the checkpoint's own chat template, so any family whose
processor ships one works unchanged. Decoding is greedy unless a call asks to sample. With a JSON
schema the schema is added to the system turn and the answer is forced to open with `{` (the
generation prompt ends with it), which rules out preambles and code fences but not invalid JSON:
`imageloop.agents.structured` validates and repairs, as for every backend.

Several calls run as one left-padded batch (`chat_batch`; one call is a batch of one). transformers'
sampling draws every row's token from one generator, so one row's answer would depend on the
others'; here each row decodes itself (`RowDecoding`): its repetition penalty over its own tokens,
and for sampling rows temperature, top-k, top-p and a draw from the row's own generator seeded by
its `Decoding.seed`. `generate` itself runs greedy over the result.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from imageloop.errors import ConfigError
from imageloop.prompts import JSON_SCHEMA_NOTE
from imageloop.protocols import GREEDY, ChatAnswer, ChatCall, Decoding, Message, TokenUsage
from imageloop.runtime import (
    device_lock,
    explain_load_failure,
    load_cached,
    pick_device,
    pick_dtype,
    translated_out_of_memory,
)
from imageloop.tools.images import image_size, open_image

if TYPE_CHECKING:
    import torch

VLM_MEMORY_KNOBS = "set `dtype` bfloat16 or float16, use a smaller checkpoint, or set `device` cpu"
JSON_PREFIX = "{"
"""What a structured answer is forced to start with."""
PROMPT_LENGTH_CLASS = 1.25
"""Prompts whose lengths differ by less than this factor may share a batch (see `batch_key`)."""
TRANSFORMERS_DEFAULT_TOP_K = 50
"""What `generate` samples with when the checkpoint's generation config sets no top-k."""


def _load(model: str, device: str, dtype: torch.dtype) -> tuple[Any, Any, threading.Lock]:
    """The processor and the model of checkpoint `model` (hub id or local directory), placed on `device`, and the
    lock its tokenizer is used under (a fast tokenizer that changes its padding must not be in use elsewhere)."""
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
    with translated_out_of_memory(f"loading {model}", VLM_MEMORY_KNOBS):
        network = network.to(device)
    return processor, network.eval(), threading.Lock()


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
        self.processor, self.network, self._tokenizer_lock = load_cached(
            ("transformers-vlm", model, self.device, str(self.dtype)),
            lambda: _load(model, self.device, self.dtype),
        )

    def _image(self, path: Path) -> Image.Image:
        image = open_image(path)
        image.thumbnail((self.max_image_side, self.max_image_side), Image.Resampling.LANCZOS)
        return image

    def _prompt(self, call: ChatCall) -> tuple[str, str]:
        """The prompt as the model reads it (chat template, an image slot per image, JSON prefix) and the prefix."""
        messages = call.messages if call.json_schema is None else _with_schema_note(call.messages, call.json_schema)
        conversation: list[dict[str, Any]] = []
        for message in messages:
            # Content is always a list: several families' templates iterate over it even for plain text.
            content: list[dict[str, Any]] = [{"type": "text", "text": message.text}]
            content += [{"type": "image"} for _ in message.images]
            conversation.append({"role": message.role, "content": content})
        prefix = JSON_PREFIX if call.json_schema is not None else ""
        prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        return prompt + prefix, prefix

    def batch_key(self, call: ChatCall) -> Hashable:
        """The number of images and the prompt's length: calls that share a pass pad to its longest prompt.

        Some processors (SmolVLM, Idefics3) stack a batch's images per conversation, so the image count
        must agree. On a GPU, prompts whose lengths differ by less than `PROMPT_LENGTH_CLASS` share a
        pass. On a CPU, which has no compute to spare, only prompts of exactly one length do: a padded
        batch needs an attention mask, and masked attention costs about twice the causal kind there.
        """
        paths = [path for message in call.messages for path in message.images]
        if self.device != "cpu":
            characters = sum(len(message.text) for message in call.messages)
            if call.json_schema is not None:
                characters += len(json.dumps(call.json_schema))
            return len(paths), int(math.log(max(characters, 1), PROMPT_LENGTH_CLASS))
        with self._tokenizer_lock:
            tokens = len(self.processor.tokenizer(self._prompt(call)[0])["input_ids"])
        return len(paths), tokens, tuple(image_size(path) for path in paths)

    def chat(
        self, messages: Sequence[Message], json_schema: Mapping[str, Any] | None = None, decoding: Decoding = GREEDY
    ) -> str:
        """Render `messages` with the checkpoint's chat template and return the answer (greedy by default)."""
        return self.chat_batch([ChatCall(messages, json_schema, decoding)])[0]

    def chat_batch(self, calls: Sequence[ChatCall]) -> list[str]:
        """Answer calls of one `batch_key` in one left-padded `generate`; each answer is the answer alone."""
        import torch

        rendered = [self._prompt(call) for call in calls]
        images = [[self._image(path) for message in call.messages for path in message.images] for call in calls]
        # Left padding: every prompt ends where its answer starts, so each step extends all rows at once.
        with self._tokenizer_lock:
            inputs = self.processor(
                text=[prompt for prompt, _ in rendered],
                images=images if any(images) else None,
                return_tensors="pt",
                padding=True,
                padding_side="left",
            )
        padded_length = inputs["input_ids"].shape[1]
        pads = (padded_length - inputs["attention_mask"].sum(dim=1)).tolist()
        top_k = self.network.generation_config.top_k
        rows = RowDecoding([c.decoding for c in calls], pads, TRANSFORMERS_DEFAULT_TOP_K if top_k is None else top_k)
        with (
            device_lock,
            torch.inference_mode(),
            translated_out_of_memory(f"running {self.model_id}", VLM_MEMORY_KNOBS),
        ):
            output = self.network.generate(
                **inputs.to(self.device, dtype=self.dtype),
                max_new_tokens=self.max_new_tokens,
                do_sample=False,
                repetition_penalty=1.0,
                logits_processor=[rows],
            )
        generated = output[:, padded_length:]
        answers = self.processor.batch_decode(generated, skip_special_tokens=True)
        # Counted as a provider counts them: each row's prompt (images' tokens included, padding not) and the
        # tokens it generated (a row that ended early is padded after its end).
        pad = self.processor.tokenizer.pad_token_id
        read = inputs["attention_mask"].sum(dim=1).tolist()
        written = (generated != pad).sum(dim=1).tolist() if pad is not None else [generated.shape[1]] * len(calls)
        return [
            ChatAnswer(prefix + answer.strip(), TokenUsage(int(prompt_tokens), int(answer_tokens)))
            for (_, prefix), answer, prompt_tokens, answer_tokens in zip(rendered, answers, read, written, strict=True)
        ]


class RowDecoding:
    """A logits processor that decodes each row of a batched `generate` as that row's call would alone.

    Per row: the repetition penalty over the row's own tokens (its left padding left out); then, for
    a sampling row, temperature, top-k and top-p as transformers applies them, and one token drawn
    from the row's own CPU generator, returned as the only finite score so `generate`'s greedy pick
    takes it. Greedy rows keep their scores. A row's draws never depend on the other rows.
    """

    def __init__(self, decodings: Sequence[Decoding], pads: Sequence[int], top_k: int) -> None:
        import torch
        from transformers import (
            RepetitionPenaltyLogitsProcessor,
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        self.rows: list[tuple[int, list[Any], torch.Generator | None]] = []
        for decoding, pad in zip(decodings, pads, strict=True):
            steps: list[Any] = []
            if decoding.repetition_penalty != 1.0:
                steps.append(RepetitionPenaltyLogitsProcessor(float(decoding.repetition_penalty)))
            generator = None
            if not decoding.greedy:
                steps.append(TemperatureLogitsWarper(decoding.temperature))
                if top_k:
                    steps.append(TopKLogitsWarper(top_k))
                if decoding.top_p < 1.0:
                    steps.append(TopPLogitsWarper(decoding.top_p))
                generator = torch.Generator(device="cpu")
                if decoding.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(decoding.seed)
            self.rows.append((pad, steps, generator))

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """Each row's scores after its own decoding; a sampling row's drawn token is its only finite score."""
        import torch

        scores = scores.clone()
        for i, (pad, steps, generator) in enumerate(self.rows):
            row = scores[i : i + 1]
            for step in steps:
                row = step(input_ids[i : i + 1, pad:], row)
            if generator is not None:
                probabilities = row.softmax(dim=-1)[0].cpu()
                token = torch.multinomial(probabilities, 1, generator=generator)
                row = torch.full_like(row, float("-inf"))
                row[0, token.to(row.device)] = 0.0
            scores[i] = row[0]
        return scores


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
