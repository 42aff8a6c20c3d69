"""The one rule for naming a result a person was shown, in every loop (RAGE's picks, GenIR's "found: N").

A result is named by its position as listed (from 1), its file name (with or without its extension), its
id or a unique prefix of its id; a name matching none of the shown results, or several, is refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

Shown = TypeVar("Shown", bound=Mapping[str, Any])


def find_shown(
    item: str, shown: Sequence[Shown], one: str = "one of the results", many: str = "results"
) -> Shown | str:
    """The result `item` names among `shown`, or why it names none ("is not a position shown (1..3)", "is not
    {one} shown", "matches several {many}")."""
    if item.isascii() and item.isdigit():  # str.isdigit also holds for '²', which int() refuses
        if len(item) <= 6 and 1 <= int(item) <= len(shown):
            return shown[int(item) - 1]
        return f"is not a position shown (1..{len(shown)})"
    matches = [r for r in shown if item in (Path(str(r["path"])).name, Path(str(r["path"])).stem)]
    if not matches:
        matches = [r for r in shown if item and str(r["id"]).startswith(item.lower())]
    if len({str(r["id"]) for r in matches}) == 1:
        return matches[0]
    return f"matches several {many}" if matches else f"is not {one} shown"


def listed(shown: Sequence[Mapping[str, Any]]) -> str:
    """The valid names of `shown`, as an error lists them: `1 jay.png, 2 snow.png`."""
    return ", ".join(f"{number} {Path(str(r['path'])).name}" for number, r in enumerate(shown, start=1))
