"""The MCP tools: each parses its arguments (bounded by `imageloop.limits`), calls the application layer
(`imageloop.app.App`) and renders the answer as JSON text plus labelled PNG thumbnails.

Built on the official SDK's 1.x line (`mcp.server.fastmcp.FastMCP`, public API only), not 2.x
(`MCPServer`): langchain-mcp-adapters, the usual way a LangGraph agent loads MCP tools, still pins
`mcp<2`, and a server that shares an environment with its LangGraph clients must resolve with them.

Long work (indexing, ImageRAG, GenIR rounds) runs as a background run of the app (`App.jobs`): the
call waits up to `wait_seconds`, reporting each step as progress, and otherwise returns a run id for
`get_run`, so no call outlives a client's ~60 s timeout silently. A client that disconnects leaves the
run to finish; at shutdown unfinished runs are cancelled at a step boundary with their records whole.
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import anyio
import anyio.to_thread
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from imageloop.app import App
from imageloop.app.jobs import Job, JobKind, JobStatus, Note, ServerBusyError, job_state, report_to
from imageloop.app.runs import RUN_ID
from imageloop.config import CriticKind, FeedbackKind, FinalImage, Mode, ReferencesPolicy, RetrievalQuery, bounded
from imageloop.errors import ImageloopError
from imageloop.limits import MAX_REFERENCES, MAX_SIDE, MIN_SIDE, PATH_CHARS, PROMPT_CHARS
from imageloop.thumbnails import RESULT_IMAGE_BUDGET, encode_png_under, image_budgets

HEARTBEAT_S = 10.0
RUN_RESOURCE = "imageloop://runs/"
MAX_THUMBNAILS = 16


class Hit(BaseModel):
    """One retrieved image."""

    rank: int
    id: str
    path: str
    caption: str
    score: float


class Retrieval(BaseModel):
    """What retrieve_images returns (image content follows in the same order, for the top results)."""

    index: str
    query: str | None
    image: str | None
    results: list[Hit]
    images_shown: int


class RunView(BaseModel):
    """A run's state: queued or running (poll get_run with run_id), or finished with a result or error."""

    run_id: str
    kind: JobKind
    status: JobStatus
    progress: list[str] = Field(description="the latest progress messages, oldest first")
    error: str | None = None
    result: dict[str, Any] | None = None
    poll: str | None = Field(default=None, description="what to call next while the run is not finished")


class ImageloopMCP:
    """The tools' operations over one `App`: starting runs, viewing them, rendering results."""

    def __init__(self, app: App) -> None:
        self.app = app
        self._session_runs: dict[str, str] = {}

    def retrieve(
        self, index: str, query: str | None, image: str | None, k: int, threshold: float | None, max_images: int
    ) -> CallToolResult:
        """Search `index` by text or by an image; results as JSON, then thumbnails of the top ones."""
        if query is not None and not query.strip():
            query = None
        found = self.app.retrieve(index, query=query, image=image, k=k, similarity_threshold=threshold)
        results = [
            Hit(rank=rank, id=hit.id, path=str(hit.path), caption=hit.caption, score=round(float(hit.score), 6))
            for rank, hit in enumerate(found)
        ]
        content, count = self._image_blocks([(f"#{hit.rank} {hit.path}", hit.path) for hit in results[:max_images]])
        root = str(self.app.index(index).root)
        output = Retrieval(index=root, query=query, image=image, results=results, images_shown=count)
        return _result(output.model_dump(mode="json"), content)

    def _image_blocks(self, shown: Sequence[tuple[str, str]]) -> tuple[list[ContentBlock], int]:
        """A label and a downscaled PNG per (label, path); paths outside the roots are named, not read."""
        blocks: list[ContentBlock] = []
        count = 0
        each = image_budgets(len(shown), RESULT_IMAGE_BUDGET)
        for label, text in shown:
            path = Path(text)
            note = ""
            data: str | None = None
            if not self.app.may_read(path):
                note = " (outside the server's roots: not shown)"
            else:
                try:
                    data = encode_png_under(path.resolve(), each)
                except (ImageloopError, OSError) as e:
                    note = f" (not shown: {e})"
                if data is None and not note:
                    note = " (not shown: too large for the result size cap)"
            blocks.append(TextContent(type="text", text=label + note))
            if data is not None:
                blocks.append(ImageContent(type="image", data=data, mimeType="image/png"))
                count += 1
        return blocks, count

    # Runs.

    def start_index(self, folder: str, batch_size: int) -> Job:
        """Index a folder in the background (new images only; vanished ones pruned)."""
        root = self.app.path(folder, "folder", kind="dir")

        def work(job: Job) -> dict[str, Any]:
            def counted(done: int, total: int) -> None:
                job.report(f"{done}/{total} images in {root.name} handled", done, total)
                job.check_cancelled()

            summary = self.app.index_folder(root, batch_size=batch_size, on_progress=counted)
            done = f"indexed {summary.indexed}, skipped {summary.skipped}, failed {summary.failed}"
            job.report(done, summary.total, summary.total)
            return {"folder": str(root), **summary.to_json()}

        return self.app.jobs.submit("index", work)

    def start_generate(self, prompt: str, index: str, knobs: dict[str, Any]) -> Job:
        """Run ImageRAG in the background; its record and images go to RUNS/<run_id>/."""
        return self.app.start_generate(prompt, index, knobs)

    def start_compose_retrieve(self, index: str, reference: str, change: str, knobs: dict[str, Any]) -> Job:
        """Composed retrieval in the background (composing asks the LLM; a proxy is drawn)."""
        self.app.retriever(index)  # a missing or mismatched index fails this call, not the run
        self.app.path(reference, "reference", kind="file")  # so does a reference outside the roots

        def work(job: Job) -> dict[str, Any]:
            return self.app.compose_retrieve(index, reference, change, **knobs, **report_to(job))

        return self.app.jobs.submit("cir", work)

    def start_genir(self, index: str, query: str, knobs: dict[str, Any]) -> Job:
        """A new person-in-the-loop GenIR session, played up to its first question."""
        self.app.retriever(index)

        def work(job: Job) -> dict[str, Any]:
            return _genir_view(self.app.start_search(index, query, knobs=knobs, **report_to(job)))

        return self.app.jobs.submit("genir", work)

    def genir_show(self, session_id: str) -> dict[str, Any] | Job:
        """A session's current round; an interrupted session is continued in the background."""
        self._refuse_busy(session_id)
        shown = self.app.show_search(session_id)
        if shown["status"] == "incomplete":
            return self._genir_job(session_id, None)
        return _genir_view(shown)

    def genir_feedback(self, session_id: str, feedback: str) -> Job:
        """Answer the session's pending question (checked now) and play to the next one in the background."""
        self._refuse_busy(session_id)
        shown = self.app.show_search(session_id)
        if shown["status"] != "awaiting_feedback":
            raise ImageloopError(
                f"session {session_id} is {shown['status']} ({shown['stop_reason'] or 'no question pending'}); "
                "start another with genir_round"
            )
        from imageloop.graphs.genir import resolve_found

        resolve_found(feedback, shown["retrieved"])  # a "found:" naming no shown result is refused now
        return self._genir_job(session_id, feedback)

    def rage_retrieve(
        self, prompt: str, index: str, knobs: dict[str, Any], where: dict[str, Any] | None, max_images: int
    ) -> CallToolResult:
        """Start a RAGE session: the candidates to pick from as JSON, then their thumbnails, labelled by position."""
        view = _rage_view(self.app.start_rage(prompt, index, knobs=knobs, where=where))
        shown = [(f"#{c['position']} {c['path']}", c["path"]) for c in view["candidates"][:max_images]]
        content, count = self._image_blocks(shown)
        return _result({**view, "images_shown": count}, content)

    def start_rage_generate(self, session_id: str, selected: list[int | str], prompt: str | None) -> Job:
        """Generate with a session's picks in the background, once the picks are checked against its candidates."""
        self._refuse_busy(session_id)
        answer = {"selected": selected, "prompt": prompt}
        self.app.check_rage_answer(session_id, answer)  # a pick naming no candidate fails this call, before generating

        def work(job: Job) -> dict[str, Any]:
            return _rage_view(self.app.continue_rage(session_id, answer, **report_to(job)))

        job = self.app.jobs.submit("rage", work)
        self._session_runs[session_id] = job.id
        return job

    def _genir_job(self, session_id: str, answer: str | None) -> Job:
        def work(job: Job) -> dict[str, Any]:
            return _genir_view(self.app.continue_search(session_id, answer, **report_to(job)))

        job = self.app.jobs.submit("genir", work)
        self._session_runs[session_id] = job.id
        return job

    def _refuse_busy(self, session_id: str) -> None:
        busy = self._session_runs.get(session_id)
        running = self.app.jobs.get(busy) if busy else None
        if running is not None and not running.done.is_set():
            raise ServerBusyError(f"session {session_id} is busy with run {running.id}: poll get_run first")

    def run_view(self, run_id: str) -> RunView:
        """A run's state from memory, or from its folder on disk after a restart."""
        job = self.app.jobs.get(run_id)
        return self.view(job) if job is not None else RunView(**self.app.run_state(run_id))

    def view(self, job: Job, last: int = 20) -> RunView:
        """A live run's state."""
        poll = None if job.done.is_set() else f"call get_run with run_id={job.id!r} (and wait_seconds) for the result"
        return RunView(**job_state(job, last), poll=poll)

    def render_run(self, view: RunView) -> CallToolResult:
        """A run's view as a tool result: JSON text, plus the images a finished run produced."""
        shown: list[tuple[str, str]] = []
        result = view.result or {}
        if view.kind == "generate":
            shown += [
                (f"{key}: {result[key]}", result[key]) for key in ("final_image", "draft_image") if result.get(key)
            ]
        elif view.kind == "cir" and result:
            if result.get("proxy_image"):
                shown.append((f"proxy image: {result['proxy_image']}", result["proxy_image"]))
            shown += [
                (f"#{rank} {hit['path']}", hit["path"]) for rank, hit in enumerate(result["results"][:MAX_THUMBNAILS])
            ]
        elif view.kind == "genir" and result.get("state") == "awaiting_feedback":
            if result.get("synthetic_image"):
                shown.append((f"synthetic image: {result['synthetic_image']}", result["synthetic_image"]))
            shown += [(f"#{hit['rank']} {hit['path']}", hit["path"]) for hit in result["retrieved"][:MAX_THUMBNAILS]]
        elif view.kind == "rage" and result.get("final_image"):
            shown.append((f"final_image: {result['final_image']}", result["final_image"]))
        content, _ = self._image_blocks([(self._full_size(label, path), path) for label, path in shown])
        return _result(view.model_dump(mode="json"), content, is_error=view.status == "error")

    def _full_size(self, label: str, path: str) -> str:
        """A thumbnail's label, naming the run resource that reads it at full size (`imageloop://runs/...`).

        Named in the text rather than as a resource link: clients such as langchain-mcp-adapters turn an image
        link into an image URL for the model, which a model provider cannot fetch."""
        relative = self.app.run_relative(path)
        return f"{label} (full size: {RUN_RESOURCE}{relative})" if relative and path.endswith(".png") else label


def _genir_view(session: dict[str, Any]) -> dict[str, Any]:
    """A search session as genir_round/genir_feedback show it: ranked results, the ask naming the tool."""
    view = {
        "session_id": session["thread_id"],
        "rounds_played": session["rounds_played"],
        "found_id": session["found_id"],
        "stop_reason": session["stop_reason"],
        "state": session["status"],
        "query": session.get("query", session["last_query"]),
    }
    if session["status"] == "awaiting_feedback":
        view |= {
            "round": session["round"],
            "feedback_kind": session["feedback_kind"],
            "synthetic_image": session["synthetic_image"],
            "retrieved": [{"rank": rank, **hit} for rank, hit in enumerate(session["retrieved"])],
            "ask": session["ask"] + " (genir_feedback; 'found: <rank>' also works)",
        }
    return view


def _rage_view(session: dict[str, Any]) -> dict[str, Any]:
    """A RAGE session as rage_retrieve/rage_generate show it: candidates by position, picks, the images drawn."""
    view = {
        "session_id": session["session_id"],
        "state": session["status"],
        "prompt": session["prompt"],
        "candidates": session["candidates"],
        "selected": [{"position": c["position"], "id": c["id"], "path": c["path"]} for c in session["selected"]],
        "final_image": session["final_image"],
        "stop_reason": session["stop_reason"],
        "images": [{"generation": i["iteration"], "path": i["path"], "notes": i["notes"]} for i in session["images"]],
        "report": session["report"],
    }
    if session["status"] == "awaiting_selection":
        view["ask"] = "Show the candidates; call rage_generate with the session_id and the picks (positions as listed)."
    return view


def _result(structured: dict[str, Any], images: list[ContentBlock], is_error: bool = False) -> CallToolResult:
    """JSON text first (for clients that ignore structured output), then labelled images."""
    text = TextContent(type="text", text=json.dumps(structured, ensure_ascii=False))
    return CallToolResult(content=[text, *images], structuredContent=structured, isError=is_error)


class _Server(FastMCP[Any]):
    """FastMCP with one-line errors: an unknown argument, the field that failed validation, or the
    imageloop error as is."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.parameters: dict[str, set[str]] = {}

    def tool_of(self, function: Callable[..., Any], title: str, annotations: ToolAnnotations) -> None:
        """Register `function` as a tool, remembering its parameters to name unknown arguments."""
        self.parameters[function.__name__] = set(inspect.signature(function).parameters) - {"ctx"}
        # The title twice: on the tool (protocol 2025-06-18) and in its annotations (where 2025-03-26 put it).
        self.tool(title=title, annotations=annotations.model_copy(update={"title": title}))(function)

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Sequence[ContentBlock] | dict[str, Any]:
        known = self.parameters.get(name)
        if known is not None:
            unknown = sorted(set(arguments) - known)
            if unknown:
                raise ToolError(f"{name}: unknown argument {unknown[0]!r}; expected some of {', '.join(sorted(known))}")
        try:
            return await super().call_tool(name, arguments)
        except ToolError as e:
            cause = e.__cause__
            if isinstance(cause, ValidationError):
                raise ToolError(f"{name}: {_validation_message(cause)}") from None
            if isinstance(cause, ImageloopError):
                raise ToolError(f"{name}: {cause}") from None
            raise


def _validation_message(error: ValidationError) -> str:
    parts = []
    for detail in error.errors():
        where = ".".join(str(part) for part in detail["loc"]) or "arguments"
        parts.append(f"invalid {where}: {detail['msg']}")
    return "; ".join(parts)


WaitSeconds = Annotated[float, bounded("wait_seconds")]
Folder = Annotated[
    str, Field(min_length=1, max_length=PATH_CHARS, description="a folder of images inside the server's roots")
]
Index = Annotated[str, Field(min_length=1, max_length=PATH_CHARS, description="an indexed image folder")]
Prompt = Annotated[str, Field(min_length=1, max_length=PROMPT_CHARS, description="what to draw")]
RunId = Annotated[str, Field(pattern=RUN_ID, description="the run_id a previous call returned")]
SessionId = Annotated[str, Field(pattern=RUN_ID, description="the session_id genir_round returned")]
RageSessionId = Annotated[str, Field(pattern=RUN_ID, description="the session_id rage_retrieve returned")]
Scalar = str | int | float | bool
Where = Annotated[
    dict[str, Scalar | list[Scalar]] | None,
    Field(description='metadata filter, e.g. {"tags": "sneaker"} or {"brand": ["acme", "zenith"]}'),
]
McpContext = Context[Any, Any, Any]


class ProgressClock:
    """MCP progress values for a run's notes: strictly increasing (as the protocol requires), with a total
    while the work counts something. A counted note (done of total) moves to base + done of base + total,
    base being where its task began (a task begins when `done` falls back: the next image's denoising; a
    repeated count moves nothing and is not sent); any other note moves on by one, with no total."""

    def __init__(self) -> None:
        self.value = 0.0
        self.base = 0.0
        self.last_done: int | None = None
        self.started = False

    def tick(self, note: Note) -> tuple[float, float | None] | None:
        """The (progress, total) to send for `note`, or None when it would not move forward."""
        if note.done is None or note.total is None:
            self.value += 1
            self.last_done = None
            self.started = True
            return self.value, None
        if self.last_done is None or note.done < self.last_done:
            self.base = self.value
        self.last_done = note.done
        value = self.base + note.done
        if self.started and value <= self.value:
            return None
        self.value, self.started = value, True
        return value, self.base + note.total


async def _follow(job: Job, wait_s: float, ctx: McpContext) -> None:
    """Wait up to `wait_s` for `job`, forwarding its progress (and a heartbeat) to the client."""
    deadline = anyio.current_time() + wait_s
    sent, last_sent = 0, anyio.current_time()
    delay = 0.002
    clock = ProgressClock()
    while True:
        total, notes = job.notes_since(sent)
        now = anyio.current_time()
        if not notes and now - last_sent >= HEARTBEAT_S:
            notes = [Note(f"still {job.status}")]  # a heartbeat, for clients that extend timeouts on progress
        try:
            for note in notes:
                ticked = clock.tick(note)
                if ticked is not None:
                    await ctx.report_progress(ticked[0], ticked[1], note.message)
                    last_sent = now
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            return  # the client went away: the run carries on, its result waits for get_run
        sent = total
        if job.done.is_set() or now >= deadline:
            return
        await anyio.sleep(min(delay, max(0.0, deadline - now)))
        delay = min(delay * 2, 0.1)


def build_server(app: App, security: TransportSecuritySettings | None = None) -> FastMCP[Any]:
    """The MCP server exposing `app`'s operations as tools."""
    ops = ImageloopMCP(app)
    server = _Server(
        "imageloop",
        instructions=(
            "Retrieval over indexed image folders, retrieval-augmented generation (ImageRAG), "
            "interactive generative retrieval (GenIR), composed image retrieval (a reference image plus a "
            "change, compose_retrieve) and generation from images a user picks in their own catalogue "
            "(RAGE: rage_retrieve, then rage_generate). Paths must lie inside the server's roots. Long "
            "calls return a run_id: poll get_run until status is done."
        ),
        log_level="WARNING",
        transport_security=security,
    )

    async def run_result(job: Job, wait_seconds: float, ctx: McpContext) -> CallToolResult:
        await _follow(job, wait_seconds, ctx)
        return ops.render_run(ops.view(job))

    async def retrieve_images(
        index: Index,
        query: Annotated[str | None, Field(max_length=PROMPT_CHARS, description="text describing the images")] = None,
        image: Annotated[
            str | None, Field(max_length=PATH_CHARS, description="or: a path of an image to find similar ones")
        ] = None,
        k: Annotated[int, bounded("k", description="how many results")] = 10,
        similarity_threshold: Annotated[float | None, bounded("similarity_threshold")] = None,
        max_images: Annotated[int, bounded("max_images")] = 10,
    ) -> CallToolResult:
        """Find images in an indexed folder by a text query or by an example image, best first.

        Returns JSON {index, query, image, results: [{rank, id, path, caption, score}], images_shown},
        then a label and a PNG thumbnail for each of the top max_images results."""
        # No declared outputSchema on this, the hot path: the 1.x SDK re-checks a declared schema
        # against the JSON Schema metaschema on every call, on both ends (~10 ms each).
        return await anyio.to_thread.run_sync(
            functools.partial(ops.retrieve, index, query, image, k, similarity_threshold, max_images)
        )

    async def index_images(
        folder: Folder,
        ctx: McpContext,
        batch_size: Annotated[int, bounded("batch_size")] = 32,
        wait_seconds: WaitSeconds = 40,
    ) -> Annotated[CallToolResult, RunView]:
        """Index (or update the index of) an image folder so retrieve_images and the loops can search it."""
        job = await anyio.to_thread.run_sync(ops.start_index, folder, batch_size)
        return await run_result(job, wait_seconds, ctx)

    async def generate_with_references(
        prompt: Prompt,
        index: Index,
        ctx: McpContext,
        # Knobs left null take the server's settings (its profile, IMAGELOOP_* variables, defaults).
        mode: Annotated[Mode | None, Field(description="draft_first critiques a draft first")] = None,
        max_iterations: Annotated[int | None, bounded("max_iterations", unset=True)] = None,
        top_k: Annotated[int | None, bounded("top_k", unset=True)] = None,
        similarity_threshold: Annotated[float | None, bounded("similarity_threshold", unset=True)] = None,
        seed: Annotated[int | None, bounded("seed", unset=True)] = None,
        width: Annotated[int | None, Field(ge=MIN_SIDE, le=MAX_SIDE, description="pixels (height if omitted)")] = None,
        height: Annotated[int | None, Field(ge=MIN_SIDE, le=MAX_SIDE, description="pixels (width if omitted)")] = None,
        steps: Annotated[int | None, bounded("steps", unset=True)] = None,
        critic: Annotated[CriticKind | None, Field(description="single_call, or paper (the paper's questions)")] = None,
        retrieval_query: Annotated[
            RetrievalQuery | None, Field(description="search with the caption, the concept word or the prompt")
        ] = None,
        references_policy: Annotated[
            ReferencesPolicy | None, Field(description="replace or accumulate references per iteration")
        ] = None,
        final_image_policy: Annotated[
            FinalImage | None, Field(description="return the best judged image or the last")
        ] = None,
        wait_seconds: WaitSeconds = 40,
    ) -> Annotated[CallToolResult, RunView]:
        """Generate an image for a prompt, retrieving reference images from an index for concepts the
        generator gets wrong (ImageRAG). Returns the final image and the run record, or a run_id to poll."""
        size = (width or height, height or width) if width is not None or height is not None else None
        knobs = {
            "mode": mode, "max_iterations": max_iterations, "top_k": top_k,
            "similarity_threshold": similarity_threshold, "seed": seed, "size": size, "steps": steps,
            "critic": critic, "retrieval_query": retrieval_query, "references_policy": references_policy,
            "final_image_policy": final_image_policy,
        }  # fmt: skip
        job = await anyio.to_thread.run_sync(ops.start_generate, prompt, index, knobs)
        return await run_result(job, wait_seconds, ctx)

    async def compose_retrieve(
        index: Index,
        reference: Annotated[str, Field(min_length=1, max_length=PATH_CHARS, description="the reference image")],
        change: Annotated[
            str, Field(min_length=1, max_length=PROMPT_CHARS, description="how the wanted image differs from it")
        ],
        ctx: McpContext,
        k: Annotated[int | None, bounded("k", unset=True, description="how many results")] = None,
        proxy: Annotated[bool, Field(description="also draw the edited scene and fuse its scores (slower)")] = False,
        verify: Annotated[int | None, bounded("verify", unset=True)] = None,
        cir_model: Annotated[
            str | None, Field(max_length=PATH_CHARS, description="a composed-query model folder (train cir)")
        ] = None,
        wait_seconds: WaitSeconds = 40,
    ) -> Annotated[CallToolResult, RunView]:
        """Composed image retrieval: find indexed images that show the reference image changed as the text
        says ("the same dress but red"). Returns the edited description and the ranked results, or a run_id."""
        knobs = {"k": k, "proxy": proxy, "verify": verify, "cir_model": cir_model}
        job = await anyio.to_thread.run_sync(ops.start_compose_retrieve, index, reference, change, knobs)
        return await run_result(job, wait_seconds, ctx)

    async def genir_round(
        ctx: McpContext,
        index: Annotated[str | None, Field(max_length=PATH_CHARS, description="folder to search (new)")] = None,
        query: Annotated[
            str | None, Field(max_length=PROMPT_CHARS, description="the image you have in mind (new)")
        ] = None,
        feedback: Annotated[FeedbackKind | None, Field(description="what each round shows")] = None,
        k: Annotated[int | None, bounded("k", unset=True, description="results per round")] = None,
        max_rounds: Annotated[int | None, bounded("rounds", unset=True)] = None,
        session_id: Annotated[
            str | None, Field(pattern=RUN_ID, description="show (or continue) an existing session instead")
        ] = None,
        wait_seconds: WaitSeconds = 40,
    ) -> Annotated[CallToolResult, RunView]:
        """Start a GenIR search for an image someone has in mind (index + query), or show a session's
        current round (session_id). Each round shows results; answer with genir_feedback."""
        if session_id is not None:
            shown = await anyio.to_thread.run_sync(ops.genir_show, session_id)
            if isinstance(shown, Job):
                return await run_result(shown, wait_seconds, ctx)
            view = RunView(run_id=session_id, kind="genir", status="done", progress=[], result=shown)
            return ops.render_run(view)
        if index is None or query is None:
            raise ImageloopError("a new session needs index and query (or pass session_id)")
        knobs = {"feedback": feedback, "k": k, "rounds": max_rounds}
        job = await anyio.to_thread.run_sync(ops.start_genir, index, query, knobs)
        return await run_result(job, wait_seconds, ctx)

    async def genir_feedback(
        session_id: SessionId,
        feedback: Annotated[
            str,
            Field(min_length=1, max_length=PROMPT_CHARS, description="what differs, or 'found: <rank or id>'"),
        ],
        ctx: McpContext,
        wait_seconds: WaitSeconds = 40,
    ) -> Annotated[CallToolResult, RunView]:
        """Answer a GenIR round: say what differs from the image you want (the query is refined and
        searched again), or 'found: <rank>' to finish."""
        job = await anyio.to_thread.run_sync(ops.genir_feedback, session_id, feedback)
        return await run_result(job, wait_seconds, ctx)

    async def rage_retrieve(
        prompt: Prompt,
        index: Index,
        k: Annotated[int | None, bounded("k", unset=True, description="candidates to show")] = None,
        where: Where = None,
        similarity_threshold: Annotated[float | None, bounded("similarity_threshold", unset=True)] = None,
        review: Annotated[
            Literal["none", "critic"] | None, Field(description="critic: a VLM checks each image and asks again")
        ] = None,
        max_generations: Annotated[int | None, bounded("max_generations", unset=True)] = None,
        max_images: Annotated[int, bounded("max_images")] = 10,
    ) -> CallToolResult:
        """RAGE, step 1: retrieve the catalogue images that best match a prompt, for the user to pick from.

        Returns JSON {session_id, prompt, candidates: [{position, id, path, caption, score}], ask}, then
        a label and a thumbnail per candidate. Show them to the user and call rage_generate with their picks."""
        knobs = {
            "k": k,
            "similarity_threshold": similarity_threshold,
            "review": review,
            "max_generations": max_generations,
        }
        return await anyio.to_thread.run_sync(
            functools.partial(ops.rage_retrieve, prompt, index, knobs, where, max_images)
        )

    async def rage_generate(
        session_id: RageSessionId,
        selected: Annotated[
            list[int | str],
            Field(
                min_length=1,
                max_length=MAX_REFERENCES,
                description="the picks in the order to use them: positions as listed (1 first), ids or file names",
            ),
        ],
        ctx: McpContext,
        prompt: Annotated[
            str | None, Field(max_length=PROMPT_CHARS, description="a new prompt (default: the session's)")
        ] = None,
        wait_seconds: WaitSeconds = 40,
    ) -> Annotated[CallToolResult, RunView]:
        """RAGE, step 2: generate with the picked images, in pick order, and the prompt as written.

        A pick that names no candidate is refused before anything is generated. Returns the image and
        {session_id, final_image, selected, stop_reason, images, report}, or a run_id to poll."""
        job = await anyio.to_thread.run_sync(ops.start_rage_generate, session_id, selected, prompt or None)
        return await run_result(job, wait_seconds, ctx)

    async def get_run(
        run_id: RunId,
        ctx: McpContext,
        wait_seconds: Annotated[float, bounded("wait_seconds", description="wait this long for it to finish")] = 0,
    ) -> Annotated[CallToolResult, RunView]:
        """A run's status, progress and, once finished, its result (record, images)."""
        job = app.jobs.get(run_id)
        if job is not None:
            return await run_result(job, wait_seconds, ctx)
        view = await anyio.to_thread.run_sync(ops.run_view, run_id)
        return await anyio.to_thread.run_sync(ops.render_run, view)

    # Every hint said explicitly (the protocol's defaults assume the worst: destructive, open world).
    # Nothing here deletes a person's files: indexing writes FOLDER/.imageloop (forgetting images that
    # are gone), runs and sessions write new folders under the runs folder.
    reads = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)
    writes_new = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=True)
    indexes = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True, openWorldHint=False)
    server.tool_of(retrieve_images, "Search indexed images", reads)
    server.tool_of(index_images, "Index an image folder", indexes)
    server.tool_of(generate_with_references, "Generate with retrieved references (ImageRAG)", writes_new)
    server.tool_of(compose_retrieve, "Find an image like a reference, changed (CIR)", writes_new)
    server.tool_of(genir_round, "Start or show an image search (GenIR)", writes_new)
    server.tool_of(genir_feedback, "Answer an image search round (GenIR)", writes_new)
    server.tool_of(rage_retrieve, "Find references to pick for a prompt (RAGE)", writes_new)
    server.tool_of(rage_generate, "Generate with the picked references (RAGE)", writes_new)
    server.tool_of(get_run, "Check a run", reads)
    add_run_resources(server, app)
    return server


RUN_RESOURCES = [
    ("", "run_output", "A run's output", "An image a run wrote (final.png, draft.png, round_N.png), by run and name"),
    ("artifacts/", "run_artifact", "An image of a run", "Any image a run drew, by run and artifact (<sha256>.png)"),
]


def add_run_resources(server: FastMCP[Any], app: App) -> None:
    """Run outputs as resources (`imageloop://runs/<path under the runs folder>`), full size, for clients that
    fetch what a result names rather than its thumbnails."""

    def reader(folder: str) -> Callable[[str, str], bytes]:
        def read(run: str, name: str) -> bytes:
            path, media_type = app.run_file(f"{run}/{folder}{name}")
            if media_type != "image/png":
                raise ImageloopError(f"{run}/{folder}{name} is no image: these resources are a run's PNG images")
            return path.read_bytes()

        return read

    for folder, name, title, description in RUN_RESOURCES:
        uri = f"{RUN_RESOURCE}{{run}}/{folder}{{name}}"
        server.resource(uri, name=name, title=title, description=description, mime_type="image/png")(reader(folder))
