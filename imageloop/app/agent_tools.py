"""What an agent can call, declared once for both agent faces: the MCP server and the LangChain tools.

Each tool is a `ToolSpec`: name, title, description, hints and an arguments model. A loop tool's knob
arguments are its loop's run context (`imageloop.knobs`), so names, bounds, defaults and descriptions
are the same on both faces and on the CLI; an unknown argument is refused with the valid ones. The
operations are `AgentOps`: every tool that can take long runs in the background (`App.jobs`) and the
call waits up to `wait_seconds` for it, a session busy with a run refuses another call on it, and
`pictures` names the images a result shows, which both faces send as thumbnails.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from imageloop.app.cluster import ray_options
from imageloop.app.jobs import Job, JobKind
from imageloop.app.results import RunState, SearchView, Shown
from imageloop.config import bounded
from imageloop.errors import ConfigError, ImageloopError
from imageloop.knobs import CIRKnobs, GenIRKnobs, ImageRAGKnobs, Knobs, RAGEKnobs, RayOptions
from imageloop.limits import MAX_REFERENCES, PATH_CHARS, PROMPT_CHARS
from imageloop.tools.indexing.options import IndexOptions

if TYPE_CHECKING:
    from imageloop.app.core import App

ID_PATTERN = r"^[0-9a-f]{12}$"
Scalar = str | int | float | bool


class ToolArgs(BaseModel):
    """A tool's arguments: unknown names are refused (a misspelled knob is never silently dropped)."""

    model_config = ConfigDict(extra="forbid")


def _path(description: str) -> Any:
    return Field(min_length=1, max_length=PATH_CHARS, description=description + " (inside the server's roots)")


def _text(description: str, default: Any = ...) -> Any:
    return Field(default, min_length=1, max_length=PROMPT_CHARS, description=description)


WAIT = bounded("wait_seconds", description="how long this call waits for the run before returning its id to poll")
MAX_IMAGES = bounded("max_images")
SESSION = Field(pattern=ID_PATTERN, description="the session_id the tool that started the session returned")


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    """A model's fields as `create_model` takes them: each declared once, there."""
    return {name: (info.annotation, info) for name, info in model.model_fields.items()}


def _args(
    name: str, doc: str, knobs: type[Knobs] | None = None, base: type[ToolArgs] | None = None, **fields: Any
) -> type[ToolArgs]:
    """A tool's arguments model: `fields`, then (for a loop tool) every knob of `knobs` as its run context has it."""
    every: dict[str, Any] = {**fields, **(_fields(knobs.context_schema()) if knobs else {})}
    return create_model(name, __base__=base or ToolArgs, __doc__=doc, **every)


class RetrieveArgs(ToolArgs):
    """Arguments of retrieve_images: a text query or an image, not both."""

    index: str = _path("an indexed image folder")
    query: str | None = _text("what the wanted images show", None)
    image: str | None = Field(None, max_length=PATH_CHARS, description="or: an image file; find images like it")
    k: int = bounded("k", description="how many results")
    similarity_threshold: float | None = bounded("similarity_threshold")
    max_images: int = MAX_IMAGES

    @model_validator(mode="after")
    def _one_query(self) -> RetrieveArgs:
        if (self.query is None) == (self.image is None):
            raise ValueError("give exactly one of query (text) or image (a path)")
        return self


class GenIRRoundArgs(ToolArgs):
    """Arguments of genir_round (its GenIR knobs are added below): a new search, or a session to show."""

    # Said in words, not as a top-level oneOf: several model providers refuse combinators at a tool schema's top.
    index: str | None = Field(
        None,
        max_length=PATH_CHARS,
        description="a new search (give with query, not with session_id): the indexed folder",
    )
    query: str | None = Field(
        None, max_length=PROMPT_CHARS, description="a new search (give with index): the image the user has in mind"
    )
    session_id: str | None = Field(
        None, pattern=ID_PATTERN, description="instead of index and query: show (or play on) a search started before"
    )
    wait_seconds: float = WAIT
    max_images: int = MAX_IMAGES

    @model_validator(mode="after")
    def _new_or_shown(self) -> GenIRRoundArgs:
        if (self.session_id is None) == (self.index is None or self.query is None):
            raise ValueError("give index and query (a new search), or session_id (one started before), not both")
        return self


IndexArgs = _args(
    "IndexArgs",
    "Arguments of index_images: the folder, how it is indexed, and where its new images are embedded (with `ray`, "
    "on the server's own Ray cluster).",
    IndexOptions,
    folder=(str, _path("a folder of images, indexed into FOLDER/.imageloop")),
    wait_seconds=(float, WAIT),
    **_fields(RayOptions),
)
GenerateArgs = _args(
    "GenerateArgs",
    "Arguments of generate_with_references: the prompt, the index and ImageRAG's knobs.",
    ImageRAGKnobs,
    prompt=(str, _text("what to draw")),
    index=(str, _path("an indexed image folder to take reference images from")),
    wait_seconds=(float, WAIT),
)
ComposeArgs = _args(
    "ComposeArgs",
    "Arguments of compose_retrieve: a reference image, how the wanted image differs, and CIR's knobs.",
    CIRKnobs,
    index=(str, _path("an indexed image folder to search")),
    reference=(str, _path("the reference image")),
    change=(str, _text("how the wanted image differs from the reference, e.g. 'the same dress but red'")),
    wait_seconds=(float, WAIT),
    max_images=(int, MAX_IMAGES),
)
GenIRArgs = _args(
    "GenIRArgs",
    "Arguments of genir_round: index and query (a new search) or session_id (one started before), and GenIR's knobs.",
    GenIRKnobs,
    GenIRRoundArgs,
)
FeedbackArgs = _args(
    "FeedbackArgs",
    "Arguments of genir_feedback.",
    session_id=(str, SESSION),
    feedback=(str, _text("what differs from the image wanted, or 'found: N' (N: its position as listed)")),
    wait_seconds=(float, WAIT),
)
RageRetrieveArgs = _args(
    "RageRetrieveArgs",
    "Arguments of rage_retrieve: the prompt, the catalogue, a metadata filter and RAGE's knobs.",
    RAGEKnobs,
    prompt=(str, _text("what to generate; the catalogue is searched with it too")),
    index=(str, _path("an indexed image folder: the user's catalogue")),
    where=(
        dict[str, Scalar | list[Scalar]] | None,
        Field(None, description='metadata filter, e.g. {"tags": "sneaker"} or {"brand": ["acme", "zenith"]}'),
    ),
    wait_seconds=(float, WAIT),
    max_images=(int, MAX_IMAGES),
)
RageGenerateArgs = _args(
    "RageGenerateArgs",
    "Arguments of rage_generate.",
    session_id=(str, SESSION),
    selected=(
        list[int | str],
        Field(
            min_length=1,
            max_length=MAX_REFERENCES,
            description="the user's picks in the order to use them: positions as listed (from 1), ids or file names",
        ),
    ),
    prompt=(str | None, _text("a new prompt (default: the session's)", None)),
    wait_seconds=(float, WAIT),
)
GetRunArgs = _args(
    "GetRunArgs",
    "Arguments of get_run.",
    run_id=(str, Field(pattern=ID_PATTERN, description="the run_id a previous call returned")),
    wait_seconds=(float, bounded("wait_seconds", description="wait this long for it to finish")),
)


@dataclass(frozen=True)
class Hints:
    """What a tool does to the world (MCP's tool annotations; every hint said explicitly)."""

    read_only: bool
    idempotent: bool
    open_world: bool
    destructive: bool = False


READS = Hints(read_only=True, idempotent=True, open_world=False)
WRITES_NEW = Hints(read_only=False, idempotent=False, open_world=True)
INDEXES = Hints(read_only=False, idempotent=True, open_world=False)


@dataclass(frozen=True)
class ToolSpec:
    """One agent tool, as both agent faces offer it."""

    name: str
    title: str
    description: str
    args: type[ToolArgs]
    hints: Hints


TOOLS: tuple[ToolSpec, ...] = (
    ToolSpec(
        "index_images",
        "Index an image folder",
        "Index (or update the index of) an image folder so it can be searched and used for references; only "
        "new images are processed, vanished ones forgotten. Returns the counts, or a run_id to poll.",
        IndexArgs,
        INDEXES,
    ),
    ToolSpec(
        "retrieve_images",
        "Search indexed images",
        "Find images in an indexed folder by a text query or by an example image, best first. Returns "
        "{index, query, image, results: [{position, id, path, caption, score}]} and thumbnails of the top ones.",
        RetrieveArgs,
        READS,
    ),
    ToolSpec(
        "generate_with_references",
        "Generate with retrieved references (ImageRAG)",
        "Draw an image for a prompt with ImageRAG: a critic names what a draft misses, reference images of "
        "those concepts are retrieved from the index, and the image is regenerated with them. Returns the "
        "final image and the run's record, or a run_id to poll with get_run.",
        GenerateArgs,
        WRITES_NEW,
    ),
    ToolSpec(
        "compose_retrieve",
        "Find an image like a reference, changed (CIR)",
        "Composed image retrieval: find indexed images that show the reference image changed as the text says "
        "('the same dress but red'). Returns the edited description and the ranked results, or a run_id.",
        ComposeArgs,
        WRITES_NEW,
    ),
    ToolSpec(
        "genir_round",
        "Start or show an image search (GenIR)",
        "Start a search for an image the user has in mind (give index and query), or show a search's current "
        "round (give session_id instead, not both). Each round shows a drawing of what was understood and the "
        "results: show them to the user and answer with genir_feedback. Returns the round, or a run_id to poll.",
        GenIRArgs,
        WRITES_NEW,
    ),
    ToolSpec(
        "genir_feedback",
        "Answer an image search round (GenIR)",
        "Answer a search's round with the user's words on what differs from the image they want (the query "
        "is refined and searched again), or 'found: N' (N its position as listed) to finish.",
        FeedbackArgs,
        WRITES_NEW,
    ),
    ToolSpec(
        "get_run",
        "Check a run",
        "A run's status, progress and, once finished, its result (record, images).",
        GetRunArgs,
        READS,
    ),
    ToolSpec(
        "rage_retrieve",
        "Find references to pick for a prompt (RAGE)",
        "Generating from the user's own catalogue (RAGE), step 1: retrieve the images that best match the "
        "prompt, for the user to pick from. Returns a session_id and the candidates numbered from 1, with "
        "thumbnails; call rage_generate with the user's picks.",
        RageRetrieveArgs,
        WRITES_NEW,
    ),
    ToolSpec(
        "rage_generate",
        "Generate with the picked references (RAGE)",
        "RAGE, step 2: generate with the picked images, in pick order, and the prompt as written. A pick that "
        "names no candidate is refused before anything is drawn. Returns the image and the session, or a run_id.",
        RageGenerateArgs,
        WRITES_NEW,
    ),
)
"""Every agent tool, in the order both faces list them."""


def unknown_arguments(spec: ToolSpec, given: Mapping[str, Any]) -> None:
    """Refuse names a tool does not take, listing the ones it does (before any schema check)."""
    unknown = sorted(set(given) - set(spec.args.model_fields))
    if unknown:
        raise ConfigError(
            f"{spec.name}: unknown argument {unknown[0]!r}; expected some of {', '.join(spec.args.model_fields)}"
        )


def knobs_of(args: BaseModel, knobs: type[Knobs]) -> dict[str, Any]:
    """The knob arguments a call set (None: the server's settings)."""
    return {
        name: value for name, value in args.model_dump().items() if name in knobs.model_fields and value is not None
    }


class AgentOps:
    """The tools' operations over one `App`; each answers a finished result or a `Job` to wait for."""

    def __init__(self, app: App) -> None:
        self.app = app

    def call(self, name: str, args: ToolArgs) -> Job | Any:
        """Run tool `name` with its (validated) arguments."""
        operation: Callable[[Any], Job | Any] = getattr(self, name)
        return operation(args)

    def retrieve_images(self, args: RetrieveArgs) -> dict[str, Any]:
        found = self.app.retrieve(
            args.index, query=args.query, image=args.image, k=args.k, similarity_threshold=args.similarity_threshold
        )
        results = [
            Shown(position=n, id=hit.id, path=str(hit.path), caption=hit.caption, score=round(float(hit.score), 6))
            for n, hit in enumerate(found, start=1)
        ]
        root = str(self.app.index(args.index).root)
        return {"index": root, "query": args.query, "image": args.image, "results": [r.model_dump() for r in results]}

    def index_images(self, args: Any) -> Job:
        root = self.app.path(args.folder, "folder", kind="dir")
        # The faces fill in every default: only what differs from one was asked for.
        defaults = {name: info.default for name, info in RayOptions.model_fields.items()}
        asked = {
            name: value for name, value in args.model_dump(include=set(defaults)).items() if value != defaults[name]
        }
        ray = ray_options(asked, confined=self.app.roots is not None)  # a cluster it may not use fails this call

        def work(job: Job) -> dict[str, Any]:
            def counted(done: int, total: int) -> None:
                job.report(f"{done}/{total} images in {root.name} handled", done, total)
                job.check_cancelled()

            summary = self.app.index_folder(root, options=knobs_of(args, IndexOptions), on_progress=counted, ray=ray)
            done = f"indexed {summary.indexed}, skipped {summary.skipped}, failed {summary.failed}"
            job.report(done, summary.total, summary.total)
            return {"folder": str(root), **summary.to_json()}

        return self.app.jobs.submit("index", work)

    def generate_with_references(self, args: Any) -> Job:
        return self.app.start_generate(args.prompt, args.index, knobs_of(args, ImageRAGKnobs))

    def compose_retrieve(self, args: Any) -> Job:
        knobs = CIRKnobs.given(knobs_of(args, CIRKnobs))
        self.app.retriever(args.index)  # a missing or mismatched index fails this call, not the run
        self.app.path(args.reference, "reference", kind="file")  # so does a reference outside the roots

        return self.app.in_background(
            "cir",
            lambda follow: self.app.compose_retrieve(args.index, args.reference, args.change, knobs=knobs, **follow),
        )

    def genir_round(self, args: Any) -> Job | SearchView:
        if args.session_id is not None:
            self.app.jobs.refuse_busy(args.session_id)
            shown = self.app.show_search(args.session_id, knobs=knobs_of(args, GenIRKnobs))
            return self._search_job(args.session_id, None) if shown.status == "incomplete" else shown
        knobs = GenIRKnobs.given(knobs_of(args, GenIRKnobs))
        self.app.retriever(args.index)

        return self.app.in_background(
            "genir", lambda follow: self.app.start_search(args.index, args.query, knobs=knobs, **follow)
        )

    def genir_feedback(self, args: Any) -> Job:
        from imageloop.graphs.genir import resolve_found

        self.app.jobs.refuse_busy(args.session_id)
        shown = self.app.show_search(args.session_id)
        if shown.status != "awaiting_feedback":
            reason = shown.stop_reason or "no question pending"
            raise ImageloopError(
                f"session {args.session_id} is {shown.status} ({reason}); start another with genir_round"
            )
        resolve_found(args.feedback, [r.model_dump() for r in shown.retrieved])  # a bad "found:" is refused now
        return self._search_job(args.session_id, args.feedback)

    def _search_job(self, session_id: str, answer: str | None) -> Job:
        return self.app.in_background(
            "genir", lambda follow: self.app.continue_search(session_id, answer, **follow), session=session_id
        )

    def rage_retrieve(self, args: Any) -> Job:
        knobs = RAGEKnobs.given(knobs_of(args, RAGEKnobs))
        if knobs.set_values().get("review") == "person":
            raise ConfigError("review 'person' asks a person between drawings: from an agent, review none or critic")
        self.app.retriever(args.index)

        return self.app.in_background(
            "rage", lambda follow: self.app.start_rage(args.prompt, args.index, knobs=knobs, where=args.where, **follow)
        )

    def rage_generate(self, args: Any) -> Job:
        self.app.jobs.refuse_busy(args.session_id)
        answer = {"selected": args.selected, "prompt": args.prompt}
        self.app.check_rage_answer(args.session_id, answer)  # a pick naming no candidate fails now, before drawing

        return self.app.in_background(
            "rage", lambda follow: self.app.continue_rage(args.session_id, answer, **follow), session=args.session_id
        )

    def get_run(self, args: Any) -> Job | RunState:
        job = self.app.jobs.get(args.run_id)
        return job if job is not None else self.app.run_state(args.run_id)


def pictures(
    kind: JobKind | Literal["retrieve", "genir"], result: Mapping[str, Any], limit: int
) -> list[tuple[str, str]]:
    """The images a result shows, as (label, path), at most `limit` results: a run's final image and draft, a
    search round's drawing and results, RAGE's candidates or drawing, CIR's proxy and results."""
    shown: list[tuple[str, str]] = []
    if kind == "generate":
        shown += [(f"{key}: {result[key]}", result[key]) for key in ("final_image", "draft_image") if result.get(key)]
    if result.get("synthetic_image"):
        shown.append((f"synthetic image: {result['synthetic_image']}", result["synthetic_image"]))
    if result.get("proxy_image"):
        shown.append((f"proxy image: {result['proxy_image']}", result["proxy_image"]))
    if kind == "rage" and result.get("final_image"):
        shown.append((f"final_image: {result['final_image']}", result["final_image"]))
    listed: Sequence[Mapping[str, Any]] = result.get("results") or result.get("retrieved") or []
    if kind == "rage" and result.get("status") == "awaiting_selection":
        listed = result.get("candidates") or []
    shown += [(f"#{r['position']} {r['path']}", r["path"]) for r in list(listed)[:limit]]
    return shown
