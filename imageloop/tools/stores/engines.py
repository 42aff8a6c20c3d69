"""The search engines an embedded store can be told to use past its exact-search size (`imageloop index --ann`).

Kept apart from the store (which imports numpy) so that the CLI can offer them without loading it.
"""

from __future__ import annotations

from typing import Literal

AnnEngine = Literal["hnsw", "quantized"]
ANN_ENGINES: tuple[AnnEngine, ...] = ("hnsw", "quantized")
