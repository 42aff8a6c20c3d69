"""The page of a GenIR round (`round_N.html` in the search's folder), for a person answering at a terminal.

`imageloop search` prints a round's results as paths; this page shows them: the drawing of what the
system understood, large, beside the results numbered as the terminal lists them (from 1), how to answer
(`found: N`, or what differs), the session id that continues the search from any face, and every earlier
round with its drawing, results and the answer given. It works offline (no script, no external file):
round drawings are linked relatively, indexed images by `file://` address.
"""

from __future__ import annotations

import html
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from imageloop.files import write_atomic

DRAWING_WIDTH = 384
"""How wide the drawing is shown: small drawings (a tiny model's 64 px) are scaled up to be read."""

_STYLE = f"""body{{font-family:sans-serif;margin:2em;color:#222;max-width:1400px}}
.round{{display:flex;gap:2em;align-items:flex-start}} .drawing img{{width:{DRAWING_WIDTH}px;height:auto}}
.drawing figcaption,.answer{{color:#444}} .results{{display:flex;flex-wrap:wrap;gap:1em;flex:1}}
.results figure{{margin:0;width:180px}} .results img{{width:180px;height:auto}}
figcaption{{font-size:0.9em}} .answer{{background:#f4f4ef;padding:0.8em 1em;border-radius:6px}}
.earlier{{border-top:1px solid #ccc;margin-top:2em;padding-top:1em}} .earlier .drawing img{{width:192px}}
.earlier .results figure,.earlier .results img{{width:120px}} code{{background:#eee;padding:0 0.3em}}"""


def publish_round(
    payload: Mapping[str, Any], out_dir: Path, session_id: str, earlier: Sequence[Mapping[str, Any]] = ()
) -> tuple[Path | None, Path]:
    """Copy a round's drawing into `out_dir` as `round_N.png` and write its page; returns both paths.

    `payload` is the round's question (the GenIR interrupt); `earlier` the rounds before it as the graph records
    them (query, retrieved, feedback; their drawings were copied when they were shown).
    """
    number = int(payload["round"])
    drawing = None
    if payload.get("synthetic_image"):
        drawing = out_dir / f"round_{number}.png"
        shutil.copyfile(payload["synthetic_image"], drawing)
    page = out_dir / f"round_{number}.html"
    write_atomic(page, render_round_page(payload, drawing, session_id, earlier, out_dir))
    return drawing, page


def render_round_page(
    payload: Mapping[str, Any],
    drawing: Path | None,
    session_id: str,
    earlier: Sequence[Mapping[str, Any]],
    out_dir: Path,
) -> str:
    """The round's page: this round first, then the earlier ones, latest first."""
    number = payload["round"]
    ask = html.escape(str(payload.get("ask") or ""))
    answer = (
        f'<div class="answer"><b>How to answer</b> (in the terminal where the search runs): {ask}<br>'
        f"Type <code>found: N</code> with N the number under the image you mean, or say in words what differs "
        f"from the image you want; the next round draws and searches again.<br>Session <code>{session_id}</code>: "
        f"continue it later, or from another face, with <code>imageloop search --resume {session_id}</code> "
        f"(or in the browser UI, or with the agent tools' <code>genir_feedback</code>).</div>"
    )
    current = _round_section(drawing.name if drawing else None, payload["retrieved"])
    past = [
        _round_section(
            _earlier_drawing(r, out_dir),
            r["retrieved"],
            title=f"Round {r['round']}: {r['query']}",
            feedback=r.get("feedback"),
        )
        for r in reversed(earlier)
    ]
    history = f'<div class="earlier"><h2>Earlier rounds</h2>{"".join(past)}</div>' if past else ""
    title = f"Round {number}: {html.escape(str(payload['query']))}"
    return (
        f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><link rel="icon" href="data:,">'
        f"<title>{title}</title><style>{_STYLE}</style></head>\n<body>\n"
        f"<h1>{title}</h1>\n{answer}\n{current}\n{history}\n</body></html>\n"
    )


def _earlier_drawing(record: Mapping[str, Any], out_dir: Path) -> str | None:
    """An earlier round's drawing, as copied when that round was shown (None: it drew nothing)."""
    name = f"round_{record['round']}.png"
    return name if record.get("synthetic_image") and (out_dir / name).is_file() else None


def _round_section(
    drawing: str | None, retrieved: Sequence[Mapping[str, Any]], title: str | None = None, feedback: str | None = None
) -> str:
    """One round: the drawing (if it drew one) beside its results, numbered from 1, and the answer given."""
    drawn = (
        f'<figure class="drawing"><img src="{html.escape(drawing)}" alt="what the system understood">'
        "<figcaption>What the system understood</figcaption></figure>"
        if drawing
        else ""
    )
    results = "".join(
        f'<figure><a href="{_uri(r["path"])}"><img src="{_uri(r["path"])}" alt="{html.escape(r["caption"])}"></a>'
        f"<figcaption><b>{position}</b>. {html.escape(Path(r['path']).name)} ({float(r['score']):.3f})<br>"
        f"{html.escape(r['caption'])}</figcaption></figure>"
        for position, r in enumerate(retrieved, start=1)
    )
    heading = f"<h3>{html.escape(title)}</h3>" if title else ""
    said = f"<p>Answered: <i>{html.escape(feedback)}</i></p>" if feedback else ""
    return f'<section>{heading}<div class="round">{drawn}<div class="results">{results}</div></div>{said}</section>'


def _uri(path: str) -> str:
    return html.escape(Path(path).resolve().as_uri())
