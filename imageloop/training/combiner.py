"""The composed-query model: CLIP4CIR's Combiner over frozen image-text features, saved and loaded.

Combiner (Baldrati et al., "Conditioned and Composed Image Retrieval Combining and Partially
Fine-Tuning CLIP-Based Features", CVPRW 2022; github.com/ABaldrati/CLIP4Cir, src/combiner.py): both
features are projected (linear + ReLU + dropout), concatenated, mixed by a hidden layer into a
residual, and a learned gate lambda in [0, 1] blends the raw inputs:

    query = normalize(residual(t, i) + lambda(t, i) * t + (1 - lambda(t, i)) * i)

so the output stays in the embedder's joint space: an index built with the same embedder is searched
with it directly. Widths follow CLIP4CIR's ratios (projection 4x, hidden 8x the feature width; 2560
and 5120 for RN50x4's 640) and its dropout of 0.5 (0.2 before the gate's output).

A trained model is a folder: `model.safetensors` (the Combiner's weights) and `config.json` (format,
widths, the embedder whose features it was trained on, and how it was trained). A clip4cir model also
holds its fine-tuned CLIP (`encoder/`, named by config.json's `encoder`): its features are those of the
`cir:FOLDER` embedder, so it serves an index built with that embedder.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from imageloop.errors import ConfigError, EmbedderMismatchError
from imageloop.files import write_json_atomic
from imageloop.protocols import Vector

MODEL_FORMAT = "imageloop-cir-combiner/1"
MODEL_WEIGHTS = "model.safetensors"
MODEL_CONFIG = "config.json"
PROJECTION_FACTOR = 4
HIDDEN_FACTOR = 8
DEFAULT_DROPOUT = 0.5


@dataclass(frozen=True)
class CombinerConfig:
    """The Combiner's widths and dropout; `feature_dim` is the embedder's joint-space width."""

    feature_dim: int
    projection_dim: int
    hidden_dim: int
    dropout: float = DEFAULT_DROPOUT

    @classmethod
    def for_features(cls, feature_dim: int, dropout: float = DEFAULT_DROPOUT) -> CombinerConfig:
        """CLIP4CIR's widths for features `feature_dim` wide."""
        return cls(feature_dim, PROJECTION_FACTOR * feature_dim, HIDDEN_FACTOR * feature_dim, dropout)


class Combiner(nn.Module):
    """Fuse a reference-image feature and a modification-text feature into one unit query vector."""

    def __init__(self, config: CombinerConfig) -> None:
        super().__init__()
        self.config = config
        d, p, h = config.feature_dim, config.projection_dim, config.hidden_dim
        self.text_projection = nn.Linear(d, p)
        self.image_projection = nn.Linear(d, p)
        self.mix = nn.Linear(2 * p, h)
        self.residual = nn.Linear(h, d)
        # CLIP4CIR's gate: its own hidden layer with a lighter dropout (0.2), then a sigmoid.
        self.gate = nn.Sequential(nn.Linear(2 * p, h), nn.ReLU(), nn.Dropout(0.2), nn.Linear(h, 1), nn.Sigmoid())
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """Unit query vectors, one row per (image, text) row pair."""
        projected = torch.cat(
            (
                self.dropout(F.relu(self.text_projection(text_features))),
                self.dropout(F.relu(self.image_projection(image_features))),
            ),
            dim=-1,
        )
        residual = self.residual(self.dropout(F.relu(self.mix(projected))))
        weight = self.gate(projected)
        return F.normalize(residual + weight * text_features + (1 - weight) * image_features, dim=-1)


def save_cir_model(
    directory: Path, combiner: Combiner, embedder_id: str, training: dict[str, Any], *, encoder: str | None = None
) -> None:
    """Write a trained Combiner as a model folder `CIRModel.load` reads (config last: it marks the folder done).

    `encoder` names the folder's own fine-tuned encoder (clip4cir), whose `cir:` embedder its features come from.
    """
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in combiner.state_dict().items()}
    save_file(state, str(directory / MODEL_WEIGHTS), metadata={"format": MODEL_FORMAT})
    config: dict[str, Any] = {"format": MODEL_FORMAT, "embedder": embedder_id, "combiner": asdict(combiner.config)}
    if encoder is not None:
        config["encoder"] = encoder
    write_json_atomic(directory / MODEL_CONFIG, {**config, "training": training})


def own_embedder_id(directory: Path) -> str:
    """The id of the `cir:` embedder a model folder with its own encoder doubles as (its resolved path)."""
    return f"cir:{directory.resolve()}"


class CIRModel:
    """A trained composed-query model: `embed_query(image vector, text vector)` gives a vector to search with.

    Its vectors live in the space of the embedder it was trained on (`embedder_id`); a caller checks
    that the index it searches was built with that same embedder.
    """

    def __init__(self, combiner: Combiner, embedder_id: str, training: dict[str, Any]) -> None:
        self.combiner = combiner.eval()
        self.embedder_id = embedder_id
        self.training = training

    @property
    def dim(self) -> int:
        """The width of the vectors it takes and gives."""
        return self.combiner.config.feature_dim

    @classmethod
    def load(cls, directory: Path) -> CIRModel:
        """Load the model folder `directory` (written by `train_cir`) onto the CPU."""
        from safetensors.torch import load_file

        config_path = directory / MODEL_CONFIG
        if not config_path.is_file() or not (directory / MODEL_WEIGHTS).is_file():
            raise ConfigError(f"{directory}: no trained CIR model here (expected {MODEL_CONFIG} and {MODEL_WEIGHTS})")
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("format") != MODEL_FORMAT:
            raise ConfigError(f"{directory}: {config.get('format')!r} is not a CIR model format this version reads")
        combiner = Combiner(CombinerConfig(**config["combiner"]))
        combiner.load_state_dict(load_file(str(directory / MODEL_WEIGHTS)))
        embedder = own_embedder_id(directory) if config.get("encoder") else config["embedder"]
        return cls(combiner, embedder, config.get("training", {}))

    def require_embedder(self, model_id: str) -> None:
        """Refuse to serve an index built with another embedder than the one this model was trained on."""
        if model_id != self.embedder_id:
            raise EmbedderMismatchError(
                f"this CIR model was trained on features of {self.embedder_id}, but the index was built with "
                f"{model_id}: search an index built with {self.embedder_id}, or train a model on {model_id}"
            )

    def embed_query(self, reference_image_vector: Vector, text_vector: Vector) -> Vector:
        """The unit query vector for one (D,) pair, or one row per row of two (N, D) arrays."""
        image, text = np.asarray(reference_image_vector), np.asarray(text_vector)
        if image.shape != text.shape or image.shape[-1:] != (self.dim,) or image.ndim not in (1, 2):
            raise ConfigError(
                f"this CIR model takes two vectors of width {self.dim} (features of {self.embedder_id}); "
                f"got shapes {image.shape} and {text.shape}"
            )
        with torch.inference_mode():
            query = self.combiner(
                torch.as_tensor(image, dtype=torch.float32), torch.as_tensor(text, dtype=torch.float32)
            )
        result: Vector = query.numpy().astype(np.float32)
        return result
