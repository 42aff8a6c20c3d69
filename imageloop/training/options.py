"""How DAIG's two trainings run, each declared once: the `train cir` and `train cir-lora` options.

Training runs are not loops, but their options follow the knobs' habit (`imageloop.knobs`): one typed
model each, from which the CLI options (`imageloop train ... --help`), the `App` methods' validation
(an unknown name refused with the valid ones, a value past its bound in one line) and the record in the
trained folder (`config.json`, `cir_lora.json`) are derived. Where a paper gives a value, it is the
default and its source is named; where it does not, the default is ours and says so.

Importing this module imports no torch: the faces read it to build their options.
"""

from __future__ import annotations

import math
from typing import ClassVar, Literal

from pydantic import Field

from imageloop.knobs import Knobs

CIRModelName = Literal["combiner", "clip4cir", "sprc"]
CIR_MODELS: tuple[CIRModelName, ...] = ("combiner", "clip4cir", "sprc")
DRSPFeatures = Literal["visual", "visual+text"]
WeightingScheme = Literal["none", "sigma_sqrt", "logit_normal", "mode", "cosmap"]

DEFAULT_PROBABILITY = 0.5
"""DRSP: DAIG perturbs half of the pre-training batches."""
DEFAULT_MARGIN = 0.1
"""FRA's phi in radians: ours (the paper's value could not be read here; see the README's table)."""
DEFAULT_TEMPERATURE = 0.01
"""tau: CLIP4CIR scales its cosine logits by 100 (src/combiner_train.py, src/clip_fine_tune.py)."""
DEFAULT_SPRC_BASE = "Salesforce/blip2-itm-vit-g"
"""SPRC starts from BLIP-2's first-stage (Q-Former) checkpoint with ViT-g (its `--backbone pretrain`)."""
ENCODER_LEARNING_RATES: dict[CIRModelName, float] = {"clip4cir": 2e-6, "sprc": 1e-5}
"""The papers' own encoder learning rates: CLIP4CIR src/clip_fine_tune.py `--learning-rate` default; SPRC's
README command for CIRR (`--learning-rate 1e-5`; 2e-5 for FashionIQ)."""


class CIRTrainingOptions(Knobs):
    """`train cir`: which composed-query model, and DAIG's two stages (DRSP pre-training, FRA fine-tuning)."""

    LOOP: ClassVar[str] = "train cir"
    model: CIRModelName = Field(
        default="combiner",
        description="combiner (a Combiner over frozen features), clip4cir (CLIP4CIR's recipe: CLIP fine-tuned, then "
        "a Combiner) or sprc (SPRC's BLIP-2 Q-Former with sentence-level prompts)",
    )
    base_model: str | None = Field(
        default=None,
        max_length=4096,
        description="clip4cir: the open_clip CLIP it fine-tunes (default: the --embedder); sprc: the BLIP-2 "
        "image-text checkpoint (default: Salesforce/blip2-itm-vit-g)",
    )
    # No bounds declared on `steps` and `batch_size`: the limits table holds bounds of those names for denoising
    # and indexing, which a refusal would quote; the training checks them in its own words.
    steps: int = Field(default=1000, description="pre-training steps on the synthetic triplets, per part")
    finetune_steps: int = Field(
        default=200, ge=0, le=10_000_000, description="fine-tuning steps on real triplets, per part"
    )
    batch_size: int = Field(default=64, description="triplets per step (each contrasts with the others)")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="the Combiner's pre-training learning rate")
    finetune_learning_rate: float = Field(
        default=2e-5, gt=0, le=1, description="the Combiner's fine-tuning learning rate"
    )
    encoder_learning_rate: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="clip4cir, sprc: their encoders' learning rate; unset: the paper's (2e-6, 1e-5)",
    )
    drsp_probability: float = Field(
        default=DEFAULT_PROBABILITY, ge=0, le=1, description="DRSP: share of pre-training batches perturbed (DAIG: 0.5)"
    )
    drsp_features: DRSPFeatures = Field(
        default="visual",
        description="DRSP perturbs the visual features (DAIG's) or visual+text (ours, the old default)",
    )
    fra_margin: float = Field(
        default=DEFAULT_MARGIN,
        ge=0,
        lt=math.pi,
        description="FRA's angular margin in radians on matching pairs (ours: 0.1)",
    )
    temperature: float = Field(
        default=DEFAULT_TEMPERATURE, gt=0, le=10, description="contrastive temperature (CLIP4CIR's logit scale 100)"
    )
    dropout: float = Field(default=0.5, ge=0, lt=1, description="the Combiner's dropout (CLIP4CIR: 0.5)")
    checkpoint_every: int = Field(default=100, ge=1, le=10_000_000, description="steps between checkpoints")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="batches, dropout and DRSP draws")

    def encoder_rate(self) -> float:
        """The encoders' learning rate: the one asked for, else the paper's for this model."""
        return self.encoder_learning_rate or ENCODER_LEARNING_RATES.get(self.model, self.learning_rate)


class CIRLoRAOptions(Knobs):
    """`train cir-lora`. DAIG's own values could not be read here: the optimiser, learning rate, batch, weighting,
    panel size and text length follow diffusers' FLUX LoRA script; the rank (the script's is 4) is ours, as
    in-context LoRAs carry a layout as well as a look."""

    LOOP: ClassVar[str] = "train cir-lora"
    steps: int = Field(default=1000, description="training steps")
    experts: int = Field(default=1, ge=1, le=64, description="LoRA experts mixed by a router (1: one plain LoRA)")
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(default=16.0, gt=0, le=4096, description="LoRA alpha (scale alpha / rank)")
    learning_rate: float = Field(default=1e-4, gt=0, le=1, description="AdamW learning rate")
    resolution: int = Field(
        default=512, ge=2, le=2048, description="each panel's side in pixels (the diptych: twice as wide)"
    )
    batch_size: int = Field(default=4, ge=1, le=256, description="diptychs per step")
    weighting_scheme: WeightingScheme = Field(
        default="none", description="timestep density, as diffusers' script names it"
    )
    max_sequence_length: int = Field(default=512, ge=1, le=512, description="T5 tokens of the in-context description")
    max_grad_norm: float = Field(default=1.0, gt=0, le=1000, description="gradient clipping")
    checkpoint_every: int = Field(default=100, ge=1, le=10_000_000, description="steps between checkpoints")
    seed: int = Field(default=0, ge=0, le=2**32 - 1, description="noise, timesteps and batches")
    base_model: str | None = Field(
        default=None, max_length=4096, description="FLUX checkpoint; unset: the --generator if FLUX, else FLUX.1-dev"
    )
