"""Hypothesis strategies for outside input: JSON of any shape, and JSON that nearly fits a format."""

from __future__ import annotations

from collections.abc import Sequence

from hypothesis import strategies as st

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)


def json_values(keys: Sequence[str] = (), max_leaves: int = 16) -> st.SearchStrategy[object]:
    """Any JSON value; objects draw their keys from `keys` as often as not, so parsers get past the top level."""
    names = st.sampled_from(list(keys)) | st.text(max_size=6) if keys else st.text(max_size=6)
    return st.recursive(
        SCALARS,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(names, children, max_size=6),
        max_leaves=max_leaves,
    )


@st.composite
def mangled(draw: st.DrawFn, value: object, odds: int = 40) -> object:
    """`value` with parts dropped or swapped for random JSON, each with chance 1/`odds`, at any depth.

    Nearly the format, and now and then exactly it: parsers are driven past their first checks.
    """
    if draw(st.integers(1, odds)) == 1:
        return draw(json_values())
    if isinstance(value, dict):
        kept = [(key, item) for key, item in value.items() if draw(st.integers(1, odds)) != 1]
        return {key: draw(mangled(item, odds)) for key, item in kept}
    if isinstance(value, list):
        return [draw(mangled(item, odds)) for item in value if draw(st.integers(1, odds)) != 1]
    return value
