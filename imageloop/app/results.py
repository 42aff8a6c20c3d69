"""What the application answers, typed: every face renders these, so a key a face shows is named the same on all.

A session (GenIR search, RAGE) is named by `session_id` and is in one `status`; results a person picks from
carry their `position` as listed (from 1); images are paths on this machine, which a remote face turns
into URLs or resources (`App.run_relative`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class Shown(BaseModel):
    """A retrieved image as a person sees it: its position as listed (from 1), id, path, caption and score."""

    position: int
    id: str
    path: str
    caption: str
    score: float


def shown_list(results: list[dict[str, Any]]) -> list[Shown]:
    """Results (graph state's dicts) with their positions as first listed (numbered here if they have none)."""
    return [
        Shown(
            position=r.get("position", number),
            id=r["id"],
            path=r["path"],
            caption=r.get("caption", ""),
            score=r["score"],
        )
        for number, r in enumerate(results, start=1)
    ]


SearchStatus = Literal["awaiting_feedback", "incomplete", "finished"]


class SearchView(BaseModel):
    """A GenIR search as it stands: the round to answer, or how it ended ("incomplete": cut off mid-round)."""

    session_id: str
    status: SearchStatus
    stop_reason: str | None = None
    found_id: str | None = None
    found_path: str | None = None
    rounds_played: int = 0
    query: str | None = Field(default=None, description="the round's query, or the last one")
    out_dir: str
    knobs: dict[str, Any]
    round: int | None = None
    feedback_kind: str | None = None
    synthetic_image: str | None = None
    retrieved: list[Shown] = []
    page: str | None = None
    ask: str | None = None
    last_round: dict[str, Any] | None = None


RAGEStatus = Literal["awaiting_selection", "awaiting_review", "incomplete", "finished"]


class RAGEView(BaseModel):
    """A RAGE session as it stands: the candidates (to pick from), the picks, the images drawn, the question
    pending (`question`, `ask`) or how it ended; `report` and `record` are its page and run.json."""

    session_id: str
    status: RAGEStatus
    prompt: str | None
    where: dict[str, Any] | None = None
    candidates: list[Shown] = []
    selected: list[Shown] = []
    images: list[dict[str, Any]] = []
    final_image: str | None = None
    stop_reason: str | None = None
    error: str | None = None
    question: dict[str, Any] | None = None
    ask: str | None = None
    knobs: dict[str, Any]
    out_dir: str
    report: str
    record: str


class CIRResult(BaseModel):
    """A composed retrieval: what the reference shows, the description after the change, the ranked images."""

    reference: str
    change: str
    reference_description: str | None
    edited_description: str | None
    results: list[Shown]
    proxy_image: str | None
    stop_reason: str | None
    verifications: int
    attempts: list[dict[str, Any]]
    knobs: dict[str, Any]
    steps: list[dict[str, Any]]


class RunState(BaseModel):
    """A background run: queued or running (poll it by `run_id`), or finished with its result or error."""

    run_id: str
    kind: str
    status: str
    progress: list[str] = Field(description="the latest progress messages, oldest first")
    error: str | None = None
    result: dict[str, Any] | None = None
    poll: str | None = Field(default=None, description="what to call next while the run is not finished")


PastKind = Literal["generate", "search", "rage"]


class PastWork(BaseModel):
    """A run or session some face left in the runs folder, as a list of past work shows it: what it was
    about, how it stands, and its files (paths on this machine; the report and final image when it has them)."""

    kind: PastKind
    id: str = Field(description="a run's folder under the runs folder, or a session's id")
    title: str
    status: str
    updated: float = Field(description="when its record was last written (seconds since the epoch)")
    folder: str
    final_image: str | None = None
    report: str | None = None
