"""ImageRAG evaluation: run the loop for each prompt, score its draft and its final image, summarise.

Prompts come from a text file (one per line; `CLASS<TAB>PROMPT` names the class whose real images
DINO compares against) or from an ImageNet-style folder of classes, each read as "a photo of a
<class>" (its name in a `LOC_synset_mapping.txt` beside the folders, else the folder's name as
`class_name` cleans CUB's and iNaturalist's) with the folder's own images as that class's real images
unless `--real-images` names another root.

The output folder holds `runs/<key>/` (one ImageRAG run directory per prompt, resumable), `results.jsonl`
(one line per prompt: the run's outcome and every score of the draft and the final image),
`summary.json` (per metric: draft and final mean with a 95% percentile-bootstrap interval, and their
difference), `report.html` (a plot and the prompts that gained and lost most) and `eval.json` (the
settings; a resume must match them). A prompt whose run failed is recorded with its error and tried
again by the next run of the same command.
"""

from __future__ import annotations

import filecmp
import hashlib
import html
import os
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from imageloop.errors import ImageloopError
from imageloop.eval import Run, journaled
from imageloop.files import read_jsonl, write_atomic
from imageloop.tools.images import image_files

RESULTS = "results.jsonl"
SUMMARY = "summary.json"
REPORT = "report.html"
EVAL_SETTINGS = "eval.json"
RUNS = "runs"
SYNSET_MAPPING = "LOC_synset_mapping.txt"
CLASS_PROMPT = "a photo of a {name}"
METRICS = ("clip", "siglip", "dino", "vlmscore")
BOOTSTRAP_RESAMPLES = 2000
CASES_SHOWN = 5


@dataclass(frozen=True)
class PromptCase:
    """One prompt to evaluate: its stable key, the text, its class label and that class's real images."""

    key: str
    prompt: str
    label: str | None
    real_images: Path | None


class Scorer(Protocol):
    """One metric: a score for an image drawn for `case`, or None when it does not apply (no real images)."""

    name: str

    def score(self, case: PromptCase, image: Path) -> float | None: ...


def _key(label: str | None, prompt: str) -> str:
    return hashlib.sha256(f"{label or ''}\n{prompt}".encode()).hexdigest()[:12]


def _case(prompt: str, label: str | None, real_images: Path | None) -> PromptCase:
    return PromptCase(_key(label, prompt), prompt, label, real_images)


def _class_names(folder: Path) -> dict[str, str]:
    """Folder name → class name from ImageNet's `LOC_synset_mapping.txt` ("n01440764 tench, Tinca tinca")."""
    mapping = folder / SYNSET_MAPPING
    if not mapping.is_file():
        return {}
    names: dict[str, str] = {}
    for line in mapping.read_text(encoding="utf-8").splitlines():
        wnid, _, names_text = line.strip().partition(" ")
        if wnid and names_text:
            names[wnid] = names_text.split(",")[0].strip()
    return names


_NUMBERED = re.compile(r"^\d+[._]")
_INATURALIST = re.compile(r"^\d+(?:_[^_]+){5}_(?P<genus>[^_]+)_(?P<species>[^_]+)$")
"""iNaturalist 2021: `00000_Animalia_Annelida_Clitellata_Haplotaxida_Lumbricidae_Lumbricus_terrestris`
(number, kingdom, phylum, class, order, family, genus, species)."""


def class_name(folder: str, synsets: Mapping[str, str]) -> str:
    """A class folder's name as a prompt says it: ImageNet's synset name, iNaturalist's species ("Lumbricus
    terrestris"), CUB's without its number ("001.Black_footed_Albatross": "Black footed Albatross")."""
    if folder in synsets:
        return synsets[folder]
    species = _INATURALIST.match(folder)
    if species:
        return f"{species['genus']} {species['species']}"
    return _NUMBERED.sub("", folder).replace("_", " ").strip()


def load_prompts(spec: Path, real_images: Path | None = None) -> list[PromptCase]:
    """The prompts of a text file or a folder of classes (see the module docstring), in order, without repeats."""
    if spec.is_dir():
        names = _class_names(spec)
        folders = sorted(p for p in spec.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not folders:
            raise ImageloopError(f"`prompts` {spec}: no class folders in it")
        cases = [
            _case(
                CLASS_PROMPT.format(name=class_name(f.name, names)),
                f.name,
                (real_images / f.name) if real_images is not None else f,
            )
            for f in folders
        ]
    elif spec.is_file():
        cases = []
        for number, raw in enumerate(spec.read_text(encoding="utf-8").splitlines(), start=1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            label, tab, prompt = raw.partition("\t")
            if tab and not (label.strip() and prompt.strip()):
                raise ImageloopError(f"{spec}, line {number}: expected PROMPT or CLASS<TAB>PROMPT")
            label_or_none = label.strip() if tab else None
            images = real_images / label_or_none if real_images is not None and label_or_none else None
            cases.append(_case(prompt.strip() if tab else line, label_or_none, images))
    else:
        raise ImageloopError(f"`prompts` {spec}: no such file or folder")
    unique = list({case.key: case for case in cases}.values())
    if not unique:
        raise ImageloopError(f"`prompts` {spec}: no prompts in it")
    return unique


def real_image_files(case: PromptCase) -> list[Path]:
    """The real images of the case's class (none when it names no class or the folder is missing)."""
    if case.real_images is None or not case.real_images.is_dir():
        return []
    return sorted(image_files(case.real_images))


def mean_ci(values: Sequence[float], resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict[str, Any]:
    """The mean and its 95% percentile-bootstrap interval (seeded: the same numbers on every run)."""
    if not values:
        return {"mean": None, "ci95": [None, None], "n": 0}
    mean = sum(values) / len(values)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=len(values))) / len(values) for _ in range(resamples))
    low, high = means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]
    return {"mean": round(mean, 6), "ci95": [round(low, 6), round(high, 6)], "n": len(values)}


def summarise(records: Iterable[Mapping[str, Any]], metrics: Sequence[str]) -> dict[str, Any]:
    """Per metric, over the prompts that ran: draft and final mean with 95% CI, and the paired difference."""
    ok = [r for r in records if not r.get("error")]
    table: dict[str, Any] = {}
    for name in metrics:
        pairs = [r["scores"].get(name, {}) for r in ok]
        drafts = [p["draft"] for p in pairs if p.get("draft") is not None]
        finals = [p["final"] for p in pairs if p.get("final") is not None]
        deltas = [p["final"] - p["draft"] for p in pairs if p.get("draft") is not None and p.get("final") is not None]
        table[name] = {"draft": mean_ci(drafts), "final": mean_ci(finals), "delta": mean_ci(deltas)}
    return {
        "n": len(ok),
        "metrics": table,
        "stop_reasons": {reason: sum(1 for r in ok if r["stop_reason"] == reason) for reason in _reasons(ok)},
    }


def _reasons(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(r["stop_reason"]) for r in records})


def read_results(out_dir: Path) -> dict[str, dict[str, Any]]:
    """The recorded prompts by key (the last line per key wins; a line cut by a crash is skipped)."""
    return {record["key"]: record for record in read_jsonl(out_dir / RESULTS)}


def score_run(case: PromptCase, run_dir: Path, record: Mapping[str, Any], scorers: Sequence[Scorer]) -> dict[str, Any]:
    """The prompt's line in results.jsonl: the run's outcome and each metric for its draft and final image."""
    draft, final = record.get("draft_image"), record.get("final_image")
    # A run that kept its draft returns the draft: score the picture once (a judge call is not free).
    same = bool(draft and final) and filecmp.cmp(str(draft), str(final), shallow=False)
    scores: dict[str, dict[str, float | None]] = {}
    for scorer in scorers:
        draft_score = scorer.score(case, Path(draft)) if draft else None
        final_score = draft_score if same else (scorer.score(case, Path(final)) if final else None)
        scores[scorer.name] = {"draft": draft_score, "final": final_score}
    return {
        "key": case.key,
        "prompt": case.prompt,
        "label": case.label,
        "run_dir": str(run_dir),
        "stop_reason": record.get("stop_reason"),
        "aligned": record.get("aligned"),
        "iterations": record.get("iterations"),
        "draft_image": draft,
        "final_image": final,
        "scores": scores,
        "seconds": record.get("seconds"),
        "error": record.get("error"),
    }


def prompt_evaluation(
    out_dir: Path, run_case: Callable[[PromptCase, Path], Mapping[str, Any]], scorers: Sequence[Scorer]
) -> Callable[[PromptCase], dict[str, Any]]:
    """One prompt's work, the same in this process and on a cluster's worker: its run, scored; the result is
    its line of results.jsonl.

    `run_case(case, run_dir)` runs ImageRAG in `run_dir` (resuming it when it holds a run) and returns its
    record; a failure is recorded as the case's error and the other cases go on.
    """

    def evaluate(case: PromptCase) -> dict[str, Any]:
        run_dir = out_dir / RUNS / case.key
        try:
            record = run_case(case, run_dir)
        except ImageloopError as e:
            record = {"stop_reason": "error", "error": str(e)}
        if record.get("error"):
            return {"key": case.key, "prompt": case.prompt, "label": case.label, "run_dir": str(run_dir),
                    "scores": {}, "stop_reason": "error", "error": record["error"]}  # fmt: skip
        return score_run(case, run_dir, record, scorers)

    return evaluate


def evaluate_prompts(
    cases: Sequence[PromptCase],
    out_dir: Path,
    run: Run[PromptCase, dict[str, Any]],
    *,
    on_prompt: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run and score every case not yet recorded without error (`run` does each one's `prompt_evaluation`, here
    or on a cluster), appending (fsynced) to results.jsonl."""
    done = read_results(out_dir)
    pending = [c for c in cases if c.key not in done or done[c.key].get("error")]
    for line in journaled(pending, run, out_dir / RESULTS, total=len(cases), on_progress=on_prompt):
        done[line["key"]] = line
    return done


# --- report.html --------------------------------------------------------------------------------

_STYLE = """
body{font:15px/1.45 system-ui,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#1d1d1f}
table{border-collapse:collapse} th,td{padding:.3em .7em;border-bottom:1px solid #eee;text-align:right}
th:first-child,td:first-child{text-align:left} .cases{display:flex;flex-wrap:wrap;gap:1em}
figure{margin:0;width:330px} figure img{width:160px;border:1px solid #ccc} figcaption{font-size:.85em}
"""
_COLOURS = {"draft": "#b0b7c3", "final": "#3b6fd6"}


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _plot(summary: Mapping[str, Any]) -> str:
    """Draft and final mean per metric as bars with their 95% intervals, each metric on its own scale."""
    metrics = [(name, row) for name, row in summary["metrics"].items() if row["final"]["mean"] is not None]
    width, bar, gap, height = 120, 36, 24, 200
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{len(metrics) * width + 40}" height="{height + 60}">']
    for i, (name, row) in enumerate(metrics):
        top = max(v for which in ("draft", "final") for v in [row[which]["ci95"][1] or 0, row[which]["mean"] or 0])
        scale = height / top if top > 0 else 0.0
        for j, which in enumerate(("draft", "final")):
            mean, (low, high) = row[which]["mean"], row[which]["ci95"]
            if mean is None:
                continue
            x = 20 + i * width + j * (bar + 4)
            y = height - max(mean, 0) * scale + 10
            parts.append(
                f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{max(mean, 0) * scale:.1f}" '
                f'fill="{_COLOURS[which]}"><title>{which} {mean:.4f} [{low:.4f}, {high:.4f}]</title></rect>'
            )
            cx, y_low, y_high = x + bar / 2, height - max(low, 0) * scale + 10, height - max(high, 0) * scale + 10
            parts.append(f'<line x1="{cx}" x2="{cx}" y1="{y_low:.1f}" y2="{y_high:.1f}" stroke="#222"/>')
        parts.append(f'<text x="{20 + i * width}" y="{height + 30}" font-size="13">{_e(name)}</text>')
    parts.append(
        f'<text x="20" y="{height + 52}" font-size="12" fill="{_COLOURS["draft"]}">■ draft</text>'
        f'<text x="{20 + gap * 3}" y="{height + 52}" font-size="12" fill="{_COLOURS["final"]}">■ final</text></svg>'
    )
    return "".join(parts)


def _image(path: str | None, out_dir: Path) -> str:
    if not path:
        return "<em>none</em>"
    try:
        src = Path(os.path.relpath(path, out_dir)).as_posix()
    except ValueError:  # another drive (Windows): an absolute file URL instead
        src = Path(path).as_uri()
    return f'<img src="{_e(src)}" alt="">'


def _cases(records: Sequence[Mapping[str, Any]], metric: str, out_dir: Path) -> str:
    """The prompts whose final image gained most, and lost most, over its draft on `metric`."""

    def delta(record: Mapping[str, Any]) -> float | None:
        pair = record["scores"].get(metric, {})
        return None if pair.get("draft") is None or pair.get("final") is None else pair["final"] - pair["draft"]

    scored = sorted((r for r in records if delta(r) is not None), key=lambda r: delta(r) or 0.0)
    if not scored:
        return "<p>No prompt has both a draft and a final score.</p>"

    def figures(chosen: Iterable[Mapping[str, Any]]) -> str:
        return "".join(
            f"<figure>{_image(r.get('draft_image'), out_dir)} {_image(r.get('final_image'), out_dir)}"
            f"<figcaption>{_e(r['prompt'])}<br>{_e(metric)} {r['scores'][metric]['draft']:.4f} → "
            f"{r['scores'][metric]['final']:.4f} ({_e(r['stop_reason'])})</figcaption></figure>"
            for r in chosen
        )

    best = figures(reversed(scored[-CASES_SHOWN:]))
    worst = figures(scored[:CASES_SHOWN])
    return f'<h2>Best (by {_e(metric)} gain)</h2><div class="cases">{best}</div>' + (
        f'<h2>Worst</h2><div class="cases">{worst}</div>'
    )


def write_eval_report(out_dir: Path, summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Path:
    """`report.html`: the summary table, the plot, and the best and worst prompts (draft and final side by side)."""
    rows = "".join(
        f"<tr><td>{_e(name)}</td>"
        + "".join(
            f"<td>{row[which]['mean']:.4f} [{row[which]['ci95'][0]:.4f}, {row[which]['ci95'][1]:.4f}] "
            f"(n={row[which]['n']})</td>"
            if row[which]["mean"] is not None
            else "<td>-</td>"
            for which in ("draft", "final", "delta")
        )
        + "</tr>"
        for name, row in summary["metrics"].items()
    )
    shown = next((name for name, row in summary["metrics"].items() if row["delta"]["mean"] is not None), None)
    ok = [r for r in records if not r.get("error")]
    failed = len(records) - len(ok)
    page = (
        f'<!doctype html><meta charset="utf-8"><title>ImageRAG evaluation</title><style>{_STYLE}</style>'
        f"<h1>ImageRAG evaluation: {summary['n']} prompts</h1>"
        + (f"<p>{failed} prompt(s) failed; run the same command again to retry them.</p>" if failed else "")
        + "<table><tr><th>metric</th><th>draft (95% CI)</th><th>final (95% CI)</th><th>final − draft</th></tr>"
        + rows
        + "</table>"
        + _plot(summary)
        + (_cases(ok, shown, out_dir) if shown else "")
    )
    target = out_dir / REPORT
    write_atomic(target, page)
    return target
