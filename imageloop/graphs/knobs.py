"""Per-run knobs: what a run's context gives, over the graph's defaults, checked once for every loop.

Every graph takes its knobs in a run-context dataclass whose fields default to None ("the graph's
defaults"); `prepare` calls `resolve_knobs` and copies the result into state, so a value past a bound
is refused with the same words whichever loop, face or client sent it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from imageloop import limits
from imageloop.errors import ConfigError

# Context fields named for the user whose state (or bound) name differs.
STATE_NAMES = {"steps": "steps_per_image"}
BOUND_NAMES = {"max_rounds": "rounds", "steps_per_image": "steps"}


def resolve_knobs(
    defaults: Mapping[str, Any], context: object | None, choices: Mapping[str, tuple[object, ...]]
) -> dict[str, Any]:
    """`defaults` overridden by the context's non-None fields that name a knob.

    Sizes are checked with `limits.check_size`, a field in `choices` must be one of them, and any
    other knob with a bound in `imageloop.limits` must be within it. Context fields that are not knobs
    (a deployment's `index`) are left to whoever reads them.
    """
    knobs = dict(defaults)
    given = {f.name: getattr(context, f.name) for f in fields(context)} if is_dataclass(context) else {}
    for field_name, value in given.items():
        name = STATE_NAMES.get(field_name, field_name)
        if value is None or name not in knobs:
            continue
        if name == "size":
            value = limits.check_size((int(value[0]), int(value[1])))
        elif name in choices:
            if value not in choices[name]:
                raise ConfigError(f"{field_name} {value!r}: expected one of {', '.join(map(str, choices[name]))}")
        elif BOUND_NAMES.get(name, name) in limits.BOUNDS:
            limits.check(BOUND_NAMES.get(name, name), value)
        knobs[name] = value
    return knobs
