"""The input checks every store makes alike: a vector (1-D, finite, non-zero) and k.

Cosine similarity is undefined for a zero or non-finite vector, so every store refuses one with the
same message before anything is written or searched.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from imageloop.errors import ImageloopError
from imageloop.protocols import Vector


def checked_vector(vector: Vector, what: str) -> npt.NDArray[np.float32]:
    """A 1-D, finite, non-zero float32 copy of `vector`; cosine is undefined otherwise."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1:
        raise ImageloopError(f"{what} must be one-dimensional, got shape {array.shape}")
    # One dot product is finite and positive exactly when every value is finite and one is non-zero
    # (short of float32 overflow at magnitudes near 1e19); a per-value check costs ten times more.
    if not 0.0 < float(np.dot(array, array)) < np.inf:
        raise ImageloopError(f"{what} must be finite and non-zero")
    return array


def unit_vector(vector: Vector, what: str) -> npt.NDArray[np.float32]:
    """`vector` checked like a stored one and scaled to length 1, so inner products are cosines."""
    array = checked_vector(vector, what)
    return array / np.float32(np.sqrt(np.dot(array, array)))


def check_k(k: int) -> None:
    """Refuse a result count below one."""
    if k <= 0:
        raise ImageloopError(f"k must be a positive number of results, got {k}")
