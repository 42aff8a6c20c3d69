"""Local image-text embedders: open_clip (CLIP, SigLIP) and transformers (CLIP, SigLIP, BLIP); and image
features from a transformers vision backbone (DINO), which the ImageRAG evaluation compares images with.

Both load once per process through `load_cached`, run forward passes under `device_lock` in
`torch.inference_mode()`, and return L2-normalised float32 rows. Captions longer than the text
tower's context are truncated by its tokenizer. Image preprocessing (resize, crop, normalise) runs
on a small thread pool, one batch ahead of the device, so the CPU prepares batch k+1 while batch k
is encoded.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

import numpy as np
from PIL import Image

from imageloop.errors import ConfigError
from imageloop.protocols import Vector
from imageloop.runtime import device_lock, explain_load_failure, load_cached, pick_device, pick_dtype

if TYPE_CHECKING:
    import torch

DEFAULT_BATCH_SIZE = 32
T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _preprocess_pool() -> ThreadPoolExecutor:
    """One process-wide pool for image preprocessing, sized to the CPU (PIL and torch release the GIL)."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="preprocess")
        return _pool


class _TorchEmbedder:
    """Batching, preprocessing overlap, locking and normalisation shared by the local embedders.

    A subclass supplies `_pixels(image)` (one preprocessed CHW tensor), `_tokens(texts)` (model inputs)
    and the two encoders; everything else, including where and how the work runs, lives here.
    """

    embeds_images = True

    def __init__(
        self, model_id: str, dim: int, image_side: int | None, device: str, dtype: torch.dtype, batch_size: int
    ) -> None:
        if batch_size < 1:
            raise ConfigError(f"embedding batch_size must be at least 1, got {batch_size}")
        self.model_id = model_id
        self._dim = dim
        # The side of the square the image tower sees: callers may hand over pictures reduced towards it.
        self.image_side = image_side
        self.device = device
        self.dtype = dtype
        self.batch_size = batch_size

    @property
    def dim(self) -> int:
        """The embedding width of the model's joint space."""
        return self._dim

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        """Unit vectors for `texts`, one row each in input order; over-long texts are truncated."""
        rows = []
        for start in range(0, len(texts), self.batch_size):
            inputs = self._tokens(list(texts[start : start + self.batch_size]))
            rows.append(self._run(self._encode_text, inputs))
        return self._stack(rows)

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        """Unit vectors for `images`, one row each in input order, preprocessing one batch ahead."""
        pool = _preprocess_pool()
        batches = [images[start : start + self.batch_size] for start in range(0, len(images), self.batch_size)]

        def schedule(batch: Sequence[Image.Image]) -> list[Future[torch.Tensor]]:
            return [pool.submit(self._pixels, image) for image in batch]

        rows = []
        upcoming = schedule(batches[0]) if batches else []
        for index in range(len(batches)):
            current = upcoming
            upcoming = schedule(batches[index + 1]) if index + 1 < len(batches) else []
            rows.append(self._run(self._encode_image, _stacked(current)))
        return self._stack(rows)

    def _run(self, encode: Callable[[Any], torch.Tensor], inputs: Any) -> Vector:
        import torch

        with device_lock, torch.inference_mode():
            features = encode(inputs).float()
            unit = torch.nn.functional.normalize(features, dim=-1)
            rows: Vector = unit.cpu().numpy()
            return rows

    def _stack(self, rows: list[Vector]) -> Vector:
        if not rows:
            return np.zeros((0, self._dim), dtype=np.float32)
        return np.ascontiguousarray(np.concatenate(rows), dtype=np.float32)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def _tokens(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _encode_text(self, inputs: Any) -> torch.Tensor:
        raise NotImplementedError


def _placed_load(
    key: tuple[object, ...], device: str | None, dtype: str | None, load: Callable[[str, torch.dtype], T]
) -> tuple[T, str, torch.dtype]:
    """`load(device, dtype)` on the resolved placement, once per process per `key` and placement."""
    resolved_device = pick_device(device)
    resolved_dtype = pick_dtype(resolved_device, dtype)
    loaded = load_cached((*key, resolved_device, str(resolved_dtype)), lambda: load(resolved_device, resolved_dtype))
    return loaded, resolved_device, resolved_dtype


def _stacked(futures: list[Future[torch.Tensor]]) -> torch.Tensor:
    import torch

    return torch.stack([future.result() for future in futures])


# --- open_clip ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _OpenClipModel:
    """What one open_clip load yields: the model, its eval transform, tokenizer and joint width."""

    model: Any
    preprocess: Callable[[Image.Image], torch.Tensor]
    tokenizer: Callable[[list[str]], torch.Tensor]
    dim: int
    image_side: int | None


_OPEN_CLIP_PRECISION = {"float32": "fp32", "float16": "pure_fp16", "bfloat16": "pure_bf16"}


def parse_open_clip_model(model: str) -> tuple[str, str | None]:
    """Split `open_clip:` text into open_clip's (model_name, pretrained).

    `NAME/TAG` (`ViT-B-32/laion2b_s34b_b79k`), `NAME/PATH` (a weights file), `hf-hub:ORG/REPO`,
    `local-dir:PATH` or a bare directory holding `open_clip_config.json`. Names and tags are checked
    against open_clip's registry here, offline, so a typo fails at once with the known choices.
    """
    import open_clip

    if model.startswith(("hf-hub:", "local-dir:")):
        return model, None
    if Path(model).is_dir():
        return f"local-dir:{model}", None
    name, _, pretrained = model.partition("/")
    if name not in open_clip.list_models():
        raise ConfigError(
            f"open_clip:{model}: unknown open_clip model {name!r}; use NAME/PRETRAINED with a NAME from "
            "`python -c 'import open_clip; print(open_clip.list_models())'`, hf-hub:ORG/REPO, or a local directory"
        )
    tags = open_clip.list_pretrained_tags_by_model(name)
    if not pretrained:
        raise ConfigError(
            f"open_clip:{model}: name the weights as {name}/PRETRAINED, a tag ({', '.join(tags) or 'none known'}) "
            "or a weights file"
        )
    if not Path(pretrained).is_file() and not open_clip.get_pretrained_cfg(name, pretrained):
        raise ConfigError(
            f"open_clip:{model}: {pretrained!r} is neither a weights file nor a tag of {name}; "
            f"tags: {', '.join(tags) or 'none known'}"
        )
    return name, pretrained


def _open_clip_source(name: str, pretrained: str | None) -> str:
    """What to download or point at when `name`/`pretrained` cannot be loaded (a hub repo where known)."""
    import open_clip

    if name.startswith("hf-hub:"):
        return name.removeprefix("hf-hub:")
    if name.startswith("local-dir:"):
        return name.removeprefix("local-dir:")
    if pretrained and not Path(pretrained).is_file():
        hub: str = open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "")
        if hub:
            return os.path.split(hub)[0]
    return pretrained or name


def _load_open_clip(name: str, pretrained: str | None, device: str, dtype: torch.dtype) -> _OpenClipModel:
    import open_clip

    precision = _OPEN_CLIP_PRECISION[str(dtype).removeprefix("torch.")]
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, precision=precision
        )
        tokenizer = open_clip.get_tokenizer(name)
        config = open_clip.get_model_config(name)
    except Exception as e:
        raise explain_load_failure(_open_clip_source(name, pretrained), e) from e
    model.eval()
    side = getattr(model.visual, "image_size", None)
    image_side = max(side) if isinstance(side, (tuple, list)) else side
    return _OpenClipModel(model, preprocess, tokenizer, int(config["embed_dim"]), image_side)


class OpenClipEmbedder(_TorchEmbedder):
    """An open_clip CLIP or SigLIP model; `model_id` is the provider string that names it."""

    def __init__(
        self,
        name: str,
        pretrained: str | None,
        *,
        model_id: str,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self._loaded, placed_device, placed_dtype = _placed_load(
            ("open_clip", name, pretrained), device, dtype, lambda d, t: _load_open_clip(name, pretrained, d, t)
        )
        loaded = self._loaded
        super().__init__(model_id, loaded.dim, loaded.image_side, placed_device, placed_dtype, batch_size)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        return self._loaded.preprocess(image.convert("RGB"))

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        # open_clip's tokenizers cut at the context length and keep the end-of-text token.
        return self._loaded.tokenizer(texts)

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._loaded.model.encode_image(pixels.to(self.device, self.dtype))  # type: ignore[no-any-return]

    def _encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._loaded.model.encode_text(tokens.to(self.device))  # type: ignore[no-any-return]


def open_clip_embedder(model: str, device: str | None = None, dtype: str | None = None) -> OpenClipEmbedder:
    """The embedder for `open_clip:MODEL` (see `parse_open_clip_model` for the accepted forms)."""
    name, pretrained = parse_open_clip_model(model)
    return OpenClipEmbedder(name, pretrained, model_id=f"open_clip:{model}", device=device, dtype=dtype)


def tiny_clip_embedder(device: str | None = None, dtype: str | None = None) -> OpenClipEmbedder:
    """`tiny:clip`: the random tiny open_clip model, built once into the tiny cache; its vectors are noise."""
    from imageloop.tiny import print_noise_notice
    from imageloop.tiny.clip import tiny_clip_dir

    print_noise_notice()
    return OpenClipEmbedder(f"local-dir:{tiny_clip_dir()}", None, model_id="tiny:clip", device=device, dtype=dtype)


# --- transformers ------------------------------------------------------------------------------

# Checkpoint families with one joint image-text space. BLIP's lives in BlipModel's projections, or, in
# retrieval checkpoints (architectures: BlipForImageTextRetrieval), in their ITC vision_proj/text_proj.
# BLIP-2 is left out: its image side is 32 query vectors scored by their maximum, not one vector.
_TRANSFORMERS_FAMILIES = ("clip", "siglip", "blip")


@dataclass(frozen=True)
class _TransformersModel:
    """What one transformers load yields: the model, its processor, the family and joint width."""

    model: Any
    processor: Any
    family: str
    blip_retrieval: bool
    dim: int
    max_text_tokens: int


def _load_transformers(model_name: str, device: str, dtype: torch.dtype) -> _TransformersModel:
    import transformers

    try:
        config = transformers.AutoConfig.from_pretrained(model_name)
    except Exception as e:
        raise explain_load_failure(model_name, e) from e
    family = config.model_type
    if family not in _TRANSFORMERS_FAMILIES:
        raise ConfigError(
            f"transformers:{model_name} is a {family!r} model; image-text embedding supports "
            f"{', '.join(_TRANSFORMERS_FAMILIES)} checkpoints (use open_clip: for other CLIP variants)"
        )
    blip_retrieval = family == "blip" and "BlipForImageTextRetrieval" in (config.architectures or [])
    model_class: Any = transformers.BlipForImageTextRetrieval if blip_retrieval else transformers.AutoModel
    try:
        model = model_class.from_pretrained(model_name, dtype=dtype).to(device)
        processor = transformers.AutoProcessor.from_pretrained(model_name)  # type: ignore[no-untyped-call]
    except Exception as e:
        raise explain_load_failure(model_name, e) from e
    model.eval()
    if blip_retrieval:
        dim = config.image_text_hidden_size
    else:
        dim = config.projection_dim if family != "siglip" else config.text_config.projection_size
    return _TransformersModel(
        model, processor, family, blip_retrieval, int(dim), int(config.text_config.max_position_embeddings)
    )


def _tower_side(loaded: object) -> int | None:
    """The side of the square a transformers checkpoint's vision tower sees (its config's image_size), if said."""
    config = getattr(getattr(loaded, "model", None), "config", None)
    config = getattr(config, "vision_config", None) or config
    side = getattr(config, "image_size", None)
    return side if isinstance(side, int) else None


class _Loaded(Protocol):
    @property
    def dim(self) -> int: ...


LoadedT = TypeVar("LoadedT", bound=_Loaded)


class _TransformersCheckpoint(_TorchEmbedder, Generic[LoadedT]):
    """A transformers checkpoint (hub id or local directory), loaded by `_load` once per process and placement."""

    _cache_kind = "transformers"

    def __init__(
        self,
        model: str,
        *,
        device: str | None = None,
        dtype: str | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        self._loaded: LoadedT
        self._loaded, placed_device, placed_dtype = _placed_load(
            (self._cache_kind, model), device, dtype, lambda d, t: self._load(model, d, t)
        )
        model_id = f"transformers:{model}"
        side = _tower_side(self._loaded)
        super().__init__(model_id, self._loaded.dim, side, placed_device, placed_dtype, batch_size)

    def _load(self, model: str, device: str, dtype: torch.dtype) -> LoadedT:
        raise NotImplementedError


class TransformersEmbedder(_TransformersCheckpoint[_TransformersModel]):
    """A transformers CLIP, SigLIP or BLIP checkpoint (hub id or local directory) as an embedder."""

    _cache_kind = "transformers-embedder"

    def _load(self, model: str, device: str, dtype: torch.dtype) -> _TransformersModel:
        return _load_transformers(model, device, dtype)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        processed = self._loaded.processor.image_processor(images=image.convert("RGB"), return_tensors="pt")
        return processed["pixel_values"][0]  # type: ignore[no-any-return]

    def _tokens(self, texts: list[str]) -> Any:
        # SigLIP was trained on text padded to its full length; the others pad to the longest text.
        padding = "max_length" if self._loaded.family == "siglip" else True
        return self._loaded.processor.tokenizer(
            texts, padding=padding, truncation=True, max_length=self._loaded.max_text_tokens, return_tensors="pt"
        ).to(self.device)

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        model = self._loaded.model
        pixels = pixels.to(self.device, self.dtype)
        if self._loaded.blip_retrieval:
            return model.vision_proj(model.vision_model(pixel_values=pixels).last_hidden_state[:, 0, :])  # type: ignore[no-any-return]
        # transformers 5 returns an output object whose pooler_output is the projected embedding.
        return model.get_image_features(pixel_values=pixels).pooler_output  # type: ignore[no-any-return]

    def _encode_text(self, inputs: Any) -> torch.Tensor:
        model = self._loaded.model
        if self._loaded.blip_retrieval:
            hidden = model.text_encoder(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            return model.text_proj(hidden[:, 0, :])  # type: ignore[no-any-return]
        masks = {"attention_mask": inputs["attention_mask"]} if "attention_mask" in inputs else {}
        return model.get_text_features(input_ids=inputs["input_ids"], **masks).pooler_output  # type: ignore[no-any-return]


# --- image features (DINO) --------------------------------------------------------------------


@dataclass(frozen=True)
class _VisionBackbone:
    """What one vision-backbone load yields: the model, its image processor and feature width."""

    model: Any
    processor: Any
    dim: int


def _load_vision_backbone(model_name: str, device: str, dtype: torch.dtype) -> _VisionBackbone:
    import transformers

    try:
        model = transformers.AutoModel.from_pretrained(model_name, dtype=dtype).to(device)
        processor = transformers.AutoImageProcessor.from_pretrained(model_name)  # type: ignore[no-untyped-call, unused-ignore]
    except Exception as e:
        raise explain_load_failure(model_name, e) from e
    model.eval()
    return _VisionBackbone(model, processor, int(model.config.hidden_size))


class ImageFeatureEncoder(_TransformersCheckpoint[_VisionBackbone]):
    """A transformers vision backbone (DINOv2, DINO ViT) as unit image features: its class token, as the
    DINO image-image similarity of text-to-image papers uses it. It embeds images only."""

    _cache_kind = "vision-backbone"

    def _load(self, model: str, device: str, dtype: torch.dtype) -> _VisionBackbone:
        return _load_vision_backbone(model, device, dtype)

    def _pixels(self, image: Image.Image) -> torch.Tensor:
        processed = self._loaded.processor(images=image.convert("RGB"), return_tensors="pt")
        return processed["pixel_values"][0]  # type: ignore[no-any-return]

    def _tokens(self, texts: list[str]) -> Any:
        raise ConfigError(f"{self.model_id} is an image backbone: it embeds images, not text")

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        output = self._loaded.model(pixel_values=pixels.to(self.device, self.dtype))
        # DINOv2's pooler output is its layer-normed class token; a ViT without a pooler gives the raw one.
        pooled = getattr(output, "pooler_output", None)
        return pooled if pooled is not None else output.last_hidden_state[:, 0]  # type: ignore[no-any-return]
