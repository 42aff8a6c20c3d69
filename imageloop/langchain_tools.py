"""LangChain tools over the application layer, so a LangChain or LangGraph agent can run an image loop as a tool.

The tools are the agent tools declared once in `imageloop.app.agent_tools`, the MCP server's too: the same
names, arguments (the loops' knobs among them), descriptions and background runs (a call waits up to
`wait_seconds`, then answers a run id for `get_run`; a session busy with a run refuses another call).
`response_format="content_and_artifact"`: a short text for the model, and as artifact the JSON the MCP
server answers (run and session ids, paths, scores), which the application reads from the `ToolMessage`
without the model paying tokens for it. With `images`, answers carry the same pictures as the MCP
server's, as standard image content blocks for vision models.

An agent chooses the paths it passes, so every folder, index and image must lie inside the app's roots
(relative paths are taken inside the first); runs are written under its runs folder. A user error (a
missing index, a path outside the roots, an argument out of bounds or unknown) comes back to the model as
the tool's one-line answer.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from langchain_core.tools import StructuredTool, ToolException
from pydantic import ValidationError

from imageloop.app import App
from imageloop.app.agent_tools import TOOLS, AgentOps, ToolSpec, pictures
from imageloop.app.jobs import Job, job_state
from imageloop.app.results import RunState
from imageloop.config import Settings
from imageloop.errors import ImageloopError
from imageloop.thumbnails import RESULT_IMAGE_BUDGET, encode_png_under, image_budgets

Answer = tuple[str | list[dict[str, Any]], dict[str, Any]]
LISTED = 8  # results named in a tool's text; the artifact always has all of them
CAPTION_CHARS = 90


def _validation_message(spec: ToolSpec) -> Callable[[ValidationError], str]:
    def message(error: ValidationError) -> str:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        if first["type"] == "extra_forbidden":
            return f"{spec.name}: unknown argument {where!r}; expected some of {', '.join(spec.args.model_fields)}"
        text = str(first["msg"]).removeprefix("Value error, ")
        return f"invalid arguments: {where + ': ' if where else ''}{text}"

    return message


def _short(text: str, limit: int = CAPTION_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listing(results: Sequence[Mapping[str, Any]]) -> str:
    lines = [
        f"{r['position']}. {_short(r.get('caption') or Path(r['path']).name)} (score {r['score']:.3f})" for r in results
    ]
    if len(lines) > LISTED:
        lines = [*lines[:LISTED], f"… and {len(lines) - LISTED} more"]
    return "\n".join(lines)


def _image_blocks(shown: Sequence[tuple[str, str]]) -> list[dict[str, Any]]:
    """LangChain's standard content blocks for labelled images: a text label, then a PNG within the size cap."""
    blocks: list[dict[str, Any]] = []
    each = image_budgets(len(shown), RESULT_IMAGE_BUDGET)
    for label, path in shown:
        try:
            data = encode_png_under(Path(path), each)
        except (ImageloopError, OSError):
            data = None
        if data is not None:
            blocks += [{"type": "text", "text": label}, {"type": "image", "base64": data, "mime_type": "image/png"}]
    return blocks


def _retrieval_text(result: Mapping[str, Any]) -> str:
    asked = f"images like {Path(result['image']).name}" if result.get("image") else repr(result.get("query"))
    if not result["results"]:
        return f"No indexed image matched {asked}."
    return f"{len(result['results'])} image(s) for {asked}, best first:\n{_listing(result['results'])}"


def _search_text(view: Mapping[str, Any]) -> str:
    sid = view["session_id"]
    if view["status"] == "finished":
        if view.get("found_id"):
            return f"Session {sid} finished: the user found their image after {view['rounds_played']} round(s)."
        last = view.get("last_round") or {}
        shown = f"\nLast results:\n{_listing(_numbered(last['retrieved']))}" if last.get("retrieved") else ""
        played = view["rounds_played"]
        return f"Session {sid} finished without a find ({view['stop_reason']}) after {played} round(s).{shown}"
    if view["status"] == "incomplete":
        return f"Session {sid} stopped mid-round; call genir_round with its session_id to play it on."
    drawn = " A drawing of what was understood was made for the user." if view.get("synthetic_image") else ""
    return (
        f"Session {sid}, round {view['round']}, query {_short(view['query'] or '', 200)!r}.{drawn}\n"
        f"Results, best first:\n{_listing(view['retrieved'])}\n"
        "Ask the user what differs from the image they want (or 'found: N'), then call genir_feedback."
    )


def _numbered(results: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{**r, "position": n} for n, r in enumerate(results, start=1)]


def _rage_text(view: Mapping[str, Any]) -> str:
    sid = view["session_id"]
    if view["status"] == "awaiting_selection":
        if not view["candidates"]:
            return f"Session {sid}: nothing in the catalogue matched {view['prompt']!r}."
        listing = _listing(view["candidates"])
        return (
            f"Session {sid}: {len(view['candidates'])} candidate(s), best first:\n{listing}\n"
            "Ask the user which to use (positions), then call rage_generate."
        )
    picked = ", ".join(Path(c["path"]).name for c in view["selected"])
    notes = [note for image in view["images"] for note in image.get("notes", [])]
    return (
        f"Session {sid}: generated with {picked or 'no picks'} (stopped: {view['stop_reason']})."
        + (f" Notes: {'; '.join(notes)}." if notes else "")
        + (" The image is saved." if view["final_image"] else " No image was generated.")
    )


def _cir_text(result: Mapping[str, Any]) -> str:
    described = (
        f"Searched for {_short(str(result['edited_description']), 200)!r}"
        if result["edited_description"]
        else "Searched"
    )
    if not result["results"]:
        return f"{described}: no indexed image matched."
    return f"{described}, best first:\n{_listing(result['results'])}"


def _generate_text(record: Mapping[str, Any]) -> str:
    steps = record.get("steps") or []
    concepts = sorted({str(r["concept"]) for r in record.get("references") or []})
    return (
        f"Run {record['run_id']}: {'aligned with the prompt' if record.get('aligned') else 'not aligned'}"
        f" (stopped: {record.get('stop_reason')}) after {record.get('iterations')} regeneration(s)"
        f" with {len(record.get('references') or [])} reference image(s)"
        + (f" for {', '.join(concepts)}" if concepts else "")
        + f", {len(steps)} steps in {record.get('seconds')} s."
        + (f" Missing concepts: {', '.join(record['missing_concepts'])}." if record.get("missing_concepts") else "")
        + (f" Error: {record['error']}" if record.get("error") else "")
    )


def _index_text(result: Mapping[str, Any]) -> str:
    return (
        f"Indexed {result['indexed']} new image(s) in {Path(result['folder']).name}; {result['skipped']} were "
        f"already indexed, {result['failed']} could not be read and {result['removed']} were gone and removed."
    )


RESULT_TEXTS: dict[str, Callable[[Mapping[str, Any]], str]] = {
    "index": _index_text,
    "generate": _generate_text,
    "cir": _cir_text,
    "genir": _search_text,
    "rage": _rage_text,
}


def _run_text(state: RunState) -> str:
    """What the model reads of a run: still going (its id to poll and its latest step), or what it did."""
    if state.status in ("queued", "running"):
        latest = f" Latest: {state.progress[-1]}." if state.progress else ""
        return (
            f"Run {state.run_id} is {state.status}.{latest} Call get_run with run_id {state.run_id!r} to check again."
        )
    if not state.result:
        return f"Run {state.run_id} {state.status}: {state.error}"
    text = RESULT_TEXTS[state.kind](state.result)
    return text + (f" ({state.status}: {state.error})" if state.status != "done" else "")


class _Toolbox:
    """Each tool's call: the shared operation, a wait for its run, and the answer rendered for a model."""

    def __init__(self, app: App, images: bool) -> None:
        self.ops = AgentOps(app)
        self.images = images

    def tool(self, spec: ToolSpec) -> Callable[..., Answer]:
        def call(**arguments: Any) -> Answer:
            args = spec.args.model_validate(arguments)
            limit = int(getattr(args, "max_images", 10))
            try:
                answered = self.ops.call(spec.name, args)
            except ImageloopError as e:
                raise ToolException(str(e)) from e
            if isinstance(answered, Job):
                answered.done.wait(float(getattr(args, "wait_seconds", 0)))
                answered = job_state(answered)
            if isinstance(answered, RunState):
                if answered.status == "error":  # as the MCP server marks it: the model reads a failed call
                    raise ToolException(_run_text(answered))
                shown = pictures(answered.kind, answered.result, limit) if answered.result else []  # type: ignore[arg-type]
                return self._answer(_run_text(answered), answered.model_dump(mode="json"), shown)
            if spec.name == "retrieve_images":
                return self._answer(_retrieval_text(answered), answered, pictures("retrieve", answered, limit))
            view = answered.model_dump(mode="json")  # a search shown as it stands
            state = RunState(run_id=view["session_id"], kind="genir", status="done", progress=[], result=view)
            return self._answer(_search_text(view), state.model_dump(mode="json"), pictures("genir", view, limit))

        call.__name__ = spec.name
        return call

    def _answer(self, text: str, artifact: dict[str, Any], shown: Sequence[tuple[str, str]]) -> Answer:
        """The text alone, or (for vision models) the text then labelled images as content blocks."""
        if not self.images or not shown:
            return text, artifact
        return [{"type": "text", "text": text}, *_image_blocks(shown)], artifact


def imageloop_tools(
    settings: Settings | None = None,
    *,
    roots: Sequence[Path] | None = None,
    runs_dir: Path | None = None,
    sessions_db: Path | None = None,
    app: App | None = None,
    images: bool = False,
) -> list[StructuredTool]:
    """The imageloop tools over `app` (or one built from `settings`, confined to `roots`, writing to `runs_dir`).

    Pass your own `app` to share its backends and indexes with the rest of your program, and close it
    when done (`app.close()`). With `images`, answers that show pictures (search results, a run's final
    image and draft, a search round, RAGE's candidates, CIR's results) carry them as image content blocks.
    """
    if app is None:
        if not roots:
            raise ImageloopError("give the tools at least one folder they may index and search")
        app = App(settings, roots=roots, runs_dir=runs_dir, sessions_db=sessions_db)
    box = _Toolbox(app, images)
    return [
        StructuredTool.from_function(
            func=box.tool(spec),
            name=spec.name,
            description=spec.description,
            args_schema=spec.args,
            response_format="content_and_artifact",
            handle_tool_error=True,
            handle_validation_error=_validation_message(spec),
        )
        for spec in TOOLS
    ]
