"""LangChain tools over imageloop's operations, so a LangChain or LangGraph agent can run an image loop as a tool.

The tools are the MCP server's operations, built over the same library functions: `index_images`,
`retrieve_images`, `generate_with_references` (ImageRAG), `genir_round` / `genir_feedback` (a GenIR
search across calls, keyed by a session id) and `get_run`. Each answers with
`response_format="content_and_artifact"`: a short text for the model, and an artifact (paths, scores,
run and session ids) that the application reads from the `ToolMessage` without the model paying
tokens for it.

An agent chooses the paths it passes, so every folder, index and image must lie inside `roots`
(relative paths are taken inside the first); runs and search sessions are written under `runs_dir`.
A user error (a missing index, a path outside the roots, an argument out of bounds) comes back to
the model as the tool's one-line answer.
"""

from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from langchain_core.tools import StructuredTool, ToolException
from pydantic import BaseModel, Field, ValidationError, model_validator

from imageloop.backends import make_embedder, make_vlm
from imageloop.config import Mode, Settings
from imageloop.errors import ImageloopError
from imageloop.graphs.genir import FeedbackKind
from imageloop.report import REPORT_FILE, read_record
from imageloop.runs import run_imagerag
from imageloop.search_session import continue_search, start_search
from imageloop.tools.indexing.image_index import open_index
from imageloop.tools.indexing.indexer import index_folder
from imageloop.tools.indexing.retriever import Retriever

P = ParamSpec("P")
R = TypeVar("R")
Answer = tuple[str, dict[str, Any]]

ID_PATTERN = r"^[0-9a-f]{12}$"
LISTED = 8  # results named in a tool's text; the artifact always has all of them
CAPTION_CHARS = 90
PATH_HINT = " (absolute, or relative to the first allowed folder)"


class IndexImagesArgs(BaseModel):
    """Arguments of `index_images`."""

    folder: str = Field(description=f"folder of images to index, kept in FOLDER/.imageloop{PATH_HINT}")
    batch_size: int = Field(32, ge=1, le=256, description="images embedded per batch")


class RetrieveImagesArgs(BaseModel):
    """Arguments of `retrieve_images`: a text query or an image path, not both."""

    index: str = Field(description=f"an indexed image folder{PATH_HINT}")
    query: str | None = Field(None, min_length=1, max_length=2000, description="what the wanted images show")
    image_path: str | None = Field(
        None, description="an image file: find indexed images that look like it (image-route indexes only)"
    )
    k: int = Field(5, ge=1, le=50, description="how many images to return")
    similarity_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="drop results below this cosine")

    @model_validator(mode="after")
    def _one_query(self) -> RetrieveImagesArgs:
        if (self.query is None) == (self.image_path is None):
            raise ValueError("give exactly one of query (text) or image_path")
        return self


class GenerateArgs(BaseModel):
    """Arguments of `generate_with_references`; unset knobs keep the configured settings."""

    prompt: str = Field(min_length=1, max_length=4000, description="what to draw")
    index: str = Field(description=f"an indexed image folder to take reference images from{PATH_HINT}")
    mode: Mode | None = Field(None, description="draft_first (critique a draft) or generation (plan first)")
    max_iterations: int | None = Field(None, ge=1, le=5, description="regenerations with references at most")
    top_k: int | None = Field(None, ge=1, le=8, description="references retrieved per missing concept")
    similarity_threshold: float | None = Field(None, ge=-1.0, le=1.0, description="drop references below this")


class GenIRRoundArgs(BaseModel):
    """Arguments of `genir_round`, which starts a search session."""

    index: str = Field(description=f"an indexed image folder to search{PATH_HINT}")
    query: str = Field(min_length=1, max_length=2000, description="the user's description of the image wanted")
    feedback: FeedbackKind = Field("visual", description="visual draws the query each round; verbal does not")
    rounds: int = Field(5, ge=1, le=20, description="rounds at most")
    k: int = Field(5, ge=1, le=50, description="results shown per round")


class GenIRFeedbackArgs(BaseModel):
    """Arguments of `genir_feedback`."""

    session_id: str = Field(pattern=ID_PATTERN, description="the session id genir_round returned")
    feedback: str = Field(
        min_length=1,
        max_length=2000,
        description="the user's words on what differs from the image they want, or 'found: N' (N: a listed position)",
    )


class GetRunArgs(BaseModel):
    """Arguments of `get_run`."""

    run_id: str = Field(pattern=ID_PATTERN, description="the run id generate_with_references returned")


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


def new_run_id() -> str:
    """A run's id and folder name: 12 hex digits, as the MCP server's runs and GenIR session ids."""
    return uuid.uuid4().hex[:12]


class _Toolbox:
    """The tools' shared context: settings, the folders the agent may touch, where runs go."""

    def __init__(self, settings: Settings, roots: Sequence[Path], runs_dir: Path, sessions_db: Path | None) -> None:
        if not roots:
            raise ImageloopError("give the tools at least one folder they may index and search")
        self.settings = settings
        self.roots = [Path(root).expanduser().resolve() for root in roots]
        self.runs_dir = Path(runs_dir).expanduser().resolve()
        self.sessions_db = sessions_db or self.runs_dir / "sessions.sqlite"

    def allowed(self, given: str, what: str) -> Path:
        """`given` resolved (relative paths against the first root), refused outside the roots."""
        path = Path(given).expanduser()
        resolved = (path if path.is_absolute() else self.roots[0] / path).resolve()
        if not any(resolved.is_relative_to(root) for root in self.roots):
            allowed = ", ".join(str(root) for root in self.roots)
            raise ImageloopError(f"{what} {given} is outside the folders this agent may use ({allowed})")
        return resolved

    def index_images(self, folder: str, batch_size: int = 32) -> Answer:
        from imageloop.agents.captioner import VLMCaptioner

        root = self.allowed(folder, "folder")
        if not root.is_dir():
            raise ImageloopError(f"{folder} is not a folder")
        captioner: VLMCaptioner | None = None

        def caption(path: Path) -> str:
            # Built on first use: a folder whose images all have sidecar captions needs no VLM at all.
            nonlocal captioner
            if captioner is None:
                captioner = VLMCaptioner(make_vlm(self.settings, "captioner"))
            return captioner(path)

        summary = index_folder(root, make_embedder(self.settings), caption, batch_size=batch_size, progress=False)
        text = (
            f"Indexed {summary.indexed} new image(s) in {root.name}; {summary.skipped} were already indexed"
            f" and {summary.failed} could not be read."
        )
        return text, {**summary.to_json(), "index": str(root)}

    def retrieve_images(
        self,
        index: str,
        query: str | None = None,
        image_path: str | None = None,
        k: int = 5,
        similarity_threshold: float | None = None,
    ) -> Answer:
        image_index = open_index(self.allowed(index, "index"))
        try:
            retriever = Retriever(image_index, make_embedder(self.settings))
            if image_path is not None:
                found = retriever.search_image(self.allowed(image_path, "image"), k, similarity_threshold)
                asked = f"images like {Path(image_path).name}"
            else:
                found = retriever.search(str(query), k, similarity_threshold)
                asked = f"{query!r}"
        finally:
            image_index.close()
        results = [
            {"id": r.id, "path": str(r.path), "caption": r.caption, "score": round(float(r.score), 6)} for r in found
        ]
        if not results:
            return f"No indexed image matched {asked}.", {"results": [], "index": str(image_index.root)}
        text = f"{len(results)} image(s) for {asked}, best first:\n{_listing(results)}"
        return text, {"results": results, "index": str(image_index.root)}

    def generate_with_references(
        self,
        prompt: str,
        index: str,
        mode: Mode | None = None,
        max_iterations: int | None = None,
        top_k: int | None = None,
        similarity_threshold: float | None = None,
    ) -> Answer:
        knobs = {"mode": mode, "max_iterations": max_iterations, "top_k": top_k}
        update: dict[str, Any] = {name: value for name, value in knobs.items() if value is not None}
        if similarity_threshold is not None:
            update["similarity_threshold"] = similarity_threshold
        run_id = new_run_id()
        run_dir = self.runs_dir / run_id
        record = run_imagerag(prompt, self.settings.model_copy(update=update), self.allowed(index, "index"), run_dir)
        concepts = sorted({str(r["concept"]) for r in record["references"]})
        text = (
            f"Run {run_id}: {'aligned with the prompt' if record['aligned'] else 'not aligned'}"
            f" (stopped: {record['stop_reason']}) after {record['iterations']} regeneration(s)"
            f" with {len(record['references'])} reference image(s)"
            + (f" for {', '.join(concepts)}" if concepts else "")
            + ". The final image is saved; get_run gives the details."
        )
        return text, _run_artifact(run_id, run_dir, record)

    def genir_round(
        self, index: str, query: str, feedback: FeedbackKind = "visual", rounds: int = 5, k: int = 5
    ) -> Answer:
        session = start_search(
            self.allowed(index, "index"),
            self.settings,
            query=query,
            rounds=rounds,
            k=k,
            feedback=feedback,
            runs_dir=self.runs_dir,
            sessions_db=self.sessions_db,
        )
        return _round_text(session), {**session, "session_id": session["thread_id"]}

    def genir_feedback(self, session_id: str, feedback: str) -> Answer:
        session = continue_search(session_id, feedback, self.settings, sessions_db=self.sessions_db)
        return _round_text(session), {**session, "session_id": session["thread_id"]}

    def get_run(self, run_id: str) -> Answer:
        run_dir = self.runs_dir / run_id
        if not re.fullmatch(ID_PATTERN, run_id) or not run_dir.is_dir():
            raise ImageloopError(f"no run {run_id!r} in {self.runs_dir}")
        record = read_record(run_dir)
        steps = record.get("steps") or []
        text = (
            f"Run {run_id} for {_short(str(record.get('prompt')), 200)!r}:"
            f" {'aligned' if record.get('aligned') else 'not aligned'}, stopped: {record.get('stop_reason')},"
            f" {record.get('iterations')} regeneration(s), {len(record.get('references') or [])} reference(s),"
            f" {len(steps)} steps in {record.get('seconds')} s."
            + (f" Missing concepts: {', '.join(record['missing_concepts'])}." if record.get("missing_concepts") else "")
            + (f" Error: {record['error']}" if record.get("error") else "")
        )
        return text, {**_run_artifact(run_id, run_dir, record), "record": record}


def _run_artifact(run_id: str, run_dir: Path, record: dict[str, Any]) -> dict[str, Any]:
    return {
        "run_id": run_id,
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
    settings: Settings,
    *,
    roots: Sequence[Path],
    runs_dir: Path,
    sessions_db: Path | None = None,
) -> list[StructuredTool]:
    """The six imageloop tools over `settings`' backends, confined to `roots`, writing under `runs_dir`."""
    box = _Toolbox(settings, roots, runs_dir, sessions_db)
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
            "of those concepts are retrieved from the index, and the image is regenerated with them. Slow.",
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
        (box.get_run, GetRunArgs, "Read what a generate_with_references run did: outcome, references, steps."),
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
