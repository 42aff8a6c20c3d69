"""Property-test helpers for outside input: JSON of any shape, JSON that nearly fits a format, and the check
that a parser of it either succeeds or refuses with a one-line ImageloopError."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from hypothesis import event
from hypothesis import strategies as st

from imageloop.errors import ImageloopError

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


def loads_or_refuses(load: Callable[[], object]) -> None:
    """`load()` returns, or raises a one-line ImageloopError; any other exception fails the test."""
    try:
        load()
        event("loaded")
    except ImageloopError as e:
        event("refused")
        assert "\n" not in str(e)
