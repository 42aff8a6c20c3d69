"""The one table of defaults and bounds: every face (CLI, MCP, LangChain tools, LangGraph Server, UI) and every
graph reads its limits here, so a value refused on one face is refused on all, with the same words.

A bound protects the machine (an image side of 100,000 px allocates until the kernel kills the process)
and keeps an agent's argument sane (k ≤ 50 results fit in a tool answer). Settings validate against
these bounds, the faces build their argument schemas from them, and `check` turns a value past a bound
into a one-line `ConfigError` naming the bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from imageloop.errors import ConfigError


@dataclass(frozen=True)
class Bound:
    """An inclusive range and the default a face shows when the value is not given."""

    low: float
    high: float
    default: float | None
    description: str

    def check(self, name: str, value: float | None) -> None:
        """Refuse `value` outside the range, in one line naming the bound."""
        if value is not None and not self.low <= value <= self.high:
            raise ConfigError(f"{name} {_number(value)} is out of range: {_number(self.low)}..{_number(self.high)}")


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


# Text and paths.
PROMPT_CHARS = 4000
"""The longest prompt, query, change text or feedback; a 100k-character prompt made a generator allocate 40 GB."""
PATH_CHARS = 4096
SIDECAR_BYTES = 64 * 1024
"""The largest sidecar caption (`NAME.txt`) or metadata (`NAME.json`) read beside an image."""

# Pictures: both sides bounded, so no size can exhaust memory before a model sees it.
MIN_SIDE, MAX_SIDE = 16, 2048
MAX_REFERENCES = 16
"""The most reference images one generation takes (GPT-Image's `images.edit` limit)."""
MAX_CONCURRENT_REQUESTS = 8
"""Requests in flight at once to one OpenAI-compatible endpoint by default: enough for vLLM to batch them."""

# Remote calls (OpenAI-compatible endpoints, Weaviate): how long one try may take when `request_timeout`
# is not set. A hung chat or embeddings endpoint then fails in 2 x 20 s; image generation gets longer,
# since gpt-image-1 itself may take up to two minutes before it sends a byte.
REQUEST_TIMEOUT_S = 20.0
GENERATION_TIMEOUT_S = 120.0

BOUNDS: dict[str, Bound] = {
    # ImageRAG
    "max_iterations": Bound(1, 10, 1, "regenerations with references before stopping (the paper: one pass)"),
    "top_k": Bound(1, 8, 1, "references retrieved per missing concept"),
    "max_concepts": Bound(1, 10, 3, "at most this many missing concepts per critique"),
    "similarity_threshold": Bound(-1.0, 1.0, None, "drop retrieved references whose cosine is below this"),
    # Drawing
    "seed": Bound(0, 2**32 - 1, 0, "generator seed"),
    "steps": Bound(1, 200, None, "denoising steps of diffusion backends (default per backend)"),
    "guidance_scale": Bound(0.0, 50.0, None, "diffusers guidance scale (default per backend)"),
    # Retrieval and GenIR
    "k": Bound(1, 50, 10, "results per query or per round"),
    "rounds": Bound(0, 20, 10, "GenIR refinement rounds after round 0 (the paper: 10, reported as rounds 0..10)"),
    "rank_depth": Bound(1, 100_000, 1000, "GenIR evaluation: ranks deeper than this count as misses"),
    "hybrid_threshold": Bound(-1.0, 1.0, 0.9, "GenIR hybrid feedback: show the top hit from this similarity"),
    # Remote calls
    "request_timeout": Bound(
        1,
        600,
        None,
        f"seconds one remote call may take (default {REQUEST_TIMEOUT_S:g}; image generation {GENERATION_TIMEOUT_S:g})",
    ),
    "max_retries": Bound(0, 10, 1, "retries of a remote call that timed out or got a 429 or 5xx"),
    # Composed image retrieval (CIR) and DAIG's triplet synthesis
    "fusion_lambda": Bound(
        0.0,
        1.0,
        0.65,
        "CIR proxy fusion: S = λ·S_text + (1−λ)·S_text·S_proxy (Imagine-and-Seek: 0.65 ViT-L, 0.3 ViT-g)",
    ),
    "verify": Bound(0, 5, 0, "CIR: times a VLM may check the top hit and rewrite the description (0: off)"),
    "rerank_depth": Bound(1, 1000, 100, "CIR proxy fusion: re-rank the union of this many text and proxy hits"),
    "triplets": Bound(1, 1_000_000, None, "DAIG: triplets the dataset folder should hold"),
    "triplet_concurrency": Bound(1, 16, 2, "DAIG: triplets scripted and drawn at once (their model calls batched)"),
    "max_attempts": Bound(1, 10, 3, "DAIG with check: drawings of one triplet at most before it counts as rejected"),
    "hybrid_visual_fraction": Bound(0.0, 1.0, 0.223, "GenIR random hybrid: share of queries shown visual feedback"),
    "user_temperature": Bound(0.0, 2.0, None, "simulated user's sampling temperature (default per style)"),
    "user_top_p": Bound(0.0, 1.0, None, "simulated user's nucleus sampling top_p (default per style)"),
    "user_repetition_penalty": Bound(0.5, 2.0, None, "simulated user's repetition penalty (default per style)"),
    "sample": Bound(1, 1_000_000, None, "benchmark targets drawn (seeded); all if unset"),
    # RAGE
    "max_generations": Bound(1, 10, 3, "RAGE: images drawn at most while a review asks for another"),
    "auto_select": Bound(0, MAX_REFERENCES, 0, "RAGE: pick the top N candidates without a person (0: a person picks)"),
    # Jobs
    "batch_size": Bound(1, 256, 32, "images embedded per batch while indexing"),
    "threads": Bound(
        1, 1024, None, "threads that build the embedded store's search index (default: every core this process may use)"
    ),
    "concurrency": Bound(1, 64, 1, "evaluation targets searched at once"),
    # Ray: the workers of a job on a cluster (`imageloop[ray]`)
    "workers": Bound(1, 4096, None, "Ray workers, each holding its models once (default: one per GPU, else per CPUs)"),
    "gpus_per_worker": Bound(0, 8, None, "GPUs each Ray worker holds; 0.5 puts two on one GPU (default 1 if any)"),
    "cpus_per_worker": Bound(0.1, 256, 1, "CPUs each Ray worker holds"),
    "max_batch": Bound(
        1, 256, None, "local models: requests in one batched call at most (default 8 pictures, 16 VLM turns, 64 items)"
    ),
    "max_concurrent_requests": Bound(
        1, 1024, MAX_CONCURRENT_REQUESTS, "OpenAI-compatible endpoints: requests in flight at once, each (vLLM batches)"
    ),
    "wait_seconds": Bound(0, 50, 40, "how long an agent's call waits for a run before returning its id to poll"),
    "max_images": Bound(0, 16, 10, "thumbnails in one tool answer"),
}


def default(name: str) -> float | None:
    """The default of bound `name`."""
    return BOUNDS[name].default


def check(name: str, value: float | None) -> None:
    """Refuse `value` if it is past bound `name`."""
    BOUNDS[name].check(name, value)


def check_text(name: str, text: str, *, required: bool = True) -> str:
    """`text` stripped; refused when empty (if required) or longer than `PROMPT_CHARS`."""
    stripped = text.strip()
    if required and not stripped:
        raise ConfigError(f"{name} is empty")
    if len(stripped) > PROMPT_CHARS:
        raise ConfigError(f"{name} has {len(stripped):,} characters; at most {PROMPT_CHARS:,}")
    return stripped


def check_size(size: tuple[int, int] | None) -> tuple[int, int] | None:
    """An image size (width, height) with both sides within MIN_SIDE..MAX_SIDE (None: the backend's default)."""
    return None if size is None else _bounded_size(*size)


# ASCII digits only (str.isdigit accepts "²", which int() refuses), and few enough of them that int()
# never meets Python's digit limit; anything longer is past MAX_SIDE anyway.
_SIZE = re.compile(r"\s*([0-9]{1,9})\s*[xX]\s*([0-9]{1,9})\s*", re.ASCII)


def parse_size(text: str) -> tuple[int, int]:
    """`WIDTHxHEIGHT` (e.g. 1024x1024), bounded as `check_size` bounds it."""
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ConfigError(f"size {text[:40]!r}: expected WIDTHxHEIGHT such as 1024x1024")
    return _bounded_size(int(match[1]), int(match[2]))


def _bounded_size(width: int, height: int) -> tuple[int, int]:
    if not (MIN_SIDE <= width <= MAX_SIDE and MIN_SIDE <= height <= MAX_SIDE):
        raise ConfigError(f"size {width}x{height} is out of range: each side {MIN_SIDE}..{MAX_SIDE} pixels")
    return width, height
