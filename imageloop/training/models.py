"""A trained model folder, whichever `train cir` model made it: the query model it serves, the embedder it doubles as.

A combiner folder serves queries over the frozen embedder it was trained on, and an index built with that
embedder. A clip4cir or sprc folder fine-tuned its own encoders, so the vectors of an index built with the
frozen embedder are not its own: the folder doubles as the embedder `cir:FOLDER` (its fine-tuned image and
text encoders), an index built with that embedder holds vectors it can search, and its query model refuses
any other index (`require_embedder`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop.errors import ConfigError
from imageloop.protocols import Embedder
from imageloop.training.combiner import MODEL_CONFIG, MODEL_FORMAT, CIRModel, own_embedder_id

if TYPE_CHECKING:
    from imageloop.graphs.cir import ComposedQueryModel


def read_model_config(directory: Path) -> dict[str, Any]:
    """A model folder's `config.json`, or one line saying the folder holds no trained model."""
    path = directory / MODEL_CONFIG
    if not path.is_file():
        raise ConfigError(f"{directory}: no trained CIR model here (expected {MODEL_CONFIG}; run `train cir` first)")
    config: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return config


def load_query_model(directory: Path) -> ComposedQueryModel:
    """The composed-query model of a folder `train cir` wrote, on the CPU."""
    from imageloop.training.sprc import SPRC_FORMAT

    if read_model_config(directory).get("format") == SPRC_FORMAT:
        from imageloop.training.sprc import SPRCModel

        return SPRCModel.load(directory)
    return CIRModel.load(directory)


def cir_embedder(directory: Path, device: str | None = None, dtype: str | None = None) -> Embedder:
    """`cir:FOLDER`: the fine-tuned encoders of a clip4cir or sprc model folder, as the embedder to index with."""
    config = read_model_config(directory)
    from imageloop.training.sprc import SPRC_FORMAT

    if config.get("format") == SPRC_FORMAT:
        from imageloop.training.sprc import SPRCEmbedder

        return SPRCEmbedder(directory, device=device, dtype=dtype)
    if config.get("format") == MODEL_FORMAT and config.get("encoder"):
        from imageloop.tools.embedders.local import OpenClipEmbedder

        encoder = directory / str(config["encoder"])
        return OpenClipEmbedder(
            f"local-dir:{encoder}", None, model_id=own_embedder_id(directory), device=device, dtype=dtype
        )
    if config.get("format") == MODEL_FORMAT:
        raise ConfigError(
            f"{directory} is a Combiner over the frozen features of {config.get('embedder')}: index with "
            f"`embedder` {config.get('embedder')}; only models that fine-tune their encoders are embedders"
        )
    raise ConfigError(f"{directory}: {config.get('format')!r} is not a CIR model format this version reads")
