"""Property tests for the parsers of outside input not covered elsewhere: a person's or client's `found:` answer and
RAGE picks, `--http` addresses, image sizes (`--size`, `IMAGELOOP_SIZE`), and `--where` filters. Whatever the text,
each either gives a well-formed value or refuses with a one-line ImageloopError; nothing else escapes."""

from __future__ import annotations

from typing import Any

from hypothesis import example, given
from hypothesis import strategies as st

from imageloop import limits
from imageloop.app import parse_where
from imageloop.errors import ConfigError, ImageloopError
from imageloop.graphs.genir import FOUND_PREFIX, FoundError, resolve_found
from imageloop.graphs.rage import Candidate, SelectionError, resolve_picks
from imageloop.mcp.transport import parse_http
from tests.strategies import loads_or_refuses

IDS = st.text(alphabet="0123456789abcdef", min_size=12, max_size=64)
SHOWN = st.lists(IDS, max_size=12, unique=True).map(lambda ids: [{"id": i, "path": f"{i}.png"} for i in ids])
NUMBERS = st.integers(min_value=-5, max_value=100_000).map(str) | st.text(alphabet="0123456789", max_size=40)


def found_answers() -> st.SearchStrategy[str]:
    """Answers that start like `found:` (in any case, padded), followed by anything a person or a model might type."""
    tail = st.text(max_size=40) | NUMBERS | IDS | st.sampled_from(["", " ", "²", "١", "0\n1", "٣", "-1", "+1"])
    prefix = st.sampled_from([FOUND_PREFIX, "FOUND:", "Found:", " found:", "found:  "])
    return st.builds(lambda p, t: p + t, prefix, tail)


@given(answer=found_answers() | st.text(max_size=60), shown=SHOWN)
@example(answer="found: ²", shown=[{"id": "a" * 12, "path": "a.png"}])
@example(answer="found: 0\nand more", shown=[])
def test_a_found_answer_names_a_shown_result_or_is_refused_in_one_line(
    answer: str, shown: list[dict[str, Any]]
) -> None:
    ids = [result["id"] for result in shown]
    try:
        picked = resolve_found(answer, shown)
    except FoundError as e:
        assert answer.strip().lower().startswith(FOUND_PREFIX)
        assert "\n" not in str(e)
        return
    if answer.strip().lower().startswith(FOUND_PREFIX):
        assert picked in ids  # never an image that was not shown
    else:
        assert picked is None  # ordinary feedback


@given(shown=SHOWN.filter(bool), data=st.data())
def test_found_with_a_listed_position_picks_that_result(shown: list[dict[str, Any]], data: st.DataObject) -> None:
    position = data.draw(st.integers(min_value=1, max_value=len(shown)))  # positions are listed from 1
    assert resolve_found(f"found: {position}", shown) == shown[position - 1]["id"]


@given(text=st.text(max_size=30) | st.builds(lambda w, h, s: f"{w}{s}{h}", NUMBERS, NUMBERS, st.sampled_from("xX×*")))
@example(text="²x²")
@example(text="9" * 5000 + "x16")
def test_any_size_text_parses_within_the_bounds_or_is_refused_in_one_line(text: str) -> None:
    def parse() -> None:
        width, height = limits.parse_size(text)
        assert limits.MIN_SIDE <= width <= limits.MAX_SIDE and limits.MIN_SIDE <= height <= limits.MAX_SIDE

    loads_or_refuses(parse)


@given(
    width=st.integers(min_value=limits.MIN_SIDE, max_value=limits.MAX_SIDE),
    height=st.integers(min_value=limits.MIN_SIDE, max_value=limits.MAX_SIDE),
    separator=st.sampled_from(["x", "X", " x ", "x "]),
)
def test_a_size_within_the_bounds_reads_back_as_written(width: int, height: int, separator: str) -> None:
    assert limits.parse_size(f"{width}{separator}{height}") == (width, height)


@given(side=st.integers(min_value=limits.MAX_SIDE + 1, max_value=10**12) | st.integers(max_value=limits.MIN_SIDE - 1))
def test_a_side_past_the_bound_is_refused_naming_the_range(side: int) -> None:
    try:
        limits.parse_size(f"{side}x512")
    except ConfigError as e:
        assert "16..2048" in str(e) or "expected WIDTHxHEIGHT" in str(e)
    else:
        raise AssertionError(f"{side}x512 was accepted")


@given(items=st.lists(st.text(max_size=20), max_size=6))
def test_any_where_items_give_filters_or_are_refused_in_one_line(items: list[str]) -> None:
    loads_or_refuses(lambda: parse_where(items))


KEYS = st.text(min_size=1, max_size=8).filter(lambda key: "=" not in key and key.strip() != "")


@given(pairs=st.lists(st.tuples(KEYS, st.text(max_size=10)), min_size=1, max_size=8))
def test_where_keeps_every_value_of_a_repeated_key_in_order(pairs: list[tuple[str, str]]) -> None:
    where = parse_where([f"{key}={value}" for key, value in pairs])
    assert where is not None
    expected: dict[str, list[str]] = {}
    for key, value in pairs:
        expected.setdefault(key.strip(), []).append(value)
    assert {key: value if isinstance(value, list) else [value] for key, value in where.items()} == expected


def test_where_without_an_equals_sign_names_the_item() -> None:
    try:
        parse_where(["folder"])
    except ImageloopError as e:
        assert "`where` 'folder': expected KEY=VALUE" in str(e)
    else:
        raise AssertionError("accepted")


CANDIDATES = st.lists(IDS, max_size=10, unique=True).map(
    lambda ids: [
        {"position": n, "id": i, "path": f"/photos/{i[:6]}-{n}.png", "caption": "", "score": 0.0}
        for n, i in enumerate(ids, start=1)
    ]
)
PICKS = st.text(max_size=30) | NUMBERS | IDS | st.sampled_from(["²", "١", "1,2", "1 1", "0", "-1", " , "])


@given(items=PICKS | st.lists(PICKS | st.integers(-3, 20), max_size=6), candidates=CANDIDATES)
@example(items="²", candidates=[{"position": 1, "id": "a" * 12, "path": "/p/a.png", "caption": "", "score": 0.0}])
def test_rage_picks_name_shown_candidates_or_are_refused_in_one_line(
    items: str | list[str | int], candidates: list[Candidate]
) -> None:
    try:
        picked = resolve_picks(items, candidates)
    except SelectionError as e:
        assert "\n" not in str(e)
        return
    ids = [c["id"] for c in picked]
    assert len(ids) == len(set(ids)) <= limits.MAX_REFERENCES  # each named once, never past the bound
    assert all(c in candidates for c in picked)  # never an image that was not shown


@given(candidates=CANDIDATES.filter(bool), data=st.data())
def test_rage_picks_by_position_keep_the_order_named(candidates: list[Candidate], data: st.DataObject) -> None:
    positions = data.draw(st.lists(st.integers(1, len(candidates)), max_size=limits.MAX_REFERENCES, unique=True))
    picked = resolve_picks(" ".join(map(str, positions)), candidates)
    assert [c["position"] for c in picked] == positions


@given(
    text=st.text(max_size=30) | st.builds(lambda h, p: f"{h}:{p}", st.sampled_from(["", "127.0.0.1", "[::1]"]), NUMBERS)
)
@example(text="127.0.0.1:²")
def test_an_http_address_parses_to_a_port_or_is_refused_in_one_line(text: str) -> None:
    try:
        _, port = parse_http(text)
    except ConfigError as e:
        assert "\n" not in str(e)
        return
    assert 0 <= port <= 65535
