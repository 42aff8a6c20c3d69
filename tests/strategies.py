"""Hypothesis strategies for outside input: JSON of any shape, and JSON that nearly fits a format."""

from __future__ import annotations

from functools import cache

from hypothesis import strategies as st

SCALARS = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=12)


@cache  # building a recursive strategy is slow; mangled() asks for this one at every mutation
def json_values(keys: tuple[str, ...] = (), max_leaves: int = 16) -> st.SearchStrategy[object]:
    """Any JSON value; objects draw their keys from `keys` as often as not, so parsers get past the top level."""
    names = st.sampled_from(keys) | st.text(max_size=6) if keys else st.text(max_size=6)
    return st.recursive(
        SCALARS,
        lambda children: st.lists(children, max_size=4) | st.dictionaries(names, children, max_size=6),
        max_leaves=max_leaves,
    )


@st.composite
def mangled(draw: st.DrawFn, value: object, odds: int = 40) -> object:
    """`value` with parts dropped or swapped for random JSON, each with chance 1/`odds`, at any depth.

    Nearly the format, and now and then exactly it: parsers are driven past their first checks. The
    choices come from one Hypothesis-controlled Random, as a draw per node made examples slow.
    """
    rng = draw(st.randoms(use_true_random=False))

    def mangle(part: object) -> object:
        if rng.randrange(odds) == 0:
            return draw(json_values())
        if isinstance(part, dict):
            return {key: mangle(item) for key, item in part.items() if rng.randrange(odds)}
        if isinstance(part, list):
            return [mangle(item) for item in part if rng.randrange(odds)]
        return part

    return mangle(value)
