"""The MCP tools: the agent tools declared once in `imageloop.app.agent_tools` (names, arguments derived from
the loops' knobs, descriptions, hints, operations), served over the official SDK and rendered as JSON text
plus labelled PNG thumbnails.

Built on the SDK's 1.x line (`mcp.server.fastmcp.FastMCP`, public API only), not 2.x (`MCPServer`):
langchain-mcp-adapters, the usual way a LangGraph agent loads MCP tools, still pins `mcp<2`, and a server
that shares an environment with its LangGraph clients must resolve with them.

Long work runs as a background run of the app (`App.jobs`): the call waits up to `wait_seconds`, reporting
each step as progress, and otherwise returns a run id for `get_run`, so no call outlives a client's ~60 s
timeout silently. A client that disconnects leaves the run to finish; at shutdown unfinished runs are
cancelled at a step boundary with their records whole.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import unquote

import anyio
import anyio.to_thread
from mcp.server.fastmcp import Context, FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.server.transport_security import TransportSecuritySettings
from mcp.types import CallToolResult, ContentBlock, ImageContent, TextContent, ToolAnnotations
from pydantic import ValidationError

from imageloop import __version__
from imageloop.app import App
from imageloop.app.agent_tools import TOOLS, AgentOps, ToolArgs, ToolSpec, pictures, unknown_arguments
from imageloop.app.jobs import Job, Note, job_state
from imageloop.app.links import MCP_BASE, Links
from imageloop.app.results import RunState
from imageloop.errors import ImageloopError
from imageloop.thumbnails import RESULT_IMAGE_BUDGET, encode_png_under, image_budgets
from imageloop.tools.images import open_image, png_bytes

HEARTBEAT_S = 10.0
RUN_RESOURCE = "imageloop://runs/"
McpContext = Context[Any, Any, Any]


class Renderer:
    """Results as tool answers: the JSON the app answered, then a label and a thumbnail per picture. With `links`
    (a remote client: streamable HTTP), every path in them is the resource a client reads instead."""

    def __init__(self, app: App, links: Links | None = None) -> None:
        self.app = app
        self.links = links

    def say(self, text: str) -> str:
        """A message as this server's client names files (paths locally, resources remotely)."""
        return self.links.publish_text(text) if self.links is not None else text

    def answer(
        self, structured: Mapping[str, Any], shown: Sequence[tuple[str, str]], is_error: bool = False
    ) -> CallToolResult:
        """JSON text first (for clients that ignore structured output), then labelled images."""
        blocks = self.image_blocks([(self.say(self._full_size(label, path)), path) for label, path in shown])
        if self.links is not None:
            structured = self.links.publish(structured)
        text = TextContent(type="text", text=json.dumps(structured, ensure_ascii=False))
        return CallToolResult(content=[text, *blocks], structuredContent=dict(structured), isError=is_error)

    def run(self, state: RunState, limit: int) -> CallToolResult:
        """A run's state; a finished run's pictures follow."""
        shown = pictures(state.kind, state.result, limit) if state.result else []  # type: ignore[arg-type]
        return self.answer(state.model_dump(mode="json"), shown, is_error=state.status == "error")

    def image_blocks(self, shown: Sequence[tuple[str, str]]) -> list[ContentBlock]:
        """A label and a downscaled PNG per (label, path); paths outside the roots are named, not read."""
        blocks: list[ContentBlock] = []
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
        return blocks

    def _full_size(self, label: str, path: str) -> str:
        """A thumbnail's label, naming the run resource that reads it at full size (`imageloop://runs/...`).

        Named in the text rather than as a resource link: clients such as langchain-mcp-adapters turn an image
        link into an image URL for the model, which a model provider cannot fetch."""
        relative = self.app.run_relative(path)
        return f"{label} (full size: {RUN_RESOURCE}{relative})" if relative and path.endswith(".png") else label


class _Server(FastMCP[Any]):
    """FastMCP with one-line errors: an unknown argument (with the valid ones), the field that failed
    validation, or the imageloop error as is (its paths named as the client names files)."""

    def __init__(self, *args: Any, say: Callable[[str], str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.specs: dict[str, ToolSpec] = {}
        self.say = say

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Sequence[ContentBlock] | dict[str, Any]:
        spec = self.specs.get(name)
        try:
            if spec is not None:
                unknown_arguments(spec, arguments)
            return await super().call_tool(name, arguments)
        except ImageloopError as e:
            raise ToolError(self.say(str(e))) from None
        except ToolError as e:
            cause = e.__cause__
            if isinstance(cause, ValidationError):
                raise ToolError(f"{name}: {_validation_message(cause)}") from None
            if isinstance(cause, ImageloopError):
                raise ToolError(self.say(f"{name}: {cause}")) from None
            raise


def _validation_message(error: ValidationError) -> str:
    parts = []
    for detail in error.errors():
        where = ".".join(str(part) for part in detail["loc"]) or "arguments"
        parts.append(f"invalid {where}: {str(detail['msg']).removeprefix('Value error, ')}")
    return "; ".join(parts)


def _tool_function(spec: ToolSpec, handle: Callable[[ToolArgs, McpContext], Any]) -> Callable[..., Any]:
    """An async function FastMCP reads as the tool: its parameters are the spec's arguments, field for field."""

    async def tool(ctx: McpContext, **arguments: Any) -> CallToolResult:
        result: CallToolResult = await handle(spec.args.model_validate(arguments), ctx)
        return result

    parameters = [
        inspect.Parameter(
            name,
            inspect.Parameter.KEYWORD_ONLY,
            default=inspect.Parameter.empty if info.is_required() else info.default,
            annotation=Annotated[info.annotation, info],
        )
        for name, info in spec.args.model_fields.items()
    ]
    parameters.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY, annotation=McpContext))
    returns = CallToolResult if spec.name == "retrieve_images" else Annotated[CallToolResult, RunState]
    tool.__signature__ = inspect.Signature(parameters, return_annotation=returns)  # type: ignore[attr-defined]
    tool.__annotations__ = {"ctx": McpContext, "return": returns}
    tool.__name__ = spec.name
    tool.__doc__ = spec.description
    return tool


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


def build_server(app: App, security: TransportSecuritySettings | None = None, *, remote: bool = False) -> FastMCP[Any]:
    """The MCP server exposing `app`'s operations as the agent tools (`imageloop.app.agent_tools.TOOLS`).

    `remote` (streamable HTTP): the client runs elsewhere, so answers and errors name files as resources
    (`imageloop://runs/...`, `imageloop://roots/<i>/...`), never as paths on this machine.
    """
    links = Links(app, MCP_BASE, one_segment=True) if remote else None
    ops, render = AgentOps(app), Renderer(app, links)
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
        say=render.say,
    )
    server._mcp_server.version = __version__  # serverInfo.version: imageloop's, not the SDK's

    def handler(spec: ToolSpec) -> Callable[[ToolArgs, McpContext], Any]:
        async def handle(args: ToolArgs, ctx: McpContext) -> CallToolResult:
            limit = int(getattr(args, "max_images", 10))
            answered = await anyio.to_thread.run_sync(ops.call, spec.name, args)
            if isinstance(answered, Job):
                await _follow(answered, float(getattr(args, "wait_seconds", 0)), ctx)
                return render.run(job_state(answered), limit)
            if isinstance(answered, RunState):
                return render.run(answered, limit)
            if spec.name == "retrieve_images":
                return render.answer(answered, pictures("retrieve", answered, limit))
            # A search shown as it stands (genir_round with a session_id): a finished "run" of its own.
            state = RunState(
                run_id=answered.session_id,
                kind="genir",
                status="done",
                progress=[],
                result=answered.model_dump(mode="json"),
            )
            return render.run(state, limit)

        return handle

    for spec in TOOLS:
        hints = spec.hints
        annotations = ToolAnnotations(
            title=spec.title, readOnlyHint=hints.read_only, destructiveHint=hints.destructive,
            idempotentHint=hints.idempotent, openWorldHint=hints.open_world,
        )  # fmt: skip
        # The title twice: on the tool (protocol 2025-06-18) and in its annotations (where 2025-03-26 put it).
        server.tool(name=spec.name, title=spec.title, description=spec.description, annotations=annotations)(
            _tool_function(spec, handler(spec))
        )
        server.specs[spec.name] = spec
    add_run_resources(server, app)
    return server


RUN_RESOURCES = [
    ("", "run_output", "A run's output", "An image a run wrote (final.png, draft.png, round_N.png), by run and name"),
    ("artifacts/", "run_artifact", "An image of a run", "Any image a run drew, by run and artifact (<sha256>.png)"),
]


def add_run_resources(server: FastMCP[Any], app: App) -> None:
    """Run outputs as resources (`imageloop://runs/<path under the runs folder>`), full size, for clients that
    fetch what a result names rather than its thumbnails; and the images under the roots a result names
    (`imageloop://roots/<i>/<path, its slashes quoted>`), as PNG."""

    def reader(folder: str) -> Callable[[str, str], bytes]:
        def read(run: str, name: str) -> bytes:
            path, media_type = app.run_file(f"{run}/{folder}{name}")
            if media_type != "image/png":
                raise ImageloopError(f"{run}/{folder}{name} is no image: these resources are a run's PNG images")
            return path.read_bytes()

        return read

    def run_document(relative: str, media: str) -> str:
        path, media_type = app.run_file(relative)
        if media_type != media:
            raise ImageloopError(f"{relative} is no {media} document")
        return path.read_text(encoding="utf-8")

    def run_page(run: str, page: str) -> str:
        return run_document(f"{run}/{page}.html", "text/html")

    def run_record(run: str) -> str:
        return run_document(f"{run}/run.json", "application/json")

    def root_image(root: str, path: str) -> bytes:
        found, _ = Links(app, MCP_BASE, one_segment=True).resolve(f"roots/{root}/{unquote(path)}")
        return png_bytes(open_image(found))

    # Pages and records first: the image templates would match their names too.
    server.resource(
        f"{RUN_RESOURCE}{{run}}/{{page}}.html", name="run_page", title="A run's page",
        description="A run's report.html, or a search round's round_N.html", mime_type="text/html",
    )(run_page)  # fmt: skip
    server.resource(
        f"{RUN_RESOURCE}{{run}}/run.json", name="run_record", title="A run's record",
        description="A run's or a RAGE session's run.json", mime_type="application/json",
    )(run_record)  # fmt: skip
    for folder, name, title, description in RUN_RESOURCES:
        uri = f"{RUN_RESOURCE}{{run}}/{folder}{{name}}"
        server.resource(uri, name=name, title=title, description=description, mime_type="image/png")(reader(folder))
    server.resource(
        f"{MCP_BASE}roots/{{root}}/{{path}}", name="root_image", title="An image under a root",
        description="An indexed image a result names, by root number and path (as PNG)", mime_type="image/png",
    )(root_image)  # fmt: skip
