"""Past work, read from the runs folder: the ImageRAG runs, GenIR searches and RAGE sessions any face left there.

The records the loops write are the only source (`run.json` of a run or a RAGE session, `session.json` of a
search), so work started in the terminal, over MCP, by an agent or on LangGraph Server lists beside the
browser's own, and a record that cannot be read is left out rather than failing the list.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imageloop.app.results import PastKind, PastWork
from imageloop.app.search import SESSION_FILE
from imageloop.report import RECORD_FILE, REPORT_FILE

if TYPE_CHECKING:
    from imageloop.app.core import App

RECORDS = (f"*/{RECORD_FILE}", f"server/*/{RECORD_FILE}", f"search-*/{SESSION_FILE}")
"""Where the loops leave their records under the runs folder: runs and RAGE sessions, LangGraph Server's runs,
searches."""


def past_work(app: App, limit: int) -> list[PastWork]:
    """The `limit` most recently written records under `app.runs_dir`, newest first."""
    found: list[tuple[float, Path]] = []
    for pattern in RECORDS:
        for path in app.runs_dir.glob(pattern):
            try:
                found.append((path.stat().st_mtime, path))
            except OSError:  # removed while listing
                continue
    found.sort(reverse=True)
    entries = [_entry(app.runs_dir, path, updated) for updated, path in found[:limit]]
    return [entry for entry in entries if entry is not None]


def _entry(runs: Path, path: Path, updated: float) -> PastWork | None:
    """What a list shows of the record at `path` (None: unreadable, or not one of ours)."""
    try:
        record: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    folder = path.parent
    report = folder / REPORT_FILE
    if path.name == SESSION_FILE:
        status = record.get("stop_reason") if record.get("status") == "finished" else record.get("status")
        return PastWork(
            kind="search", id=str(record.get("session_id") or folder.name.removeprefix("search-")),
            title=str(record.get("query") or ""), status=str(status), updated=updated, folder=str(folder),
            final_image=record.get("found_path"),
        )  # fmt: skip
    kind: PastKind
    # Why it stopped once it has; until then how it stands (a run is recorded from its first step: `running`).
    status = record.get("stop_reason") or record.get("status")
    if record.get("loop") == "rage":
        kind, work_id = "rage", str(record.get("run_id") or folder.name.removeprefix("rage-"))
    else:
        kind, work_id = "generate", folder.relative_to(runs).as_posix()
    return PastWork(
        kind=kind, id=work_id, title=str(record.get("prompt") or ""), status=str(status), updated=updated,
        folder=str(folder), final_image=record.get("final_image"), report=str(report) if report.is_file() else None,
    )  # fmt: skip
