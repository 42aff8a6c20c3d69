"""CLIP4CIR's first stage: both CLIP encoders fine-tuned, with the element-wise sum as the combining function.

Baldrati et al., "Conditioned and Composed Image Retrieval Combining and Partially Fine-Tuning CLIP-Based
Features" (CVPRW 2022; ABaldrati/CLIP4Cir, src/clip_fine_tune.py): the reference image's and the change's
CLIP features are summed and normalised (src/utils.py `element_wise_sum`), and each query must pick its
target among the batch's normalised target features at logit scale 100 (our temperature 0.01); AdamW
(learning rate 2e-6, betas 0.9/0.999, eps 1e-7) over every CLIP parameter (its `--encoder both`), the model
in eval mode as that script keeps it. DAIG's stages wrap it: DRSP on the reference's visual features while
pre-training on synthetic triplets, FRA's margin while fine-tuning on real ones.

The fine-tuned CLIP is saved as an open_clip folder (`OUT/encoder/`: `open_clip_config.json` and
`open_clip_model.safetensors`), so the `cir:OUT` embedder loads it like any local-dir checkpoint; the
Combiner then learns over its frozen features (CLIP4CIR's second stage, `imageloop.training.cir`).

Where we differ: CLIP4CIR preprocesses with its `targetpad` transform (pad to aspect 1.25, then resize);
we use the embedder's own (open_clip's resize and centre crop), so training and the index see the same
pixels. CLIP4CIR trains in mixed precision (torch.cuda.amp); we train in float32.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from imageloop.errors import ConfigError
from imageloop.files import write_json_atomic
from imageloop.protocols import Vector
from imageloop.runtime import explain_load_failure
from imageloop.tools.images import open_image
from imageloop.training.drsp import DRSP
from imageloop.training.fra import FRALoss
from imageloop.training.options import CIRTrainingOptions
from imageloop.training.triplets import Triplet

if TYPE_CHECKING:
    from imageloop.training.cir import Stage

ENCODER_DIR = "encoder"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"


def clip_source(spec: str) -> tuple[str, str | None]:
    """open_clip's (model name, pretrained) for the embedder `spec` clip4cir fine-tunes."""
    from imageloop.tools.embedders.local import parse_open_clip_model

    provider, _, model = spec.partition(":")
    if provider == "tiny" and model == "clip":
        from imageloop.tiny.clip import tiny_clip_dir

        return f"local-dir:{tiny_clip_dir()}", None
    if provider == "open_clip" and model:
        return parse_open_clip_model(model)
    raise ConfigError(f"{spec}: clip4cir fine-tunes an open_clip CLIP; pass `embedder` open_clip:MODEL (or tiny:clip)")


class EncodersPart:
    """A private copy of the embedder's CLIP whose two encoders learn (the cached one serving queries is untouched)."""

    name = "encoders"

    def __init__(self, spec: str, options: CIRTrainingOptions, device: str) -> None:
        import open_clip

        name, pretrained = clip_source(spec)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, precision="fp32"
            )
        except Exception as e:
            raise explain_load_failure(spec, e) from e
        self.module: torch.nn.Module = model
        self.clip: Any = model  # open_clip's CLIP: encode_image, encode_text
        self.preprocess = preprocess
        self.tokenizer = open_clip.get_tokenizer(name)
        self.model_config: dict[str, Any] = open_clip.get_model_config(name)
        self.preprocess_config: dict[str, Any] = dict(open_clip.get_model_preprocess_cfg(model))
        self.dim = int(self.model_config["embed_dim"])
        self.options = options
        self.device = device

    def start(self) -> None:
        """CLIP4CIR fine-tunes with the model in eval mode (`clip_model.eval().float()`)."""
        self.module.eval()

    def optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        """AdamW over every CLIP parameter, CLIP4CIR's betas and eps, at the encoder learning rate."""
        return torch.optim.AdamW(self.module.parameters(), lr=self.options.encoder_rate(), betas=(0.9, 0.999), eps=1e-7)

    def loss(self, triplets: Sequence[Triplet], drsp: DRSP, criterion: FRALoss) -> torch.Tensor:
        """The element-wise sum of the reference's and the change's features against the batch's targets."""
        pictures = [open_image(t.reference_image) for t in triplets] + [open_image(t.target_image) for t in triplets]
        images = self.clip.encode_image(self._pixels(pictures))
        references, targets = images[: len(triplets)], images[len(triplets) :]
        texts = self.clip.encode_text(self.tokenizer([t.change for t in triplets]).to(self.device))
        if self.options.drsp_features == "visual+text":
            texts = drsp(texts)
        loss: torch.Tensor = criterion(F.normalize(drsp(references) + texts, dim=-1), targets)
        return loss

    def _pixels(self, images: Sequence[Image.Image]) -> torch.Tensor:
        return torch.stack([self.preprocess(image.convert("RGB")) for image in images]).to(self.device)

    def frozen_embedder(self) -> FrozenCLIP:
        """The fine-tuned encoders as an embedder (unit vectors, as the `cir:` embedder will give them)."""
        return FrozenCLIP(self)

    def save(self, directory: Path) -> None:
        """The fine-tuned CLIP as an open_clip local-dir checkpoint (its config written last)."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()}
        save_file(state, str(directory / OPEN_CLIP_WEIGHTS))
        config = {"model_cfg": self.model_config, "preprocess_cfg": self.preprocess_config}
        write_json_atomic(directory / OPEN_CLIP_CONFIG, json.loads(json.dumps(config)))


class FrozenCLIP:
    """The encoders' current weights embedding images and texts, identified by a hash of those weights."""

    embeds_images = True

    def __init__(self, part: EncodersPart) -> None:
        self.part = part
        digest = hashlib.sha256()
        for name, tensor in sorted(part.module.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        self.model_id = f"clip4cir-encoders@{digest.hexdigest()[:16]}"

    @property
    def dim(self) -> int:
        """The CLIP's joint width."""
        return self.part.dim

    def embed_images(self, images: Sequence[Image.Image]) -> Vector:
        """Unit image features."""
        with torch.inference_mode():
            return _unit(self.part.clip.encode_image(self.part._pixels(images)))

    def embed_texts(self, texts: Sequence[str]) -> Vector:
        """Unit text features."""
        with torch.inference_mode():
            return _unit(self.part.clip.encode_text(self.part.tokenizer(list(texts)).to(self.part.device)))


def _unit(features: torch.Tensor) -> Vector:
    rows: Vector = F.normalize(features.float(), dim=-1).cpu().numpy().astype(np.float32)
    return rows
