"""Training a composed-query model as DAIG does: pre-train on synthetic triplets with DRSP, fine-tune with FRA.

DAIG feeds its synthetic triplets to off-the-shelf CIR models; `options.model` names which, and each is
trained by its own published recipe, every part of it through DAIG's two stages:

    combiner   a Combiner over the frozen `embedder`'s features (CLIP4CIR's second stage alone)
    clip4cir   CLIP4CIR's full recipe: both CLIP encoders fine-tuned with the element-wise sum as the
               combining function (`imageloop.training.clip4cir`), then a Combiner over the fine-tuned,
               now frozen, encoders' features
    sprc       SPRC's BLIP-2 Q-Former with sentence-level prompts (`imageloop.training.sprc`)

    stage "pretrain"  synthetic triplets, `steps` steps, DRSP (p = 0.5) on the visual features
                      (`drsp_features="visual+text"`, ours, perturbs the text features too)
    stage "finetune"  real triplets (`real=`), `finetune_steps` steps, no DRSP, FRA's angular margin

A batch of triplets gives queries (reference image + change) that must each pick their own target among
the batch's targets (in-batch negatives). Frozen features are embedded once (cached in
`OUT/features.safetensors` by content hash, reused on resume).

A run in `out_dir` leaves the trained model (read by `imageloop.training.combiner.load_query_model`), the
loss curve (`loss_curve.json`, `.svg`) and checkpoints (`imageloop.training.checkpoints`). Calling
`train_cir` again on the same folder with the same data and settings resumes from the latest checkpoint
and draws the same batches and noise, so its loss curve is the one an uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from imageloop.errors import ConfigError
from imageloop.files import atomic_writer
from imageloop.protocols import Embedder
from imageloop.runtime import pick_device
from imageloop.tools.images import content_id, open_image
from imageloop.training.checkpoints import latest_checkpoint, save_checkpoint
from imageloop.training.combiner import Combiner, CombinerConfig, save_cir_model
from imageloop.training.drsp import DRSP
from imageloop.training.fra import FRALoss
from imageloop.training.options import DEFAULT_SPRC_BASE, CIRTrainingOptions
from imageloop.training.progress import (
    LossPoint,
    ProgressCallback,
    TrainProgress,
    TrainResult,
    finish_training,
)
from imageloop.training.triplets import Triplet, read_triplets

FEATURES_FILE = "features.safetensors"
_EMBED_CHUNK = 64


@dataclass(frozen=True)
class Stage:
    """One stretch of training: which part learns, on which triplets, how long, with which of DAIG's devices."""

    name: str
    part: str
    triplets: list[Triplet]
    steps: int
    drsp_probability: float
    margin: float
    label: str


class Part(Protocol):
    """What learns in one phase of a model's recipe (a Combiner, CLIP's encoders, SPRC's Q-Former)."""

    name: str

    @property
    def module(self) -> nn.Module:
        """What learns."""

    def start(self) -> None:
        """Get ready to learn: the parts before this one are final now (called again on resume)."""

    def optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        """A fresh optimizer for `stage`, the recipe's own."""

    def loss(self, triplets: Sequence[Triplet], drsp: DRSP, criterion: FRALoss) -> torch.Tensor:
        """The batch's contrastive loss, DRSP applied where the options say."""


def train_cir(
    triplets_dir: Path,
    out_dir: Path,
    *,
    embedder: Embedder | None,
    real: Path | None = None,
    image_folders: Sequence[Path] = (),
    options: CIRTrainingOptions | None = None,
    device: str | None = None,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train `options.model` on the synthetic triplets of `triplets_dir` (then the real ones of `real`) into `out_dir`.

    `embedder` gives the combiner its frozen features; clip4cir fine-tunes `options.base_model` (an open_clip
    spec, default the embedder's), sprc its BLIP-2 checkpoint. Triplet images may also lie in `image_folders`
    (see `read_triplets`). A run already in `out_dir` is resumed.
    """
    options = options or CIRTrainingOptions()
    if options.steps < 0:
        raise ConfigError(f"`steps` must not be negative, got {options.steps}")
    if options.batch_size < 2:
        raise ConfigError(f"`batch_size` must be at least 2 for in-batch negatives, got {options.batch_size}")
    if options.steps + (options.finetune_steps if real is not None else 0) == 0:
        raise ConfigError("nothing to train: give pre-training steps, or real triplets and fine-tuning steps")
    if options.model == "combiner" and (embedder is None or not embedder.embeds_images):
        named = embedder.model_id if embedder is not None else "no embedder"
        raise ConfigError(f"{named} embeds no images; the combiner needs an image-text embedder's features")
    device = pick_device(device)
    synthetic = read_triplets(triplets_dir, image_folders)
    real_triplets = read_triplets(real, image_folders) if real is not None else []
    identity = _identity(options, embedder)
    parts_order = {"combiner": ["combiner"], "clip4cir": ["encoders", "combiner"], "sprc": ["qformer"]}
    stages = _stages(parts_order[options.model], synthetic, real_triplets, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(stages, options, identity)
    everything = [t for stage in stages for t in stage.triplets]
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    # The run draws from torch's global generators (batches, dropout, DRSP); forking keeps the caller's.
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(options.seed)
        parts = _parts(options, embedder, identity, out_dir, everything, device)
        run = _Run(out_dir, stages, parts, options, fingerprint, device)
        started_at, started = run.step, time.perf_counter()
        total = sum(stage.steps for stage in stages)
        while run.step < total:
            loss = run.train_step()
            if progress is not None:
                progress(TrainProgress(run.stage.label, run.step, total, loss))
            if run.step % options.checkpoint_every == 0 or run.step == total or run.stage_ends():
                run.save_checkpoint()
        seconds = time.perf_counter() - started
    training = {
        "options": options.record(),
        **{f"{stage.label}_triplets": len(stage.triplets) for stage in stages},
        "final_loss": run.curve[-1].loss,
        "embedder": embedder.model_id if embedder is not None else None,
    }
    _save(options, parts, out_dir, identity, training)
    title = f"CIR {options.model} loss ({identity})"
    return finish_training(out_dir, run.curve, title, seconds=seconds, resumed_from_step=started_at)


def _identity(options: CIRTrainingOptions, embedder: Embedder | None) -> str:
    """What the model is trained from: the combiner's frozen embedder, the CLIP or BLIP-2 the others fine-tune."""
    if options.model == "combiner" and embedder is not None:
        return embedder.model_id
    if options.base_model:
        return options.base_model
    if options.model == "clip4cir" and embedder is not None:
        return embedder.model_id
    if options.model == "sprc":
        return DEFAULT_SPRC_BASE
    raise ConfigError("clip4cir fine-tunes a CLIP: name it with `base_model` or `embedder`")


def _stages(
    parts: Sequence[str], synthetic: list[Triplet], real: list[Triplet], options: CIRTrainingOptions
) -> list[Stage]:
    """Each part through DAIG's two stages in turn; a stage without steps (or data) is left out."""
    stages = []
    for part in parts:
        plan = [("pretrain", synthetic, options.steps, options.drsp_probability, 0.0)]
        if real:
            plan.append(("finetune", real, options.finetune_steps, 0.0, options.fra_margin))
        for name, triplets, steps, drsp, margin in plan:
            if steps == 0:
                continue
            if len(triplets) < 2:
                raise ConfigError(f"{name} needs at least 2 triplets (each batch contrasts a query with the others)")
            label = name if len(parts) == 1 else f"{part}:{name}"
            stages.append(Stage(name, part, triplets, steps, drsp, margin, label))
    return stages


def _fingerprint(stages: Sequence[Stage], options: CIRTrainingOptions, identity: str) -> str:
    """What must match for a checkpoint to be resumed: data, step counts, every option but how often to save."""
    data = {
        stage.label: {
            "steps": stage.steps,
            "triplets": [[t.id, str(t.reference_image), t.change, str(t.target_image)] for t in stage.triplets],
        }
        for stage in stages
    }
    knobs = options.model_dump(mode="json", exclude={"checkpoint_every"})
    blob = json.dumps({"options": knobs, "stages": data, "model": identity}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _parts(
    options: CIRTrainingOptions,
    embedder: Embedder | None,
    base: str,
    out_dir: Path,
    triplets: Sequence[Triplet],
    device: str,
) -> dict[str, Part]:
    """The model's parts, in the order they learn."""
    cache = out_dir / FEATURES_FILE
    if options.model == "combiner":
        assert embedder is not None  # train_cir checked it
        frozen = embedder
        return {"combiner": CombinerPart(embedder.dim, options, lambda: embed_all(cache, frozen, triplets), device)}
    if options.model == "clip4cir":
        from imageloop.training.clip4cir import EncodersPart

        encoders = EncodersPart(base, options, device)
        combiner = CombinerPart(
            encoders.dim, options, lambda: embed_all(cache, encoders.frozen_embedder(), triplets), device
        )
        return {"encoders": encoders, "combiner": combiner}
    from imageloop.training.sprc import SPRCPart

    return {"qformer": SPRCPart(base, options, device)}


def _save(
    options: CIRTrainingOptions, parts: dict[str, Part], out_dir: Path, identity: str, training: dict[str, Any]
) -> None:
    """Write the trained model folder (its config last: it marks the folder done)."""
    if options.model == "sprc":
        from imageloop.training.sprc import SPRCPart

        sprc = parts["qformer"]
        assert isinstance(sprc, SPRCPart)
        sprc.save(out_dir, training)
        return
    combiner = parts["combiner"]
    assert isinstance(combiner, CombinerPart)
    if options.model == "combiner":
        save_cir_model(out_dir, combiner.module, identity, training)
        return
    from imageloop.training.clip4cir import ENCODER_DIR, EncodersPart

    encoders = parts["encoders"]
    assert isinstance(encoders, EncodersPart)
    encoders.save(out_dir / ENCODER_DIR)
    save_cir_model(out_dir, combiner.module, identity, {**training, "model": "clip4cir"}, encoder=ENCODER_DIR)


# --- the Combiner, over features embedded once ------------------------------------------------------


class CombinerPart:
    """CLIP4CIR's Combiner learning over frozen features (the embedder's, or clip4cir's fine-tuned encoders')."""

    name = "combiner"

    def __init__(
        self, feature_dim: int, options: CIRTrainingOptions, features: Callable[[], Features], device: str
    ) -> None:
        self.options = options
        self.device = device
        self.module: Combiner = Combiner(CombinerConfig.for_features(feature_dim, options.dropout)).to(device)
        self._embed = features
        self._features: Features | None = None

    def start(self) -> None:
        """Embed (or read from the cache) every image and text the triplets use."""
        self.module.train()
        if self._features is None:
            self._features = self._embed()

    def optimizer(self, stage: Stage) -> torch.optim.Optimizer:
        """Adam, as CLIP4CIR's combiner_train.py; its pre-training or fine-tuning learning rate."""
        rate = self.options.learning_rate if stage.name == "pretrain" else self.options.finetune_learning_rate
        return torch.optim.Adam(self.module.parameters(), lr=rate)

    def loss(self, triplets: Sequence[Triplet], drsp: DRSP, criterion: FRALoss) -> torch.Tensor:
        """Each query (Combiner of the reference and change features) against the batch's targets."""
        assert self._features is not None  # start() ran
        images, texts, targets = self._features.batch(triplets, self.device)
        if self.options.drsp_features == "visual+text":
            texts = drsp(texts)
        loss: torch.Tensor = criterion(self.module(drsp(images), texts), targets)
        return loss


@dataclass(frozen=True)
class Features:
    """Feature rows by key (`image:<sha256 of file>`, `text:<sha256 of text>`), and each image's key."""

    rows: dict[str, torch.Tensor]
    image_keys: dict[Path, str]

    def batch(self, triplets: Sequence[Triplet], device: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reference-image, text and target-image features of `triplets`, one row each."""

        def stack(keys: list[str]) -> torch.Tensor:
            return torch.stack([self.rows[key] for key in keys]).to(device)

        return (
            stack([self.image_keys[t.reference_image] for t in triplets]),
            stack([_text_key(t.change) for t in triplets]),
            stack([self.image_keys[t.target_image] for t in triplets]),
        )


def _text_key(text: str) -> str:
    return "text:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def embed_all(cache_path: Path, embedder: Embedder, triplets: Sequence[Triplet]) -> Features:
    """Embed every image and text the triplets use that the cache lacks, then save the cache."""
    from safetensors.torch import load_file, save

    rows: dict[str, torch.Tensor] = {}
    if cache_path.is_file():
        from safetensors import safe_open

        with safe_open(str(cache_path), framework="pt") as f:
            same_embedder = (f.metadata() or {}).get("embedder") == embedder.model_id
        if same_embedder:
            rows = load_file(str(cache_path))
    paths = list(dict.fromkeys(p for t in triplets for p in (t.reference_image, t.target_image)))
    image_keys = {path: "image:" + content_id(path) for path in paths}
    missing_images = list({key: path for path, key in image_keys.items() if key not in rows}.items())
    for start in range(0, len(missing_images), _EMBED_CHUNK):
        chunk = missing_images[start : start + _EMBED_CHUNK]
        vectors = embedder.embed_images([open_image(path) for _, path in chunk])
        rows.update({key: torch.from_numpy(vector.copy()) for (key, _), vector in zip(chunk, vectors, strict=True)})
    texts = list(dict.fromkeys(t.change for t in triplets if _text_key(t.change) not in rows))
    for start in range(0, len(texts), _EMBED_CHUNK):
        chunk_texts = texts[start : start + _EMBED_CHUNK]
        vectors = embedder.embed_texts(chunk_texts)
        rows.update({_text_key(text): torch.from_numpy(v.copy()) for text, v in zip(chunk_texts, vectors, strict=True)})
    if missing_images or texts:
        with atomic_writer(cache_path) as f:
            f.write(save(rows, metadata={"embedder": embedder.model_id}))
    return Features(rows, image_keys)


# --- the run: parts, optimizer, generators, curve; checkpointed together ---------------------------


class _Run:
    """One training run's mutable state, created fresh or from the latest checkpoint in `out_dir`."""

    def __init__(
        self,
        out_dir: Path,
        stages: list[Stage],
        parts: dict[str, Part],
        options: CIRTrainingOptions,
        fingerprint: str,
        device: str,
    ) -> None:
        self.out_dir = out_dir
        self.stages = stages
        self.parts = parts
        self.options = options
        self.fingerprint = fingerprint
        self.device = device
        self.step = 0
        self.curve: list[LossPoint] = []
        checkpoint = latest_checkpoint(out_dir, fingerprint, device)
        if checkpoint is not None:
            for name, part in parts.items():
                prefix = f"{name}."
                part.module.load_state_dict(
                    {k.removeprefix(prefix): v for k, v in checkpoint.weights.items() if k.startswith(prefix)}
                )
            self.step = checkpoint.step
            self.curve = [LossPoint(**point) for point in checkpoint.state["loss_curve"]]
            self.stage = next(stage for stage in stages if stage.label == checkpoint.state["stage"])
        else:
            self.stage = stages[0]
        self.optimizer = self._enter(self.stage)
        if checkpoint is not None:
            self.optimizer.load_state_dict(checkpoint.optimizer)

    def _enter(self, stage: Stage) -> torch.optim.Optimizer:
        """Make `stage`'s part the one learning (the others frozen) and give it a fresh optimizer."""
        for name, part in self.parts.items():
            part.module.requires_grad_(name == stage.part)
        part = self.parts[stage.part]
        part.start()
        return part.optimizer(stage)

    def _stage_at(self, step: int) -> Stage:
        """The stage that trains step `step + 1`."""
        for stage in self.stages:
            if step < stage.steps:
                return stage
            step -= stage.steps
        return self.stages[-1]

    def stage_ends(self) -> bool:
        """Whether the step just taken was its stage's last."""
        return self._stage_at(self.step) is not self.stage

    def train_step(self) -> float:
        """Take one optimisation step on a random batch of the current stage; return its loss."""
        stage = self._stage_at(self.step)
        if stage is not self.stage:
            # A new stage starts its own optimizer: its learning rate, no momentum carried from the last.
            self.stage, self.optimizer = stage, self._enter(stage)
        size = min(self.options.batch_size, len(stage.triplets))
        chosen = torch.randperm(len(stage.triplets))[:size].tolist()
        drsp = DRSP(stage.drsp_probability).train()
        criterion = FRALoss(stage.margin, self.options.temperature)
        loss = self.parts[stage.part].loss([stage.triplets[i] for i in chosen], drsp, criterion)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[no-untyped-call]
        self.optimizer.step()
        self.step += 1
        self.curve.append(LossPoint(self.step, stage.label, float(loss.item())))
        return self.curve[-1].loss

    def save_checkpoint(self) -> None:
        """Checkpoint every part's weights, the optimizer, the generators and the curve."""
        weights = {f"{name}.{k}": v for name, part in self.parts.items() for k, v in part.module.state_dict().items()}
        state = {"stage": self.stage.label, "loss_curve": [asdict(point) for point in self.curve]}
        save_checkpoint(
            self.out_dir, self.step, weights=weights, optimizer=self.optimizer, state=state,
            fingerprint=self.fingerprint, device=self.device,
        )  # fmt: skip
