"""`tiny:clip`: a random two-layer open_clip model, saved the way a real open_clip checkpoint folder is.

The folder holds `open_clip_config.json` (model and preprocess config) and
`open_clip_model.safetensors`, so the backend loads it with `local-dir:` exactly as it would a
downloaded `hf-hub:` repository. It keeps CLIP's real tokenizer (vocabulary and 77-token context), so
long captions exercise truncation, and shrinks everything else: 32x32 pictures, 32-wide towers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imageloop.tiny import seeded, tiny_model_dir

TINY_CLIP_CONFIG: dict[str, Any] = {
    "model_cfg": {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {
        "mean": [0.48145466, 0.4578275, 0.40821073],
        "std": [0.26862954, 0.26130258, 0.27577711],
        "interpolation": "bicubic",
        "resize_mode": "shortest",
    },
}


def build_tiny_clip(directory: Path) -> None:
    """Write the tiny model into `directory`: the same weights for the same TINY_SEED, in any process."""
    import open_clip
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    with seeded():
        model = open_clip.CLIP(**TINY_CLIP_CONFIG["model_cfg"])
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(state, str(directory / "open_clip_model.safetensors"))
    (directory / "open_clip_config.json").write_text(json.dumps(TINY_CLIP_CONFIG, indent=2) + "\n")


def tiny_clip_dir() -> Path:
    """The tiny CLIP folder in the tiny-model cache, built on first use."""
    return tiny_model_dir("clip", build_tiny_clip)
