"""Asking a VLM, the same contract for every backend: structured answers, and the papers' plain-text ones.

Structured: ask with the JSON schema (backends that can constrain decoding do so), then parse and
validate with pydantic; if that fails, show the model its answer and the validation error once and
ask again. A second failure raises MalformedOutputError, which callers turn into a recorded fallback.
Plain text (the released papers' prompts): the answer as written; an empty one is MalformedOutputError.

The schema sent asks for no extra keys (strict mode requires it), but an answer that adds some is
still used: they are ignored, at every nesting level. Models without constrained decoding often add
a "reasoning" or "confidence" key, and refusing them would fail the repair retry too.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ValidationError

from imageloop.errors import MalformedOutputError
from imageloop.prompts import REPAIR_PROMPT
from imageloop.protocols import GREEDY, Decoding, Message, ModelT, VisionLanguageModel

_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.DOTALL)


def json_schema_for(model: type[ModelT]) -> dict[str, Any]:
    """The response_format-ready schema: named, strict, no extra keys (a fresh copy: backends may adapt it)."""
    return copy.deepcopy(_schema(model))


@functools.cache
def _schema(model: type[BaseModel]) -> dict[str, Any]:
    # pydantic builds a schema anew on every call (about a millisecond); a critic asks for one per answer.
    return {"name": model.__name__, "schema": model.model_json_schema(), "strict": True}


def parse_json_answer(text: str, model: type[ModelT]) -> ModelT:
    """Validate `text` as `model`, tolerating code fences, prose around one JSON object, and extra keys."""
    candidates = [text.strip(), *(m.strip() for m in _FENCED.findall(text))]
    start, end = text.find("{"), text.rfind("}")
    if 0 <= start < end:
        candidates.append(text[start : end + 1])
    error: Exception | None = None
    for candidate in candidates:
        try:
            return model.model_validate(json.loads(candidate), extra="ignore")
        # ValueError covers JSONDecodeError and integers beyond Python's digit limit; RecursionError
        # is the decoder's answer to nesting deeper than the stack allows.
        except (ValueError, RecursionError, ValidationError) as e:
            error = e
    raise ValueError(f"not a valid {model.__name__}: {error}")


def ask_structured(
    vlm: VisionLanguageModel, messages: Sequence[Message], model: type[ModelT], decoding: Decoding = GREEDY
) -> ModelT:
    """Ask `vlm` for an answer shaped like `model`, with one repair retry, both decoded by `decoding`."""
    schema = json_schema_for(model)
    answer = vlm.chat(messages, json_schema=schema, decoding=decoding)
    try:
        return parse_json_answer(answer, model)
    except ValueError as first_error:
        repair = Message(
            "user",
            REPAIR_PROMPT.format(error=str(first_error)[:500], schema=json.dumps(model.model_json_schema())),
        )
        retry = vlm.chat([*messages, Message("assistant", answer), repair], json_schema=schema, decoding=decoding)
        try:
            return parse_json_answer(retry, model)
        except ValueError as second_error:
            raise MalformedOutputError(
                f"{vlm.model_id} gave no valid {model.__name__} after one repair retry: {second_error}"
            ) from None


def ask_text(vlm: VisionLanguageModel, messages: Sequence[Message], decoding: Decoding = GREEDY) -> str:
    """Ask `vlm` for a free-text answer (no schema), stripped; an empty answer is an error, not an answer."""
    answer = vlm.chat(messages, decoding=decoding).strip()
    if not answer:
        raise MalformedOutputError(f"{vlm.model_id} gave an empty answer")
    return answer
