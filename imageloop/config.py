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

from pydantic import BaseModel, Field, ValidationError, field_validator

from imageloop import limits
from imageloop.errors import ConfigError, ImageloopError

Role = Literal["vlm", "generator", "embedder", "captioner"]
ROLES: tuple[Role, ...] = ("vlm", "generator", "embedder", "captioner")
Mode = Literal["draft_first", "generation"]
MODES: tuple[Mode, ...] = ("draft_first", "generation")
FeedbackKind = Literal["visual", "verbal", "prediction", "hybrid"]
FEEDBACK_KINDS: tuple[FeedbackKind, ...] = ("visual", "verbal", "prediction", "hybrid")
CriticKind = Literal["single_call", "paper"]
PlanScope = Literal["rare", "every"]
RetrievalQuery = Literal["caption", "concept", "prompt"]
ReferencesPolicy = Literal["replace", "accumulate"]
FinalImage = Literal["best", "last"]
SimulatedUserStyle = Literal["ours", "paper"]
HybridRule = Literal["confidence", "oracle", "random"]
HYBRID_RULES: tuple[HybridRule, ...] = ("confidence", "oracle", "random")
HybridFallback = Literal["prediction", "verbal"]
ReviewKind = Literal["none", "person", "critic"]
REVIEW_KINDS: tuple[ReviewKind, ...] = ("none", "person", "critic")
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
            raise ConfigError(f"--{role} {text!r}: expected PROVIDER:MODEL, e.g. openai:gpt-4.1-mini")
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


class Settings(BaseModel):
    """Every knob of a run, with our defaults; the paper presets (`imageloop.presets`) set the papers' values."""

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
    mode: Mode = Field("draft_first", description="draft_first: critique a draft; generation: skip it")
    max_iterations: int = bounded("max_iterations")
    similarity_threshold: float | None = bounded("similarity_threshold")
    top_k: int = bounded("top_k")
    max_concepts: int = bounded("max_concepts")
    seed: int | None = bounded("seed")
    size: tuple[int, int] | None = Field(None, description="output size (width, height); backend default if None")
    steps: int | None = bounded("steps")
    critic: CriticKind = Field("single_call", description="single_call (JSON) or paper (the released conversation)")
    plan_scope: PlanScope = Field("rare", description="generation mode: plan rare concepts, or every (paper)")
    retrieval_query: RetrievalQuery = Field("caption", description="search with caption, concept word or prompt")
    rephrase_only: bool = Field(False, description="ablation: captions folded into the prompt, no references")
    references_policy: ReferencesPolicy = Field("replace", description="per iteration: replace or accumulate")
    final_image_policy: FinalImage = Field("best", description="return the best judged image or the last")
    sdxl_max_references: int = Field(1, ge=1, le=3, description="sdxl-ip-adapter: references (the paper: 1)")
    feedback: FeedbackKind = Field("visual", description="GenIR: what each round shows (visual draws the query)")
    simulated_user: SimulatedUserStyle = Field("ours", description="GenIR simulated user: ours (one call) or paper")
    user_temperature: float | None = bounded("user_temperature")
    user_top_p: float | None = bounded("user_top_p")
    user_repetition_penalty: float | None = bounded("user_repetition_penalty")
    rounds: int = bounded("rounds")
    k: int = bounded("k")
    ks: tuple[int, ...] | None = Field(None, description="GenIR evaluation: Hits@K for each K (default: k)")
    rank_depth: int = bounded("rank_depth")
    hybrid_threshold: float = bounded("hybrid_threshold")
    fusion_lambda: float = bounded("fusion_lambda")
    verify: int = bounded("verify")
    rerank_depth: int = bounded("rerank_depth")
    hybrid_rule: HybridRule = Field(
        "confidence", description="hybrid: confidence (ours, per round), oracle or random (the paper's, per query)"
    )
    hybrid_visual_fraction: float = bounded("hybrid_visual_fraction")
    hybrid_fallback: HybridFallback = Field(
        "prediction", description="hybrid oracle/random: the feedback a query gets when it is not shown a drawing"
    )
    eval_clip: str = Field("open_clip:ViT-L-14/openai", description="eval imagerag: CLIP text-image scorer")
    eval_siglip: str = Field(
        "open_clip:ViT-SO400M-14-SigLIP-384/webli", description="eval imagerag: SigLIP text-image scorer"
    )
    eval_dino: str = Field("transformers:facebook/dinov2-base", description="eval imagerag: DINO image-image scorer")
    judge: str | None = Field(None, description="eval imagerag: the VLM judge, PROVIDER:MODEL (default: the --vlm)")
    review: ReviewKind = Field("none", description="RAGE: who checks each image: none, person or critic (a VLM)")
    max_generations: int = bounded("max_generations")
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

    def with_overrides(self, overrides: Mapping[str, Any]) -> Settings:
        """These settings with `overrides` (None values ignored), validated as every other source is."""
        return _validated({**self.model_dump(), **{k: v for k, v in overrides.items() if v is not None}})

    @field_validator("ks", mode="before")
    @classmethod
    def _ks(cls, value: Any) -> Any:
        """`1,5,10` text (options, `IMAGELOOP_KS`) or a sequence; each K within the bound of k, sorted, unique."""
        if value is None:
            return None
        items = value.split(",") if isinstance(value, str) else list(value)
        try:
            ks = sorted({int(str(item).strip()) for item in items if str(item).strip()})
        except ValueError:
            raise ValueError(f"ks {value!r}: expected K values such as 1,5,10") from None
        if not ks:
            raise ValueError("ks is empty: expected K values such as 1,5,10")
        bound = limits.BOUNDS["k"]
        if not bound.low <= ks[0] <= ks[-1] <= bound.high:
            raise ValueError(f"each K must be within {bound.low:g}..{bound.high:g}, got {value!r}")
        return tuple(ks)

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, value: Any) -> Any:
        """`WIDTHxHEIGHT` text (options, `IMAGELOOP_SIZE`) or a pair, each side within the limits' bounds."""
        if isinstance(value, str):
            return limits.parse_size(value)
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return limits.check_size((int(value[0]), int(value[1])))
        return value

    def role_spec(self, role: Role) -> RoleSpec:
        """The role's `PROVIDER:MODEL`, or a ConfigError saying how to choose one."""
        value = getattr(self, role) or (self.vlm if role == "captioner" else None)
        if not value:
            raise ConfigError(f"no {role} configured: pass --{role} PROVIDER:MODEL or --profile NAME")
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
    try:
        return Settings.model_validate(values)
    except ValidationError as e:
        first = e.errors()[0]
        cause = first.get("ctx", {}).get("error")
        if isinstance(cause, ImageloopError):  # a validator's own one-line error (pydantic wraps ValueErrors)
            raise cause from None
        field = ".".join(str(p) for p in first["loc"])
        if field in limits.BOUNDS and first["type"] in ("greater_than_equal", "less_than_equal"):
            # A value past a bound is refused in the table's own words, naming the range, on every face.
            limits.check(field, float(first["input"]))
        raise ConfigError(f"invalid setting {field}: {first['msg']}") from None
