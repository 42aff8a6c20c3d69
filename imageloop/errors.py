"""Errors a user can act on.

Every `ImageloopError` carries a one-line message that the CLI prints as is (no traceback); anything
else that escapes is a bug and keeps its traceback.

`ImageloopError` is a `ValueError`: LangGraph Server shows a run's error message to its clients only
for ValueError-like types (others read "An internal error occurred"), and LangGraph's default retry
policy does not retry ValueErrors, which is right for a user error.
"""


class ImageloopError(ValueError):
    """A problem with the user's input, configuration or environment, explained in one line."""


class ConfigError(ImageloopError):
    """An unknown provider, model string, profile or option value."""


class IndexNotFoundError(ImageloopError):
    """The path given as an index holds no imageloop index."""


class EmbedderMismatchError(ImageloopError):
    """The index was built with another embedder than the one configured for the query."""


class BackendError(ImageloopError):
    """A model endpoint failed: unreachable, rejected the request, or returned something unusable."""


class MalformedOutputError(BackendError):
    """A model's answer could not be parsed into the expected structure, even after a repair retry."""


class OutOfMemoryError(ImageloopError):
    """The GPU or MPS ran out of memory: a batch failing with it is split and retried; one request reports it."""


class ImageDecodeError(ImageloopError):
    """A file is not a readable image."""


class StorageError(ImageloopError):
    """The disk or a store failed under us: full, read-only, busy or damaged; the message says what to do."""


class IndexDamagedError(StorageError):
    """An index's files are corrupt: deleting its `.imageloop` folder and indexing again rebuilds it."""
