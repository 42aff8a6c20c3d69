"""GenIR summaries say which values a stopped dialogue carried forward, in `summary.json` and on the command line."""

from __future__ import annotations

from typing import Any

import pytest

from imageloop.cli import _show_hits
from imageloop.eval.genir import GenIREvalSettings, summarise
from imageloop.knobs import GenIREvalKnobs


def dialogue(target: str, ranks: list[int | None]) -> dict[str, Any]:
    rounds = [{"round": t, "target_rank": rank, "seconds": 0.1} for t, rank in enumerate(ranks)]
    return {"target_id": target, "rounds": rounds}


@pytest.fixture
def summary() -> dict[str, Any]:
    """Three dialogues over rounds 0..3: one found at round 0, one at round 2, one never."""
    settings = GenIREvalSettings(
        GenIREvalKnobs(rounds=3, k=1), vlm="scripted:vlm", generator="-", embedder="fake:hash", index="idx"
    )
    records = [dialogue("a", [0]), dialogue("b", [5, 3, 0]), dialogue("c", [7, 6, 9, 8])]
    return summarise(records, settings)


def test_each_round_marks_how_many_values_were_carried_forward_from_a_stopped_dialogue(summary: dict[str, Any]) -> None:
    assert [(r["played"], r["carried"]) for r in summary["rounds"]] == [(3, 0), (2, 1), (2, 1), (1, 2)]
    assert summary["rounds"][3]["per_round_hits_at"]["1"] == round(2 / 3, 4)  # both carried hits count


def test_the_command_line_report_says_which_rounds_hold_carried_values(
    summary: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    _show_hits(summary)
    lines = capsys.readouterr().err.splitlines()
    assert "carried" not in lines[0]
    assert lines[3].endswith("; 2 of 3 carried forward")
