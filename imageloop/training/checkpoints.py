"""A training run's checkpoints, shared by both trainings: written whole or not at all, resumed exactly.

`OUT/checkpoints/step-N/` holds the learning weights (`model.safetensors`), the optimizer's state and the
random generators' states (`optimizer.safetensors`), and the rest as JSON (`state.json`: the run's
fingerprint, its step, its loss curve, the optimizer's parameter groups). A checkpoint is written into a
hidden temporary folder and renamed into place; only then does `latest.json` (written atomically) name
it, and only then are older ones removed. A process killed at any moment (`kill -9` included) leaves
`latest.json` naming a whole checkpoint, or no `latest.json` at all.

The fingerprint is what must match for a run to be resumed (its data and every setting that changes the
result); a folder holding another run's checkpoints is refused rather than continued.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from imageloop.errors import ConfigError
from imageloop.files import fsync_folder, write_json_atomic

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest.json"
FORMAT = "imageloop-checkpoint/1"


@dataclass(frozen=True)
class Checkpoint:
    """One resumable moment of a run: its step, its JSON state, its weights and its optimizer's state dict."""

    step: int
    state: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]


def save_checkpoint(
    out_dir: Path,
    step: int,
    *,
    weights: Mapping[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    state: Mapping[str, Any],
    fingerprint: str,
    device: str,
) -> None:
    """Write step `step`'s checkpoint, point `latest.json` at it, then drop the older ones."""
    from safetensors.torch import save_file

    root = out_dir / CHECKPOINTS_DIR
    name = f"step-{step:07d}"
    tmp = root / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
    tensors, param_groups = _flatten_optimizer(optimizer.state_dict())
    tensors["rng.cpu"] = torch.get_rng_state()
    if device.startswith("cuda"):
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    full = {**state, "format": FORMAT, "fingerprint": fingerprint, "step": step, "param_groups": param_groups}
    write_json_atomic(tmp / "state.json", full)
    fsync_folder(tmp)
    shutil.rmtree(root / name, ignore_errors=True)
    tmp.rename(root / name)
    fsync_folder(root)
    write_json_atomic(root / LATEST, {"step": step, "directory": name})
    for old in root.glob("step-*"):
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(out_dir: Path, fingerprint: str, device: str) -> Checkpoint | None:
    """The newest checkpoint in `out_dir`, its random generators restored; None without one.

    A checkpoint of another run (another fingerprint) is refused in one line.
    """
    from safetensors.torch import load_file

    latest = out_dir / CHECKPOINTS_DIR / LATEST
    if not latest.is_file():
        return None
    directory = latest.parent / json.loads(latest.read_text(encoding="utf-8"))["directory"]
    state = json.loads((directory / "state.json").read_text(encoding="utf-8"))
    if state.get("format") != FORMAT or state.get("fingerprint") != fingerprint:
        raise ConfigError(
            f"{out_dir} holds a training run with other data or settings; pass another output folder, "
            f"or delete {latest.parent} to start over there"
        )
    tensors = load_file(str(directory / "optimizer.safetensors"))
    torch.set_rng_state(tensors["rng.cpu"])
    if device.startswith("cuda") and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)
    return Checkpoint(
        step=int(state["step"]),
        state=state,
        weights=load_file(str(directory / "model.safetensors"), device=device),
        optimizer=_unflatten_optimizer(tensors, state["param_groups"]),
    )


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
