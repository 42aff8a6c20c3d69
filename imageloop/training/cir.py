"""Training the composed-query model as DAIG does: pre-train on synthetic triplets with DRSP, fine-tune with FRA.

The embedder stays frozen, so every image and text is embedded once (cached in `OUT/features.safetensors`
by content hash, reused on resume) and training runs on vectors: a batch of triplets gives reference
image features, modification-text features and target image features; the Combiner turns the first two
into queries, and each query must pick its own target among the batch's targets (in-batch negatives).

    stage "pretrain"  synthetic triplets, DRSP (p = 0.5) on both input features, plain contrastive loss
    stage "finetune"  real triplets (`real=`), no DRSP, FRA's angular margin on the matching pairs

A run in `out_dir` leaves the trained model (`model.safetensors` + `config.json`, read by
`CIRModel.load`), the loss curve (`loss_curve.json`, `loss_curve.svg`) and checkpoints
(`checkpoints/step-N/`: weights, optimizer state and random-generator states as safetensors, the rest
as JSON). Calling `train_cir` again on the same folder with the same data and settings resumes from the
latest checkpoint and draws the same batches and noise, so its loss curve is the one an uninterrupted
run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from imageloop.errors import ConfigError
from imageloop.files import atomic_writer, write_json_atomic
from imageloop.protocols import Embedder
from imageloop.runtime import pick_device
from imageloop.tools.images import content_id, open_image
from imageloop.training.combiner import Combiner, CombinerConfig, save_cir_model
from imageloop.training.drsp import DEFAULT_PROBABILITY, DRSP
from imageloop.training.fra import DEFAULT_MARGIN, DEFAULT_TEMPERATURE, FRALoss
from imageloop.training.progress import (
    LossPoint,
    ProgressCallback,
    TrainProgress,
    TrainResult,
    finish_training,
)
from imageloop.training.triplets import Triplet, read_triplets

DEFAULT_STEPS = 1000
DEFAULT_FINETUNE_STEPS = 200
FEATURES_FILE = "features.safetensors"
CHECKPOINTS_DIR = "checkpoints"
_LATEST = "latest.json"
_CHECKPOINT_FORMAT = "imageloop-cir-checkpoint/1"
_EMBED_CHUNK = 64


@dataclass(frozen=True)
class CIRTrainingOptions:
    """How `train_cir` trains; the paper's knobs (DRSP probability, FRA margin, temperature) included."""

    batch_size: int = 64
    learning_rate: float = 1e-4
    finetune_learning_rate: float = 2e-5
    drsp_probability: float = DEFAULT_PROBABILITY
    fra_margin: float = DEFAULT_MARGIN
    temperature: float = DEFAULT_TEMPERATURE
    dropout: float = 0.5
    checkpoint_every: int = 100
    seed: int = 0
    device: str | None = None
    """Where to train (None: CUDA, then MPS, else CPU)."""


@dataclass(frozen=True)
class _Stage:
    name: str
    triplets: list[Triplet]
    steps: int
    learning_rate: float
    drsp_probability: float
    margin: float


def train_cir(
    triplets_dir: Path,
    out_dir: Path,
    *,
    embedder: Embedder,
    real: Path | None = None,
    steps: int = DEFAULT_STEPS,
    finetune_steps: int = DEFAULT_FINETUNE_STEPS,
    options: CIRTrainingOptions = CIRTrainingOptions(),
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train a composed-query model on `embedder`'s frozen features into `out_dir`, resuming a run there.

    `steps` pre-train on the synthetic triplets of `triplets_dir`; `finetune_steps` then fine-tune on
    the real triplets of `real` (skipped without it). `progress` hears about every step.
    """
    _check(options, steps, finetune_steps if real is not None else 0, embedder)
    device = pick_device(options.device)
    stages = [
        _Stage("pretrain", read_triplets(triplets_dir), steps, options.learning_rate, options.drsp_probability, 0.0)
    ]
    if real is not None:
        stages.append(
            _Stage(
                "finetune", read_triplets(real), finetune_steps, options.finetune_learning_rate, 0.0, options.fra_margin
            )
        )
    stages = [stage for stage in stages if stage.steps > 0]
    for stage in stages:
        if len(stage.triplets) < 2:
            raise ConfigError(f"{stage.name} needs at least 2 triplets (each batch contrasts a query with the others)")
    total = sum(stage.steps for stage in stages)
    out_dir.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(stages, options, embedder.model_id)
    features = _embed_all(out_dir / FEATURES_FILE, embedder, [t for stage in stages for t in stage.triplets])
    training = {
        "steps": steps,
        "finetune_steps": finetune_steps if real is not None else 0,
        **{f"{stage.name}_triplets": len(stage.triplets) for stage in stages},
        "options": asdict(options),
    }
    # The run draws from torch's global generators (batches, dropout, DRSP); forking keeps the caller's.
    cuda = [torch.device(device).index or 0] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(options.seed)
        run = _Run(out_dir, stages, options, fingerprint, device, embedder.dim)
        started_at, started = run.step, time.perf_counter()
        while run.step < total:
            loss = run.train_step(features)
            if progress is not None:
                progress(TrainProgress(run.stage.name, run.step, total, loss))
            if run.step % options.checkpoint_every == 0 or run.step == total or run.stage_ends():
                run.save_checkpoint()
        seconds = time.perf_counter() - started
    save_cir_model(out_dir, run.combiner, embedder.model_id, {**training, "final_loss": run.curve[-1].loss})
    title = f"CIR combiner loss ({embedder.model_id})"
    return finish_training(out_dir, run.curve, title, seconds=seconds, resumed_from_step=started_at)


def _check(options: CIRTrainingOptions, steps: int, finetune_steps: int, embedder: Embedder) -> None:
    if steps < 0 or finetune_steps < 0:
        raise ConfigError(f"step counts must not be negative (got {steps} and {finetune_steps})")
    if steps + finetune_steps == 0:
        raise ConfigError("nothing to train: give pre-training steps, or real triplets and fine-tuning steps")
    if options.batch_size < 2:
        raise ConfigError(f"batch_size must be at least 2 for in-batch negatives, got {options.batch_size}")
    if options.checkpoint_every < 1:
        raise ConfigError(f"checkpoint_every must be at least 1, got {options.checkpoint_every}")
    if not 0.0 <= options.dropout < 1.0:
        raise ConfigError(f"dropout must lie in [0, 1), got {options.dropout}")
    if options.learning_rate <= 0 or options.finetune_learning_rate <= 0:
        raise ConfigError("learning rates must be positive")
    # The paper's knobs are checked where they live, before any embedding work.
    DRSP(options.drsp_probability)
    FRALoss(options.fra_margin, options.temperature)
    if not embedder.embeds_images:
        raise ConfigError(f"{embedder.model_id} embeds no images; CIR training needs an image-text embedder")


def _fingerprint(stages: Sequence[_Stage], options: CIRTrainingOptions, embedder_id: str) -> str:
    """What must match for a checkpoint to be resumed: data, step counts, every knob but where and how often."""
    knobs = {k: v for k, v in asdict(options).items() if k not in ("checkpoint_every", "device")}
    data = {
        stage.name: {
            "steps": stage.steps,
            "triplets": [[t.id, str(t.reference_image), t.change, str(t.target_image)] for t in stage.triplets],
        }
        for stage in stages
    }
    blob = json.dumps({"options": knobs, "stages": data, "embedder": embedder_id}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- features: each image and text embedded once --------------------------------------------------


@dataclass(frozen=True)
class _Features:
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


def _embed_all(cache_path: Path, embedder: Embedder, triplets: Sequence[Triplet]) -> _Features:
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
    return _Features(rows, image_keys)


# --- the run: model, optimizer, generators, curve; checkpointed together ---------------------------


class _Run:
    """One training run's mutable state, created fresh or from the latest checkpoint in `out_dir`."""

    def __init__(
        self,
        out_dir: Path,
        stages: list[_Stage],
        options: CIRTrainingOptions,
        fingerprint: str,
        device: str,
        feature_dim: int,
    ) -> None:
        self.out_dir = out_dir
        self.stages = stages
        self.options = options
        self.fingerprint = fingerprint
        self.device = device
        self.combiner = Combiner(CombinerConfig.for_features(feature_dim, options.dropout)).to(device)
        self.combiner.train()
        self.step = 0
        self.curve: list[LossPoint] = []
        self.stage = stages[0]
        self.optimizer = self._optimizer(self.stage)
        self._resume()

    def _optimizer(self, stage: _Stage) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.combiner.parameters(), lr=stage.learning_rate)

    def _stage_at(self, step: int) -> _Stage:
        """The stage that trains step `step + 1`."""
        for stage in self.stages:
            if step < stage.steps:
                return stage
            step -= stage.steps
        return self.stages[-1]

    def stage_ends(self) -> bool:
        """Whether the step just taken was its stage's last."""
        return self._stage_at(self.step) is not self.stage

    def train_step(self, features: _Features) -> float:
        """Take one optimisation step on a random batch of the current stage; return its loss."""
        stage = self._stage_at(self.step)
        if stage is not self.stage:
            # A new stage starts its own optimizer: its learning rate, no momentum carried from the last.
            self.stage, self.optimizer = stage, self._optimizer(stage)
        size = min(self.options.batch_size, len(stage.triplets))
        chosen = torch.randperm(len(stage.triplets))[:size].tolist()
        images, texts, targets = features.batch([stage.triplets[i] for i in chosen], self.device)
        drsp = DRSP(stage.drsp_probability).train()
        queries = self.combiner(drsp(images), drsp(texts))
        loss = FRALoss(stage.margin, self.options.temperature)(queries, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step += 1
        self.curve.append(LossPoint(self.step, stage.name, float(loss.item())))
        return self.curve[-1].loss

    # Checkpoints: checkpoints/step-N/{model,optimizer}.safetensors + state.json; latest.json names the newest.

    def save_checkpoint(self) -> None:
        """Write this step's checkpoint, point `latest.json` at it, then drop the older ones."""
        from safetensors.torch import save_file

        root = self.out_dir / CHECKPOINTS_DIR
        name = f"step-{self.step:07d}"
        tmp = root / f".{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in self.combiner.state_dict().items()}, tmp / "model.safetensors"
        )
        tensors, param_groups = _flatten_optimizer(self.optimizer.state_dict())
        tensors["rng.cpu"] = torch.get_rng_state()
        if self.device.startswith("cuda"):
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        save_file(tensors, tmp / "optimizer.safetensors")
        state = {
            "format": _CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "step": self.step,
            "stage": self.stage.name,
            "param_groups": param_groups,
            "loss_curve": [asdict(point) for point in self.curve],
        }
        write_json_atomic(tmp / "state.json", state)
        shutil.rmtree(root / name, ignore_errors=True)
        tmp.rename(root / name)
        write_json_atomic(root / _LATEST, {"step": self.step, "directory": name})
        for old in root.glob("step-*"):
            if old.name != name:
                shutil.rmtree(old, ignore_errors=True)

    def _resume(self) -> None:
        from safetensors.torch import load_file

        latest = self.out_dir / CHECKPOINTS_DIR / _LATEST
        if not latest.is_file():
            return
        directory = latest.parent / json.loads(latest.read_text(encoding="utf-8"))["directory"]
        state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
        if state.get("format") != _CHECKPOINT_FORMAT or state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"{self.out_dir} holds a training run with other data or settings; pass another output folder, "
                f"or delete {latest.parent} to start over there"
            )
        self.combiner.load_state_dict(load_file(str(directory / "model.safetensors"), device=self.device))
        tensors = load_file(str(directory / "optimizer.safetensors"))
        self.step = state["step"]
        self.curve = [LossPoint(**point) for point in state["loss_curve"]]
        self.stage = next(stage for stage in self.stages if stage.name == state["stage"])
        self.optimizer = self._optimizer(self.stage)
        self.optimizer.load_state_dict(_unflatten_optimizer(tensors, state["param_groups"]))
        torch.set_rng_state(tensors["rng.cpu"])
        if self.device.startswith("cuda") and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], list[dict[str, Any]]]:
    """An optimizer's state as flat tensors (`optimizer.<param>.<name>`) plus its JSON-able param groups."""
    tensors = {
        f"optimizer.{index}.{name}": value.detach().cpu().contiguous()
        for index, values in state_dict["state"].items()
        for name, value in values.items()
    }
    return tensors, state_dict["param_groups"]


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], param_groups: list[dict[str, Any]]) -> dict[str, Any]:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": param_groups}
