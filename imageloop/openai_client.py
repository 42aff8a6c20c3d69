"""One place that builds OpenAI clients and turns their exceptions into one-line BackendErrors.

Every OpenAI-compatible backend (chat, images, embeddings) goes through here, so local servers (vLLM,
Ollama, LM Studio) and api.openai.com are configured, bounded and reported the same way. The client
is thread-safe and calls run concurrently (no lock around them): `request_slots` only caps how many
are in flight to one endpoint, enough for a vLLM server to batch them, not so many that it thrashes.
`openai` is imported inside the functions: `import imageloop` must stay fast.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from imageloop import limits
from imageloop.config import Endpoint
from imageloop.errors import BackendError, ConfigError, ImageloopError

if TYPE_CHECKING:
    import openai

# Endpoint is frozen, so one shared default is safe; None fields mean "use OPENAI_BASE_URL / OPENAI_API_KEY".
DEFAULT_ENDPOINT = Endpoint()

# Local OpenAI-compatible servers ignore the key, but the client refuses to start without one.
PLACEHOLDER_API_KEY = "not-needed"

# Server messages can be long (whole validation dumps); a CLI line should stay readable.
_MAX_MESSAGE_CHARS = 300

logger = logging.getLogger(__name__)


def make_client(endpoint: Endpoint) -> openai.OpenAI:
    """An OpenAI client for `endpoint`, falling back to OPENAI_BASE_URL / OPENAI_API_KEY.

    Each try waits `endpoint.timeout` seconds at most, and a timed-out, 429 or 5xx call is tried
    `endpoint.max_retries` more times (429s after the server's Retry-After): a hung endpoint fails in
    (1 + max_retries) x timeout, not the client's default of 3 x 10 minutes.
    """
    import openai

    base_url = endpoint.base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = endpoint.api_key or os.environ.get("OPENAI_API_KEY") or None
    if api_key is None:
        if base_url is None:
            raise ConfigError(
                "OPENAI_API_KEY is not set: export it, or pass a base URL of a local "
                "OpenAI-compatible server (which needs no key)"
            )
        api_key = PLACEHOLDER_API_KEY
    timeout = endpoint.timeout if endpoint.timeout is not None else limits.REQUEST_TIMEOUT_S
    retries = endpoint.max_retries if endpoint.max_retries is not None else int(limits.default("max_retries") or 0)
    return openai.OpenAI(api_key=api_key, base_url=base_url, max_retries=retries, timeout=timeout)


_slots: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_slots_lock = threading.Lock()


def request_slots(base_url: str, limit: int) -> threading.BoundedSemaphore:
    """The process-wide bound on requests in flight to `base_url`: hold it around each request; the others wait."""
    # Every backend on one server shares it (VLM, captioner, images, embeddings), whatever its client object.
    key = (base_url.rstrip("/"), limit)
    with _slots_lock:
        return _slots.setdefault(key, threading.BoundedSemaphore(limit))


_refused_extras: dict[str, set[str]] = {}
_refused_lock = threading.Lock()


def accepted_extras(base_url: str, extras: Mapping[str, Any]) -> dict[str, Any]:
    """The request fields beyond OpenAI's API (vLLM's `repetition_penalty`, ...) that `base_url` has not refused."""
    with _refused_lock:
        refused = _refused_extras.get(base_url.rstrip("/"), set())
        return {name: value for name, value in extras.items() if name not in refused}


def refuse_extra(base_url: str, error: openai.APIStatusError, sent: Mapping[str, Any]) -> bool:
    """Whether `error` is a 400 naming one of the extra fields `sent` (api.openai.com: "Unrecognized request
    argument supplied: NAME"); if so the endpoint is sent it no more in this process, which is said once."""
    text = f"{server_message(error)} {error.message}"
    named = [name for name in sent if error.status_code == 400 and re.search(rf"\b{re.escape(name)}\b", text)]
    if not named:
        return False
    endpoint = base_url.rstrip("/")
    with _refused_lock:
        refused = _refused_extras.setdefault(endpoint, set())
        new = [name for name in named if name not in refused]
        refused.update(named)
    for name in new:
        logger.warning("%s does not take `%s` (HTTP 400): sending requests without it from now on", endpoint, name)
    return True


def _one_line(text: str) -> str:
    """Collapse whitespace and cut long text so an error message stays on one readable line."""
    line = re.sub(r"\s+", " ", text).strip()
    return line if len(line) <= _MAX_MESSAGE_CHARS else line[: _MAX_MESSAGE_CHARS - 3] + "..."


def server_message(error: openai.APIStatusError) -> str:
    """The server's own explanation of a rejected request, as sent in its error body."""
    body = error.body
    if isinstance(body, dict):
        message = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(message, str) and message:
            return message
    if isinstance(body, str) and body:
        return body
    return error.message


@contextmanager
def translated_errors(what: str, client: openai.OpenAI) -> Iterator[None]:
    """Re-raise the client's connection, timeout and HTTP errors, and answers that are not API responses,
    as one-line BackendErrors naming the endpoint.

    Read the answer inside the block: an endpoint that sends an HTML page with status 200 (a login wall,
    a proxy) makes the client return a plain string, whose missing fields surface as AttributeErrors.
    """
    import openai

    # The client normalises base URLs with a trailing slash; users typed them without.
    base_url = str(client.base_url).rstrip("/")
    try:
        yield
    except openai.APITimeoutError as e:
        tries = client.max_retries + 1
        raise BackendError(
            f"{base_url} did not answer {what} within {_seconds(client.timeout)} s ({tries} tries): "
            "check the server, or allow more with `request_timeout` (IMAGELOOP_REQUEST_TIMEOUT)"
        ) from e
    except openai.APIConnectionError as e:
        # The client's own message is a bare "Connection error."; the cause says refused, DNS, TLS...
        cause = f" ({type(e.__cause__).__name__}: {e.__cause__})" if e.__cause__ else ""
        raise BackendError(_one_line(f"cannot reach {base_url} for {what} (after retries): {e.message}{cause}")) from e
    except openai.APIStatusError as e:
        raise BackendError(_one_line(f"{base_url} rejected {what}: HTTP {e.status_code}: {server_message(e)}")) from e
    except ImageloopError:
        raise  # our own verdict on what came back (an undecodable image, say), already one line
    except (openai.APIResponseValidationError, AttributeError, TypeError, KeyError, IndexError, ValueError) as e:
        raise BackendError(
            _one_line(
                f"{base_url} answered {what} with something that is not an OpenAI API response "
                f"({type(e).__name__}: {e}); is it the API's /v1 address, not a web page or a proxy?"
            )
        ) from e


def _seconds(timeout: object) -> str:
    """The client's timeout (a number or an httpx Timeout) as seconds for a message."""
    value = getattr(timeout, "read", timeout)
    return f"{value:g}" if isinstance(value, (int, float)) else str(value)
