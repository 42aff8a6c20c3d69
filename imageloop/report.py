"""A run directory's `report.html`: what the loop saw, decided and drew, readable offline in any browser.

The page is built from `run.json` alone, with no script and no external asset. Images are linked by
paths relative to the run directory, so the folder can be moved, archived or mailed as a whole:
images the run made are already inside it, and references (which live in the indexed folder) are
copied in as thumbnails under `report_files/`. Regenerate with `imageloop report RUN_DIR`.
"""

from __future__ import annotations

import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote

from imageloop.errors import ImageDecodeError, ImageloopError
from imageloop.files import write_atomic
from imageloop.tools.images import open_image

REPORT_FILE = "report.html"
# The record `imageloop.runs` writes; named here rather than imported because runs imports this module.
RECORD_FILE = "run.json"
FILES_DIR = "report_files"
THUMBNAIL_PX = 384

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#1d1d1f}
h1{font-size:1.5em;margin-bottom:.2em} h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}
h3{margin:.2em 0 .5em}
.summary{color:#444} .error{background:#fde8e8;border:1px solid #e0a0a0;padding:.6em 1em;border-radius:6px}
.gallery{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
figure{margin:0;width:260px} figure.big{width:400px} figure img{width:100%;height:auto;border:1px solid #ccc}
figcaption{font-size:.88em;color:#333;overflow-wrap:anywhere}
.missing{display:flex;align-items:center;justify-content:center;height:120px;background:#f3f3f3;color:#888;
border:1px dashed #bbb;font-size:.85em;text-align:center;padding:.5em}
.iteration{border:1px solid #e2e2e2;border-radius:8px;padding:1em;margin:1em 0} .iteration td:first-child{width:13em}
table{border-collapse:collapse;width:100%} th,td{text-align:left;vertical-align:top;padding:.3em .5em;
border-bottom:1px solid #eee} td.num{text-align:right;white-space:nowrap;font-variant-numeric:tabular-nums}
.bar{display:inline-block;height:.7em;background:#6b8fd6;border-radius:2px;vertical-align:middle}
.ok{color:#1a7f37;font-weight:600} .no{color:#b35900;font-weight:600}
code,pre{font:13px ui-monospace,monospace;background:#f6f6f6;border-radius:4px}
pre{padding:.5em;white-space:pre-wrap;overflow-wrap:anywhere} ul{margin:.3em 0}
figure.picked img{outline:4px solid #1a7f37}
"""


def read_record(run_dir: Path) -> dict[str, Any]:
    """The run's `run.json`, or an ImageloopError saying the folder is not a run directory."""
    path = Path(run_dir) / RECORD_FILE
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ImageloopError(f"{run_dir} is not a run directory: it has no {RECORD_FILE}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImageloopError(f"{path}: unreadable run record ({e})") from e
    if not isinstance(record, dict):
        raise ImageloopError(f"{path}: not a run record")
    return record


def write_report(run_dir: Path, record: Mapping[str, Any] | None = None) -> Path:
    """Render `run_dir/report.html` from the record (read from run.json when not given); returns its path."""
    run_dir = Path(run_dir)
    record = record if record is not None else read_record(run_dir)
    page = (_RAGEPage if record.get("loop") == "rage" else _Page)(run_dir).render(record)
    target = run_dir / REPORT_FILE
    write_atomic(target, page)
    return target


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _score(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, int | float) else "-"


class _Page:
    """One report being rendered: resolves each image to a relative link inside the run directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir.resolve()

    # Images.

    def _inside(self, path: Path) -> str | None:
        try:
            relative = path.resolve().relative_to(self.run_dir)
        except ValueError:
            return None
        return quote(relative.as_posix())

    def image_src(self, recorded: str | None) -> str | None:
        """A relative link for an image the run recorded, or None when it cannot be found.

        Recorded paths are absolute; when the folder was moved they are looked up again by name in
        the run directory and its artifacts. Images outside the folder are copied in as thumbnails.
        """
        if not recorded:
            return None
        path = Path(recorded)
        candidates = [path, self.run_dir / "artifacts" / path.name, self.run_dir / path.name]
        found = next((c for c in candidates if c.is_file()), None)
        if found is not None and (inside := self._inside(found)) is not None:
            return inside
        thumbnail = self.run_dir / FILES_DIR / f"{hashlib.sha256(recorded.encode()).hexdigest()[:20]}.png"
        # A thumbnail newer than its source is kept: a session's page is rendered again at every call.
        if found is not None and not (thumbnail.is_file() and thumbnail.stat().st_mtime >= found.stat().st_mtime):
            try:
                image = open_image(found)
            except ImageDecodeError:
                return None
            image.thumbnail((THUMBNAIL_PX, THUMBNAIL_PX))
            thumbnail.parent.mkdir(exist_ok=True)
            image.save(thumbnail, format="PNG")
        # A reference whose source has since moved keeps the thumbnail an earlier rendering made.
        return self._inside(thumbnail) if thumbnail.is_file() else None

    def figure(self, recorded: str | None, caption: str, css: str = "") -> str:
        src = self.image_src(recorded)
        klass = f' class="{css}"' if css else ""
        if src is None:
            shown = f"image not found: {recorded}" if recorded else "no image"
            return f'<figure{klass}><div class="missing">{_e(shown)}</div><figcaption>{caption}</figcaption></figure>'
        return (
            f'<figure{klass}><a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(_strip_tags(caption))}"></a>'
            f"<figcaption>{caption}</figcaption></figure>"
        )

    # Sections.

    def render(self, record: Mapping[str, Any]) -> str:
        steps: list[Mapping[str, Any]] = list(record.get("steps") or [])
        prompt = record.get("prompt") or ""
        sections = [
            self.header(record),
            self.outcome(record),
            self.iterations(record, steps),
            self.references(record.get("references") or []),
            self.timings(steps, record.get("seconds")),
            self.details(record),
        ]
        return _document(f"imageloop run: {prompt}", sections)

    def header(self, record: Mapping[str, Any]) -> str:
        aligned = record.get("aligned")
        verdict = '<span class="ok">aligned</span>' if aligned else '<span class="no">not aligned</span>'
        seconds = record.get("seconds")
        facts = [
            verdict,
            f"stopped: {_e(record.get('stop_reason'))}",
            f"{_e(record.get('iterations', 0))} iteration(s) with references",
            f"mode {_e(record.get('mode'))}",
        ]
        if isinstance(seconds, int | float):
            facts.append(f"{seconds:.2f} s")
        if record.get("created_at"):
            facts.append(_e(record["created_at"]))
        ended = "Stopped before it finished" if record.get("stop_reason") == "cancelled" else "The run failed"
        error = f'<p class="error">{ended}: {_e(record["error"])}</p>' if record.get("error") else ""
        return f'<h1>{_e(record.get("prompt"))}</h1>\n<p class="summary">{" · ".join(facts)}</p>{error}'

    def outcome(self, record: Mapping[str, Any]) -> str:
        figures = [self.figure(record.get("final_image"), "final image", "big")]
        if record.get("draft_image"):
            figures.append(self.figure(record.get("draft_image"), "draft (prompt alone)", "big"))
        missing = record.get("missing_concepts") or []
        captions = record.get("retrieval_captions") or []
        lines = [f'<div class="gallery">{"".join(figures)}</div>']
        lines.append(
            "<p><b>Missing concepts</b> (last critique): "
            + (", ".join(f"<code>{_e(c)}</code>" for c in missing) if missing else "none")
            + "</p>"
        )
        if captions:
            lines.append("<p><b>Retrieval captions</b> (last rewrite):</p>" + _caption_list(captions))
        return "<h2>Outcome</h2>\n" + "\n".join(lines)

    def iterations(self, record: Mapping[str, Any], steps: Sequence[Mapping[str, Any]]) -> str:
        images: list[Mapping[str, Any]] = list(record.get("images") or [])
        numbers = sorted({int(s.get("iteration", 0)) for s in steps} | {int(i.get("iteration", 0)) for i in images})
        if not numbers:
            return ""
        cards = [self.iteration(n, images, [s for s in steps if int(s.get("iteration", 0)) == n]) for n in numbers]
        return "<h2>Iterations</h2>\n" + "\n".join(cards)

    def iteration(self, number: int, images: Sequence[Mapping[str, Any]], steps: Sequence[Mapping[str, Any]]) -> str:
        parts = [f'<section class="iteration"><h3>Iteration {number}</h3>']
        drawn = [i for i in images if int(i.get("iteration", 0)) == number]
        # An image the critic was asked about but could not judge has no verdict either: say which it was.
        unjudged = "could not answer" if any(_critic_failed(s) for s in steps) else "not asked"
        if drawn:
            figures = []
            for image in drawn:
                judged, missing = image.get("aligned"), image.get("missing")
                verdict = "critic: " + (unjudged if judged is None else "aligned" if judged else f"missing {missing}")
                caption = f"{_e(verdict)}<br>prompt used: <i>{_e(image.get('prompt_used'))}</i>"
                figures.append(self.figure(image.get("path"), caption))
            parts.append(f'<div class="gallery">{"".join(figures)}</div>')
        rows = []
        for s in steps:
            detail: Mapping[str, Any] = s.get("detail") or {}
            node = s.get("node")
            extra = ""
            if node == "critic":
                missing = detail.get("missing_concepts")
                if missing:
                    extra = "missing concepts: " + ", ".join(f"<code>{_e(c)}</code>" for c in missing)
                if detail.get("error"):
                    extra += f"<br>error: {_e(detail['error'])}"
            elif node == "rewrite" and detail.get("retrieval_captions"):
                extra = _caption_list(detail["retrieval_captions"])
            elif node == "retrieve":
                scores = ", ".join(_score(x) for x in detail.get("scores") or []) or "none kept"
                extra = f"query <i>{_e(detail.get('query'))}</i>; scores {_e(scores)}"
            elif node == "compose" and detail.get("references"):
                thumbs = "".join(self.figure(p, _e(Path(str(p)).name)) for p in detail["references"])
                extra = f'<div class="gallery">{thumbs}</div>'
            rows.append(f"<tr><td><b>{_e(node)}</b></td><td>{_e(s.get('decision'))}<br>{extra}</td></tr>")
        if rows:
            parts.append("<table>" + "".join(rows) + "</table>")
        parts.append("</section>")
        return "\n".join(parts)

    def references(self, references: Sequence[Mapping[str, Any]]) -> str:
        if not references:
            return "<h2>References</h2>\n<p>No reference was used.</p>"
        figures = [
            self.figure(
                r.get("path"),
                f"<b>{_e(r.get('concept'))}</b> · score {_e(_score(r.get('score')))}<br>{_e(r.get('caption'))}",
            )
            for r in references
        ]
        return f'<h2>References</h2>\n<div class="gallery">{"".join(figures)}</div>'

    def timings(self, steps: Sequence[Mapping[str, Any]], total: Any) -> str:
        if not steps:
            return ""
        longest = max((float(s.get("seconds") or 0.0) for s in steps), default=0.0) or 1.0
        rows = []
        for number, s in enumerate(steps):
            seconds = float(s.get("seconds") or 0.0)
            width = max(1, round(160 * seconds / longest))
            rows.append(
                f"<tr><td class=num>{number}</td><td>{_e(s.get('node'))}</td>"
                f"<td class=num>{_e(s.get('iteration'))}</td>"
                f"<td>{_e(s.get('decision'))}</td><td class=num>{seconds:.3f}</td>"
                f'<td><span class="bar" style="width:{width}px"></span></td></tr>'
            )
        by_node: dict[str, float] = {}
        for s in steps:
            by_node[str(s.get("node"))] = by_node.get(str(s.get("node")), 0.0) + float(s.get("seconds") or 0.0)
        totals = ", ".join(f"{_e(node)} {seconds:.2f} s" for node, seconds in by_node.items())
        overall = f"{total:.2f} s in all; " if isinstance(total, int | float) else ""
        return (
            "<h2>Timings</h2>\n"
            f"<p>{overall}by node: {totals}</p>"
            "<table><tr><th>#</th><th>node</th><th>iteration</th><th>decision</th><th>seconds</th><th></th></tr>"
            + "".join(rows)
            + "</table>"
        )

    def details(self, record: Mapping[str, Any]) -> str:
        models: Mapping[str, Any] = record.get("models") or {}
        rows = [f"<tr><th>{_e(role)}</th><td><code>{_e(spec)}</code></td></tr>" for role, spec in models.items()]
        rows.append(f"<tr><th>index</th><td><code>{_e(record.get('index'))}</code></td></tr>")
        rows.append(f"<tr><th>imageloop</th><td>{_e(record.get('imageloop_version'))}</td></tr>")
        settings = json.dumps(record.get("settings") or {}, indent=1, ensure_ascii=False)
        return "<h2>Run</h2>\n<table>" + "".join(rows) + f"</table>\n<p><b>Settings</b></p><pre>{_e(settings)}</pre>"


class _RAGEPage(_Page):
    """A RAGE run: the candidates (the page a person picks from), the picks in order, and each generation."""

    def render(self, record: Mapping[str, Any]) -> str:
        steps: list[Mapping[str, Any]] = list(record.get("steps") or [])
        sections = [
            self.rage_header(record),
            self.final(record),
            self.candidates(record),
            self.picks(record.get("selected") or []),
            self.generations(record.get("images") or []),
            self.timings(steps, record.get("seconds")),
            self.details(record),
        ]
        return _document(f"imageloop RAGE: {record.get('prompt') or ''}", sections)

    def rage_header(self, record: Mapping[str, Any]) -> str:
        settings: Mapping[str, Any] = record.get("settings") or {}
        facts = [
            f"<b>{_e(str(record.get('status') or '').replace('_', ' '))}</b>",
            f"stopped: {_e(record.get('stop_reason'))}" if record.get("stop_reason") else "",
            f"{len(record.get('selected') or [])} picked of {len(record.get('candidates') or [])} candidate(s)",
            f"{len(record.get('images') or [])} generation(s)",
            f"review {_e(settings.get('review'))}",
            f"filter <code>{_e(json.dumps(record['where']))}</code>" if record.get("where") else "",
            _e(record.get("created_at")),
        ]
        ended = "Stopped before it finished" if record.get("stop_reason") == "cancelled" else "The run failed"
        error = f'<p class="error">{ended}: {_e(record["error"])}</p>' if record.get("error") else ""
        summary = " · ".join(fact for fact in facts if fact)
        return f'<h1>{_e(record.get("prompt"))}</h1>\n<p class="summary">{summary}</p>{error}'

    def final(self, record: Mapping[str, Any]) -> str:
        if not record.get("final_image"):
            return ""
        figure = self.figure(record["final_image"], "final image", "big")
        return f'<h2>Final image</h2>\n<div class="gallery">{figure}</div>'

    def candidates(self, record: Mapping[str, Any]) -> str:
        candidates: Sequence[Mapping[str, Any]] = record.get("candidates") or []
        if not candidates:
            return "<h2>Candidates</h2>\n<p>Nothing was retrieved.</p>"
        order = {str(c.get("id")): n for n, c in enumerate(record.get("selected") or [], start=1)}
        figures = []
        for c in candidates:
            picked = order.get(str(c.get("id")))
            mark = f' · <span class="ok">pick {picked}</span>' if picked else ""
            caption = (
                f"<b>{_e(c.get('position'))}.</b> {_e(Path(str(c.get('path'))).name)} · score "
                f"{_e(_score(c.get('score')))}{mark}<br><code>{_e(str(c.get('id'))[:12])}</code> {_e(c.get('caption'))}"
            )
            figures.append(self.figure(c.get("path"), caption, "picked" if picked else ""))
        how = "Pick by position, id (or a unique prefix) or file name."
        return f'<h2>Candidates</h2>\n<p>{how}</p><div class="gallery">{"".join(figures)}</div>'

    def picks(self, selected: Sequence[Mapping[str, Any]]) -> str:
        if not selected:
            return ""
        figures = [
            self.figure(c.get("path"), f"<b>pick {n}</b> · {_e(Path(str(c.get('path'))).name)}")
            for n, c in enumerate(selected, start=1)
        ]
        return f'<h2>Picked, in order</h2>\n<div class="gallery">{"".join(figures)}</div>'

    def generations(self, images: Sequence[Mapping[str, Any]]) -> str:
        if not images:
            return ""
        cards = []
        for image in images:
            references = ", ".join(_e(Path(str(p)).name) for p in image.get("references") or []) or "none"
            notes = "".join(f"<li>{_e(note)}</li>" for note in image.get("notes") or [])
            caption = (
                f"generation {_e(image.get('iteration'))} · seed {_e(image.get('seed'))} · review: "
                f"{_e(image.get('review') or 'none')}<br>prompt used: <i>{_e(image.get('prompt_used'))}</i>"
                f"<br>references, in order: {references}"
            )
            cards.append(self.figure(image.get("path"), caption, "big") + (f"<ul>{notes}</ul>" if notes else ""))
        return f'<h2>Generations</h2>\n<div class="gallery">{"".join(cards)}</div>'


def _document(title: str, sections: Sequence[str]) -> str:
    """A whole page: the title, the shared style, and the non-empty sections in order."""
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<link rel="icon" href="data:,">'
        f"<title>{_e(title)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(s for s in sections if s)
        + "\n</body></html>\n"
    )


def _caption_list(captions: Sequence[Mapping[str, Any]]) -> str:
    items = "".join(f"<li><code>{_e(c.get('concept'))}</code>: {_e(c.get('caption'))}</li>" for c in captions)
    return f"<ul>{items}</ul>"


def _strip_tags(text: str) -> str:
    """Plain text for an alt attribute from a caption that may hold markup we wrote."""
    out, inside = [], False
    for char in text:
        if char == "<":
            inside = True
        elif char == ">":
            inside = False
        elif not inside:
            out.append(char)
    return html.unescape("".join(out))


def _critic_failed(step: Mapping[str, Any]) -> bool:
    """Whether `step` is a critic that gave no usable answer (it records the error)."""
    return step.get("node") == "critic" and bool((step.get("detail") or {}).get("error"))
