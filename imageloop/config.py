"""One typed settings object, named profiles, and the `PROVIDER:MODEL` role strings.

Precedence, lowest first: field defaults < profile < environment (`IMAGELOOP_*`) < explicit
arguments (CLI options). Endpoint settings fall back to the OpenAI client's own variables
(`OPENAI_BASE_URL`, `OPENAI_API_KEY`), so any OpenAI-compatible server works unchanged.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from imageloop import limits
from imageloop.errors import ConfigError
from imageloop.knobs import CIRKnobs, GenIREvalKnobs, ImageRAGKnobs, RAGEKnobs, one_line

Role = Literal["vlm", "generator", "embedder", "captioner"]
ROLES: tuple[Role, ...] = ("vlm", "generator", "embedder", "captioner")
StoreKind = Literal["embedded", "chroma", "weaviate"]
STORE_KINDS: tuple[StoreKind, ...] = ("embedded", "chroma", "weaviate")


def bounded(name: str, *, unset: bool = False, description: str | None = None) -> Any:
    """A pydantic field with the default, range and description of bound `name` in `imageloop.limits`.

    Settings use it, and so do the faces' argument schemas (MCP tools, LangChain tools), which is how a
    bound is the same on every face. `unset` makes the default None: "the application's setting".
    """
    bound = limits.BOUNDS[name]
    default = None if unset else bound.default
    return Field(default, ge=bound.low, le=bound.high, description=description or bound.description)


@dataclass(frozen=True)
class RoleSpec:
    """A parsed `PROVIDER:MODEL` string, e.g. `openai:gpt-4.1-mini`."""

    provider: str
    model: str

    @classmethod
    def parse(cls, text: str, role: str) -> RoleSpec:
        """Split `PROVIDER:MODEL`; the model part may itself contain colons (`ollama` tags)."""
        provider, sep, model = text.partition(":")
        if not sep or not provider.strip() or not model.strip():
            raise ConfigError(f"`{role}` {text!r}: expected PROVIDER:MODEL, e.g. openai:gpt-4.1-mini")
        return cls(provider.strip().lower(), model.strip())

    def __str__(self) -> str:
        return f"{self.provider}:{self.model}"


@dataclass(frozen=True)
class Endpoint:
    """Where an OpenAI-compatible role sends its requests, and how long it waits; None: the defaults.

    `timeout` is the seconds one try may take, `max_retries` how often a timed-out, 429 or 5xx call is
    tried again, `max_concurrent_requests` how many requests this process keeps in flight to the
    endpoint (defaults in `imageloop.limits`).
    """

    base_url: str | None = None
    api_key: str | None = None
    max_concurrent_requests: int = limits.MAX_CONCURRENT_REQUESTS
    timeout: float | None = None
    max_retries: int | None = None


class ModelSettings(BaseModel):
    """What the process runs on: models, endpoints, devices and stores (the loops' knobs are in `imageloop.knobs`)."""

    model_config = ConfigDict(extra="forbid")

    vlm: str | None = Field(None, description="critic and query rewriter, PROVIDER:MODEL")
    generator: str | None = Field(None, description="image generator, PROVIDER:MODEL")
    embedder: str | None = Field(None, description="retrieval embedder, PROVIDER:MODEL")
    captioner: str | None = Field(None, description="captions images while indexing; defaults to the VLM")
    vlm_base_url: str | None = None
    generator_base_url: str | None = None
    embedder_base_url: str | None = None
    captioner_base_url: str | None = None
    vlm_api_key: str | None = None
    generator_api_key: str | None = None
    embedder_api_key: str | None = None
    captioner_api_key: str | None = None
    max_concurrent_requests: int = bounded("max_concurrent_requests")
    max_batch: int | None = bounded("max_batch")
    sdxl_max_references: int = Field(1, ge=1, le=3, description="sdxl-ip-adapter: references (the paper: 1)")
    eval_clip: str = Field("open_clip:ViT-L-14/openai", description="eval imagerag: CLIP text-image scorer")
    eval_siglip: str = Field(
        "open_clip:ViT-SO400M-14-SigLIP-384/webli", description="eval imagerag: SigLIP text-image scorer"
    )
    eval_dino: str = Field("transformers:facebook/dinov2-base", description="eval imagerag: DINO image-image scorer")
    judge: str | None = Field(None, description="eval imagerag: the VLM judge, PROVIDER:MODEL (default: the --vlm)")
    device: str | None = Field(None, description="local models: cuda, cuda:1, mps or cpu; best available if None")
    dtype: str | None = Field(None, description="local models: float32, float16 or bfloat16; per device if None")
    offload: bool = Field(False, description="diffusers: enable model CPU offload to save GPU memory")
    guidance_scale: float | None = bounded("guidance_scale")
    ip_adapter: str = Field("h94/IP-Adapter", description="sdxl-ip-adapter: the IP-Adapter's hub id or directory")
    ip_adapter_weight: str = Field(
        "sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors",
        description="sdxl-ip-adapter: the weight file inside it (the paper's plus ViT-H adapter)",
    )
    ip_adapter_image_encoder: str = Field(
        "models/image_encoder", description="sdxl-ip-adapter: the CLIP image encoder's folder inside it"
    )
    ip_adapter_scale: float = Field(
        0.5, ge=0.0, le=2.0, description="sdxl-ip-adapter: how strongly references steer (the paper: 0.5)"
    )
    flux_redux: str = Field(
        "black-forest-labs/FLUX.1-Redux-dev", description="flux: the Redux prior that takes references; none: text only"
    )
    store: StoreKind | None = Field(
        None, description="where a new index keeps its vectors (default embedded); an existing index keeps its own"
    )
    weaviate_url: str | None = Field(None, description="Weaviate server for --store weaviate (http://HOST:8080)")
    weaviate_api_key: str | None = Field(None, description="Weaviate API key (else WEAVIATE_API_KEY); never written")
    weaviate_grpc_port: int | None = Field(None, ge=1, le=65535, description="Weaviate's gRPC port (default 50051)")
    request_timeout: float | None = bounded("request_timeout")
    max_retries: int = bounded("max_retries")


class Settings(ModelSettings, ImageRAGKnobs, GenIREvalKnobs, RAGEKnobs, CIRKnobs):
    """The process's settings: its models (`ModelSettings`) and every loop's knobs, whose values here are the
    defaults a run starts from (field defaults < profile < `IMAGELOOP_*` < explicit arguments)."""

    model_config = ConfigDict(extra="forbid", frozen=False)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """These settings with `overrides` (None values ignored), validated as every other source is."""
        return _validated({**self.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})

    def role_spec(self, role: Role) -> RoleSpec:
        """The role's `PROVIDER:MODEL`, or a ConfigError saying how to choose one."""
        value = getattr(self, role) or (self.vlm if role == "captioner" else None)
        if not value:
            raise ConfigError(f"no {role} configured: set `{role}` (PROVIDER:MODEL) or a `profile`")
        return RoleSpec.parse(value, role)

    def endpoint(self, role: Role) -> Endpoint:
        """The effective base URL and key of a role: its own, the VLM's (captioner), else OPENAI_*.

        Resolved here rather than in the client so that backends cached per endpoint never outlive a
        change of `OPENAI_BASE_URL`.
        """
        base_url = getattr(self, f"{role}_base_url")
        api_key = getattr(self, f"{role}_api_key")
        if role == "captioner" and not self.captioner:
            base_url = base_url or self.vlm_base_url
            api_key = api_key or self.vlm_api_key
        return Endpoint(
            base_url=base_url or os.environ.get("OPENAI_BASE_URL") or None,
            api_key=api_key or os.environ.get("OPENAI_API_KEY") or None,
            max_concurrent_requests=self.max_concurrent_requests,
            timeout=self.timeout_for(role),
            max_retries=self.max_retries,
        )

    def timeout_for(self, role: Role | Literal["store"]) -> float:
        """Seconds one remote call of `role` (or the Weaviate store) may take: `request_timeout`, else the default.

        Image generation waits longer by default: a busy gpt-image-1 may take two minutes to answer at all.
        """
        if self.request_timeout is not None:
            return self.request_timeout
        return limits.GENERATION_TIMEOUT_S if role == "generator" else limits.REQUEST_TIMEOUT_S


MODEL_PROFILES: dict[str, dict[str, Any]] = {
    "openai": {
        "vlm": "openai:gpt-4.1-mini",
        "generator": "openai:gpt-image-1",
        "embedder": "openai:text-embedding-3-small",
    },
    "local": {
        "vlm": "transformers:Qwen/Qwen2.5-VL-7B-Instruct",
        "generator": "omnigen:Shitao/OmniGen-v1-diffusers",
        "embedder": "open_clip:ViT-B-32/laion2b_s34b_b79k",
    },
    # Random tiny models built on the fly: offline, seconds on CPU, for smoke tests; noise out.
    "tiny": {"vlm": "tiny:qwen2-vl", "generator": "tiny:omnigen", "embedder": "tiny:clip"},
}


def _preset_profiles() -> dict[str, dict[str, Any]]:
    from imageloop.presets import PRESETS

    return {name: {knob: paper.value for knob, paper in preset.items()} for name, preset in PRESETS.items()}


PROFILES: dict[str, dict[str, Any]] = {**MODEL_PROFILES, **_preset_profiles()}
"""Model profiles choose the roles' models; presets (`imagerag-paper`, `genir-paper`) set knobs only, so the
two combine: `--profile openai,imagerag-paper` runs the paper's loop on OpenAI's models."""

ENV_PREFIX = "IMAGELOOP_"


def profile_names(profile: str | Sequence[str] | None) -> list[str]:
    """The profiles named by `profile`: one name, a comma-separated list, or several of either, in order."""
    given = [profile] if isinstance(profile, str) else list(profile or [])
    return [name.strip() for text in given for name in text.split(",") if name.strip()]


def load_settings(
    profile: str | Sequence[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults, profiles (left to right), `IMAGELOOP_*` variables and explicit overrides (None ignored)."""
    environ = os.environ if environ is None else environ
    names = profile_names(profile) or profile_names(environ.get(ENV_PREFIX + "PROFILE"))
    values: dict[str, Any] = {}
    for name in names:
        if name not in PROFILES:
            raise ConfigError(f"unknown profile {name!r}; known: {', '.join(sorted(PROFILES))}")
        values.update(PROFILES[name])
    for name in Settings.model_fields:
        env_value = environ.get(ENV_PREFIX + name.upper())
        if env_value is not None:
            values[name] = env_value
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return _validated(values)


def _validated(values: Mapping[str, Any]) -> Settings:
    unknown = sorted(set(values) - set(Settings.model_fields))
    if unknown:
        raise ConfigError(f"unknown setting {unknown[0]!r}")
    try:
        return Settings.model_validate(values)
    except ValidationError as e:
        raise one_line(e, "setting") from None
