"""An interactive GenIR search: a person in a terminal gives the feedback, one round at a time.

Sessions are checkpointed in SQLite after every node, keyed by a thread id, so Ctrl-C (or closing the
terminal) loses nothing: `imageloop search --index DIR --resume THREAD_ID` continues at the question
that was pending, without drawing that round's image again. Each round's synthetic image and an HTML
page of the round are written to the session's output folder.
"""

from __future__ import annotations

import html
import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.types import Command

from imageloop.backends import make_embedder, make_generator, make_vlm
from imageloop.config import Settings
from imageloop.errors import ImageloopError
from imageloop.graphs.genir import FOUND_PREFIX, FeedbackKind, GenIRState, build_genir_graph, parse_found
from imageloop.runs import write_json_atomic
from imageloop.tools.artifacts import ArtifactStore
from imageloop.tools.image_index import open_index
from imageloop.tools.retriever import Retriever

Ask = Callable[[dict[str, Any]], str]
Show = Callable[[str], None]


def default_sessions_db() -> Path:
    """`$XDG_STATE_HOME/imageloop/sessions.sqlite` (default `~/.local/state/...`)."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "imageloop" / "sessions.sqlite"


def render_round_page(payload: dict[str, Any], synthetic: Path | None, page: Path) -> None:
    """Write an offline HTML page of one round: the query, the synthetic image and the top results."""
    rows = "\n".join(
        f'<figure><a href="{Path(r["path"]).resolve().as_uri()}"><img src="{Path(r["path"]).resolve().as_uri()}" '
        f'alt="{html.escape(r["caption"])}"></a><figcaption>{i}. {html.escape(r["id"][:12])} '
        f"({r['score']:.3f})<br>{html.escape(r['caption'])}</figcaption></figure>"
        for i, r in enumerate(payload["retrieved"])
    )
    drawn = f'<h2>What the system understood</h2><img class="synthetic" src="{synthetic.name}">' if synthetic else ""
    page.write_text(
        f"""<!doctype html><meta charset="utf-8"><title>Round {payload["round"]}</title>
<style>body{{font-family:sans-serif;margin:2em}} figure{{display:inline-block;width:180px;vertical-align:top}}
figure img{{width:170px}} img.synthetic{{max-width:320px}}</style>
<h1>Round {payload["round"]}: {html.escape(payload["query"])}</h1>{drawn}
<h2>Top results</h2>{rows}
""",
        encoding="utf-8",
    )


def run_search_session(
    index_path: Path,
    settings: Settings,
    out_dir: Path | None,
    *,
    query: str | None,
    rounds: int,
    k: int,
    feedback: FeedbackKind,
    resume: str | None,
    ask: Ask,
    show: Show,
    sessions_db: Path | None = None,
) -> dict[str, Any]:
    """Run (or resume) one search until found or out of rounds; returns the final state's summary."""
    if resume is None and not (query or "").strip():
        raise ImageloopError("a search starts from a query: pass --query or type one")
    index = open_index(index_path)
    retriever = Retriever(index, make_embedder(settings))
    generator = make_generator(settings) if feedback in ("visual", "hybrid") else None
    thread_id = resume or uuid.uuid4().hex[:12]
    out_dir = out_dir or Path("runs") / f"search-{thread_id}"
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = ArtifactStore(out_dir / "artifacts")
    db = sessions_db or default_sessions_db()
    db.parent.mkdir(parents=True, exist_ok=True)
    config = {"configurable": {"thread_id": thread_id}}
    with sqlite3.connect(db, check_same_thread=False) as conn:
        graph = build_genir_graph(make_vlm(settings), generator, retriever, artifacts, SqliteSaver(conn))
        if resume is not None:
            snapshot = graph.get_state(config)
            if not snapshot.values:
                raise ImageloopError(f"no search session {resume!r} in {db}")
            pending = [i.value for task in snapshot.tasks for i in task.interrupts]
            if not pending:
                show(f"session {thread_id} already finished: {snapshot.values.get('stop_reason')}")
                return _summary(thread_id, snapshot.values)
            command: Any = Command(resume=_ask_round(pending[0], artifacts, out_dir, ask, show))
        else:
            inputs: GenIRState = {"query": str(query), "max_rounds": rounds, "k": k, "feedback": feedback}
            command = inputs
            show(f"session {thread_id} (resume with --resume {thread_id})")
        while True:
            result = graph.invoke(command, config, version="v2")
            if not result.interrupts:
                state = result.value
                summary = _summary(thread_id, state)
                write_json_atomic(out_dir / "session.json", {**summary, "rounds": state.get("rounds", [])})
                return summary
            command = Command(resume=_ask_round(result.interrupts[0].value, artifacts, out_dir, ask, show))


def _ask_round(payload: dict[str, Any], artifacts: ArtifactStore, out_dir: Path, ask: Ask, show: Show) -> str:
    synthetic = None
    if payload.get("synthetic_image"):
        synthetic = out_dir / f"round_{payload['round']}.png"
        shutil.copyfile(payload["synthetic_image"], synthetic)
    page = out_dir / f"round_{payload['round']}.html"
    render_round_page(payload, synthetic, page)
    show(f"\nround {payload['round']}: {payload['query']}")
    if synthetic:
        show(f"  synthetic image: {synthetic}")
    for i, r in enumerate(payload["retrieved"]):
        show(f"  {i}. {r['path']}  ({r['score']:.3f})  id {r['id'][:12]}")
    show(f"  page: {page}")
    return resolve_found(ask(payload), payload["retrieved"])


def resolve_found(answer: str, retrieved: list[dict[str, Any]]) -> str:
    """Let a person say "found: 2" (a listed position) or a short id prefix; other answers pass through."""
    found = parse_found(answer)
    if found is None:
        return answer
    if found.isdigit() and int(found) < len(retrieved):
        return f"{FOUND_PREFIX} {retrieved[int(found)]['id']}"
    matches = [r["id"] for r in retrieved if r["id"].startswith(found)]
    return f"{FOUND_PREFIX} {matches[0]}" if len(matches) == 1 else answer


def _summary(thread_id: str, state: dict[str, Any]) -> dict[str, Any]:
    return {
        "thread_id": thread_id,
        "stop_reason": state.get("stop_reason"),
        "found_id": state.get("found_id"),
        "rounds_played": len(state.get("rounds", [])),
        "last_query": state.get("query"),
    }
