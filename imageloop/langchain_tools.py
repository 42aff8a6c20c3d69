"""LangChain tools over the application layer, so a LangChain or LangGraph agent can run an image loop as a tool.

The tools are the MCP server's operations on the same `App`: `index_images`, `retrieve_images`,
`generate_with_references` (ImageRAG), `compose_retrieve` (composed image retrieval), `genir_round` /
`genir_feedback` (a GenIR search across calls, keyed by a session id, shared with every other face),
`rage_retrieve` / `rage_generate` (RAGE: the user picks references from their catalogue) and `get_run`.
`response_format="content_and_artifact"`: a short text for the model, and an artifact (paths, scores,
run and session ids) that the application reads from the `ToolMessage` without the model paying
tokens for it. Arguments are bounded by `imageloop.limits`, as on every face.

An agent chooses the paths it passes, so every folder, index and image must lie inside the app's
roots (relative paths are taken inside the first); runs are written under its runs folder. A user
error (a missing index, a path outside the roots, an argument out of bounds) comes back to the model
as the tool's one-line answer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field, ValidationError, model_validator

from imageloop import limits
from imageloop.app import App
from imageloop.config import (
    CriticKind,
    FeedbackKind,
    FinalImage,
    Mode,
    ReferencesPolicy,
    RetrievalQuery,
    Settings,
    bounded,
)
from imageloop.errors import ImageloopError
from imageloop.limits import MAX_REFERENCES, PATH_CHARS, PROMPT_CHARS
from imageloop.report import REPORT_FILE
from imageloop.thumbnails import RESULT_IMAGE_BUDGET, encode_png_under, image_budgets

P = ParamSpec("P")
R = TypeVar("R")
Answer = tuple[str | list[dict[str, Any]], dict[str, Any]]

ID_PATTERN = r"^[0-9a-f]{12}$"
LISTED = 8  # results named in a tool's text; the artifact always has all of them
CAPTION_CHARS = 90
MAX_IMAGES = 8  # pictures in one answer (each a thumbnail under the shared size cap)
PATH_HINT = " (absolute, or relative to the first allowed folder)"


def _path(description: str) -> Any:
    return Field(min_length=1, max_length=PATH_CHARS, description=description + PATH_HINT)


def _text(description: str, default: Any = ...) -> Any:
    return Field(default, min_length=1, max_length=PROMPT_CHARS, description=description)


class IndexImagesArgs(BaseModel):
    """Arguments of `index_images`."""

    folder: str = _path("folder of images to index, kept in FOLDER/.imageloop")
    batch_size: int = bounded("batch_size")


class RetrieveImagesArgs(BaseModel):
    """Arguments of `retrieve_images`: a text query or an image path, not both."""

    index: str = _path("an indexed image folder")
    query: str | None = _text("what the wanted images show", None)
    image_path: str | None = Field(
        None, max_length=PATH_CHARS, description="an image file: find indexed images that look like it"
    )
    k: int = bounded("k", description="how many images to return")
    similarity_threshold: float | None = bounded("similarity_threshold")

    @model_validator(mode="after")
    def _one_query(self) -> RetrieveImagesArgs:
        if (self.query is None) == (self.image_path is None):
            raise ValueError("give exactly one of query (text) or image_path")
        return self


class GenerateArgs(BaseModel):
    """Arguments of `generate_with_references`; unset knobs keep the configured settings."""

    prompt: str = _text("what to draw")
    index: str = _path("an indexed image folder to take reference images from")
    mode: Mode | None = Field(None, description="draft_first (critique a draft) or generation (plan first)")
    max_iterations: int | None = bounded("max_iterations", unset=True)
    top_k: int | None = bounded("top_k", unset=True)
    similarity_threshold: float | None = bounded("similarity_threshold", unset=True)
    wait_seconds: float = bounded("wait_seconds", description="wait this long for the run, then return its id")
    critic: CriticKind | None = Field(None, description="single_call (one JSON call) or paper (the paper's questions)")
    retrieval_query: RetrievalQuery | None = Field(None, description="search with the caption, concept or prompt")
    references_policy: ReferencesPolicy | None = Field(None, description="replace or accumulate per iteration")
    final_image_policy: FinalImage | None = Field(None, description="return the best judged image or the last")


class ComposeRetrieveArgs(BaseModel):
    """Arguments of `compose_retrieve`: a reference image and how the wanted image differs from it."""

    index: str = _path("an indexed image folder to search")
    reference: str = _path("the reference image")
    change: str = _text("how the wanted image differs from the reference, e.g. 'the same dress but red'")
    k: int | None = bounded("k", unset=True, description="how many images to return")
    proxy: bool = Field(False, description="also draw the edited scene and fuse its scores (slower)")
    verify: int | None = bounded("verify", unset=True)


class GenIRRoundArgs(BaseModel):
    """Arguments of `genir_round`, which starts a search session."""

    index: str = _path("an indexed image folder to search")
    query: str = _text("the user's description of the image wanted")
    feedback: FeedbackKind | None = Field(None, description="visual draws the query each round; verbal does not")
    rounds: int | None = bounded("rounds", unset=True)
    k: int | None = bounded("k", unset=True, description="results shown per round")


class GenIRFeedbackArgs(BaseModel):
    """Arguments of `genir_feedback`."""

    session_id: str = Field(pattern=ID_PATTERN, description="the session id genir_round returned")
    feedback: str = _text("the user's words on what differs from the image they want, or 'found: N' (N: a position)")


Scalar = str | int | float | bool


class RageRetrieveArgs(BaseModel):
    """Arguments of `rage_retrieve`, which starts a RAGE session."""

    prompt: str = _text("what to generate; the catalogue is searched with it too")
    index: str = _path("an indexed image folder: the user's catalogue")
    k: int | None = bounded("k", unset=True, description="candidates to show")
    where: dict[str, Scalar | list[Scalar]] | None = Field(
        None, description='metadata filter, e.g. {"tags": "sneaker"} or {"brand": "acme"}'
    )
    similarity_threshold: float | None = bounded("similarity_threshold", unset=True)
    review: Literal["none", "critic"] | None = Field(None, description="critic: a VLM checks each image")


class RageGenerateArgs(BaseModel):
    """Arguments of `rage_generate`."""

    session_id: str = Field(pattern=ID_PATTERN, description="the session id rage_retrieve returned")
    selected: list[int | str] = Field(
        min_length=1,
        max_length=MAX_REFERENCES,
        description="the user's picks in the order to use them: positions as listed (1 first), ids or file names",
    )
    prompt: str | None = _text("a new prompt (default: the session's)", None)


class GetRunArgs(BaseModel):
    """Arguments of `get_run`."""

    run_id: str = Field(pattern=ID_PATTERN, description="the run id generate_with_references returned")
    wait_seconds: float = Field(0, ge=0, le=limits.BOUNDS["wait_seconds"].high, description="wait this long for it")


def _user_errors(function: Callable[P, R]) -> Callable[P, R]:
    """Turn imageloop's user errors into ToolExceptions, which the tool hands back to the model as text."""

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return function(*args, **kwargs)
        except ImageloopError as e:
            raise ToolException(str(e)) from e

    return wrapper


def _validation_message(error: ValidationError) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"])
    message = str(first["msg"]).removeprefix("Value error, ")
    return f"invalid arguments: {where + ': ' if where else ''}{message}"


def _short(text: str, limit: int = CAPTION_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listing(results: Sequence[dict[str, Any]]) -> str:
    lines = [f"{i}. {_short(r['caption']) or '(no caption)'} (score {r['score']:.3f})" for i, r in enumerate(results)]
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


class _Toolbox:
    """The tools' operations: argument handling and rendering over one `App`."""

    def __init__(self, app: App, images: bool = False) -> None:
        self.app = app
        self.images = images

    def _answer(self, text: str, artifact: dict[str, Any], shown: Sequence[tuple[str, str]] = ()) -> Answer:
        """The text alone, or (for vision models) the text then labelled images as content blocks."""
        if not self.images or not shown:
            return text, artifact
        return [{"type": "text", "text": text}, *_image_blocks(shown[:MAX_IMAGES])], artifact

    def index_images(self, folder: str, batch_size: int | None = None) -> Answer:
        summary = self.app.index_folder(folder, batch_size=batch_size)
        root = self.app.path(folder, "folder", kind="dir")
        text = (
            f"Indexed {summary.indexed} new image(s) in {root.name}; {summary.skipped} were already indexed,"
            f" {summary.failed} could not be read and {summary.removed} were gone and removed."
        )
        return text, {**summary.to_json(), "index": str(root)}

    def retrieve_images(
        self,
        index: str,
        query: str | None = None,
        image_path: str | None = None,
        k: int | None = None,
        similarity_threshold: float | None = None,
    ) -> Answer:
        found = self.app.retrieve(index, query=query, image=image_path, k=k, similarity_threshold=similarity_threshold)
        asked = f"images like {Path(image_path).name}" if image_path is not None else f"{query!r}"
        root = str(self.app.index(index).root)
        results = [{"id": r.id, "path": str(r.path), "caption": r.caption, "score": round(r.score, 6)} for r in found]
        if not results:
            return f"No indexed image matched {asked}.", {"results": [], "index": root}
        text = f"{len(results)} image(s) for {asked}, best first:\n{_listing(results)}"
        shown = [(f"#{i}", str(r.path)) for i, r in enumerate(found)]
        return self._answer(text, {"results": results, "index": root}, shown)

    def generate_with_references(
        self,
        prompt: str,
        index: str,
        mode: Mode | None = None,
        max_iterations: int | None = None,
        top_k: int | None = None,
        similarity_threshold: float | None = None,
        critic: CriticKind | None = None,
        retrieval_query: RetrievalQuery | None = None,
        references_policy: ReferencesPolicy | None = None,
        final_image_policy: FinalImage | None = None,
        wait_seconds: float | None = None,
    ) -> Answer:
        knobs = {
            "mode": mode, "max_iterations": max_iterations, "top_k": top_k,
            "similarity_threshold": similarity_threshold, "critic": critic, "retrieval_query": retrieval_query,
            "references_policy": references_policy,
            "final_image_policy": final_image_policy,
        }  # fmt: skip
        job = self.app.start_generate(prompt, index, knobs)
        waited = limits.default("wait_seconds") if wait_seconds is None else wait_seconds
        return self._run(job.id, float(waited or 0))

    def compose_retrieve(
        self,
        index: str,
        reference: str,
        change: str,
        k: int | None = None,
        proxy: bool = False,
        verify: int | None = None,
    ) -> Answer:
        found = self.app.compose_retrieve(index, reference, change, k=k, proxy=proxy, verify=verify)
        results = found["results"]
        described = (
            f"Searched for {_short(str(found['edited_description']), 200)!r}" if found["edited_description"] else ""
        )
        if not results:
            return f"{described or 'Searched'}: no indexed image matched.", found
        listing = "\n".join(
            f"{i}. {Path(r['path']).name} (score {r['score']:.3f})" for i, r in enumerate(results[:LISTED])
        )
        more = f"\n… and {len(results) - LISTED} more" if len(results) > LISTED else ""
        return f"{described}, best first:\n{listing}{more}", found

    def genir_round(
        self,
        index: str,
        query: str,
        feedback: FeedbackKind | None = None,
        rounds: int | None = None,
        k: int | None = None,
    ) -> Answer:
        session = self.app.start_search(index, query, knobs={"feedback": feedback, "rounds": rounds, "k": k})
        return self._round(session)

    def genir_feedback(self, session_id: str, feedback: str) -> Answer:
        return self._round(self.app.continue_search(session_id, feedback))

    def _round(self, session: dict[str, Any]) -> Answer:
        shown = [("what the system understood", session["synthetic_image"])] if session.get("synthetic_image") else []
        shown += [(f"#{i}", r["path"]) for i, r in enumerate(session.get("retrieved") or [])]
        return self._answer(_round_text(session), {**session, "session_id": session["thread_id"]}, shown)

    def get_run(self, run_id: str, wait_seconds: float = 0) -> Answer:
        return self._run(run_id, wait_seconds)

    def _run(self, run_id: str, wait_seconds: float) -> Answer:
        """A run's answer: still going (its id to poll and its latest step), or what it did."""
        job = self.app.jobs.get(run_id)
        if job is not None:
            job.done.wait(wait_seconds)
        try:
            state = self.app.run_state(run_id)
        except ImageloopError:  # a run this process never held as a background run (the CLI's, say)
            state = {"run_id": run_id, "status": "done", "progress": [], "error": None}
            state["result"] = self.app.read_run(run_id)
        if state["status"] in ("queued", "running"):
            latest = f" Latest: {state['progress'][-1]}." if state["progress"] else ""
            text = f"Run {run_id} is {state['status']}.{latest} Call get_run with run_id {run_id!r} to check again."
            return text, {"run_id": run_id, "status": state["status"], "progress": state["progress"]}
        record = state["result"] or {}
        if not record:
            return f"Run {run_id} {state['status']}: {state['error']}", {"run_id": run_id, **state}
        text = _run_text(run_id, record) + (f" ({state['status']})" if state["status"] != "done" else "")
        shown = [(key, record[key]) for key in ("final_image", "draft_image") if record.get(key)]
        artifact = {**self._run_artifact(record), "status": state["status"], "record": record}
        return self._answer(text, artifact, shown)

    def rage_retrieve(
        self,
        prompt: str,
        index: str,
        k: int | None = None,
        where: dict[str, Any] | None = None,
        similarity_threshold: float | None = None,
        review: str | None = None,
    ) -> Answer:
        knobs = {"k": k, "similarity_threshold": similarity_threshold, "review": review}
        shown = self.app.start_rage(prompt, index, knobs=knobs, where=where)
        artifact = _rage_artifact(shown)
        if not shown["candidates"]:
            return f"Session {shown['session_id']}: nothing in the catalogue matched {prompt!r}.", artifact
        listing = "\n".join(
            f"{c['position']}. {_short(c['caption']) or Path(c['path']).name} ({Path(c['path']).name}, "
            f"score {c['score']:.3f})"
            for c in shown["candidates"][:LISTED]
        )
        more = len(shown["candidates"]) - LISTED
        text = (
            f"Session {shown['session_id']}: {len(shown['candidates'])} candidate(s), best first:\n{listing}"
            + (f"\n… and {more} more" if more > 0 else "")
            + "\nAsk the user which to use (positions), then call rage_generate."
        )
        return text, artifact

    def rage_generate(self, session_id: str, selected: list[int | str], prompt: str | None = None) -> Answer:
        shown = self.app.continue_rage(session_id, {"selected": selected, "prompt": prompt})
        picked = ", ".join(Path(c["path"]).name for c in shown["selected"])
        notes = [note for image in shown["images"] for note in image["notes"]]
        text = (
            f"Session {session_id}: generated with {picked} (stopped: {shown['stop_reason']})."
            + (f" Notes: {'; '.join(notes)}." if notes else "")
            + (" The image is saved." if shown["final_image"] else " No image was generated.")
        )
        return text, _rage_artifact(shown)

    def _run_artifact(self, record: dict[str, Any]) -> dict[str, Any]:
        run_dir = self.app.runs_dir / str(record["run_id"])
        return {
            "run_id": record["run_id"],
            "run_dir": str(run_dir),
            "final_image": record.get("final_image"),
            "draft_image": record.get("draft_image"),
            "report": str(run_dir / REPORT_FILE),
            "aligned": record.get("aligned"),
            "stop_reason": record.get("stop_reason"),
            "iterations": record.get("iterations"),
            "references": record.get("references"),
            "images": [{"iteration": i["iteration"], "path": i["path"]} for i in record.get("images") or []],
        }


def _run_text(run_id: str, record: dict[str, Any]) -> str:
    steps = record.get("steps") or []
    concepts = sorted({str(r["concept"]) for r in record.get("references") or []})
    return (
        f"Run {run_id}: {'aligned with the prompt' if record.get('aligned') else 'not aligned'}"
        f" (stopped: {record.get('stop_reason')}) after {record.get('iterations')} regeneration(s)"
        f" with {len(record.get('references') or [])} reference image(s)"
        + (f" for {', '.join(concepts)}" if concepts else "")
        + f", {len(steps)} steps in {record.get('seconds')} s."
        + (f" Missing concepts: {', '.join(record['missing_concepts'])}." if record.get("missing_concepts") else "")
        + (f" Error: {record['error']}" if record.get("error") else "")
    )


def _rage_artifact(shown: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "session_id",
        "status",
        "prompt",
        "candidates",
        "selected",
        "final_image",
        "stop_reason",
        "report",
        "out_dir",
    )
    images = [{"generation": i["iteration"], "path": i["path"], "notes": i["notes"]} for i in shown["images"]]
    return {**{key: shown[key] for key in keys}, "images": images}


def _round_text(session: dict[str, Any]) -> str:
    sid = session["thread_id"]
    if session["status"] == "finished":
        if session.get("found_id"):
            return f"Session {sid} finished: the user found their image after {session['rounds_played']} round(s)."
        last = session.get("last_round") or {}
        shown = f"\nLast results:\n{_listing(last['retrieved'])}" if last.get("retrieved") else ""
        played = session["rounds_played"]
        return f"Session {sid} finished without a find ({session['stop_reason']}) after {played} round(s).{shown}"
    drawn = " A synthetic image of the query was drawn for the user." if session.get("synthetic_image") else ""
    return (
        f"Session {sid}, round {session['round']}, query {_short(session['query'], 200)!r}.{drawn}\n"
        f"Results, best first:\n{_listing(session['retrieved'])}\n"
        "Ask the user what differs from the image they want (or 'found: N'), then call genir_feedback."
    )


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
    image and draft, a search round) carry them as image content blocks, for vision models.
    """
    if app is None:
        if not roots:
            raise ImageloopError("give the tools at least one folder they may index and search")
        app = App(settings, roots=roots, runs_dir=runs_dir, sessions_db=sessions_db)
    box = _Toolbox(app, images)
    specs: list[tuple[Callable[..., Answer], type[BaseModel], str]] = [
        (
            box.index_images,
            IndexImagesArgs,
            "Index a folder of images so it can be searched and used for references. Run once per folder "
            "(again after adding images: only new ones are processed).",
        ),
        (
            box.retrieve_images,
            RetrieveImagesArgs,
            "Find images in an indexed folder that match a text query, or that look like a given image.",
        ),
        (
            box.generate_with_references,
            GenerateArgs,
            "Draw an image for a prompt with ImageRAG: a critic names what a draft misses, reference images "
            "of those concepts are retrieved from the index, and the image is regenerated with them. Slow: "
            "waits up to wait_seconds, then returns a run id to poll with get_run.",
        ),
        (
            box.compose_retrieve,
            ComposeRetrieveArgs,
            "Composed image retrieval: find indexed images that show a reference image changed as a text says "
            "(e.g. 'the same dress but red and sleeveless'). Returns the edited description and ranked images.",
        ),
        (
            box.genir_round,
            GenIRRoundArgs,
            "Start an interactive search for an image the user has in mind; returns the first round's "
            "results and a session id. Continue with genir_feedback.",
        ),
        (
            box.genir_feedback,
            GenIRFeedbackArgs,
            "Give the user's feedback on the current round of a search session and get the next round.",
        ),
        (
            box.get_run,
            GetRunArgs,
            "Check a generate_with_references run: still running, or what it did (outcome, references, steps).",
        ),
        (
            box.rage_retrieve,
            RageRetrieveArgs,
            "Start generating from the user's own catalogue (RAGE): retrieve the indexed images that best match "
            "a prompt, for the user to pick from. Returns a session id and numbered candidates.",
        ),
        (
            box.rage_generate,
            RageGenerateArgs,
            "Generate an image from the prompt and the images the user picked (in their order) in a "
            "rage_retrieve session. Slow.",
        ),
    ]
    return [
        StructuredTool.from_function(
            func=_user_errors(function),
            name=function.__name__,
            description=description,
            args_schema=schema,
            response_format="content_and_artifact",
            handle_tool_error=True,
            handle_validation_error=_validation_message,
        )
        for function, schema, description in specs
    ]
