"""How a folder is indexed, declared once: the `index` command's options and the `index_images` tool's arguments.

Indexing is not a loop, but its options follow the knobs' habit (`imageloop.knobs`): one typed model,
from which the CLI options (`imageloop index --help`), the agent tools' argument schema (MCP and
LangChain alike) and `App.index_folder`'s validation (an unknown name refused with the valid ones, a
value past its bound in the words of `imageloop.limits`) are derived.

Importing this module imports no numpy: the faces read it to build their options.
"""

from __future__ import annotations

from typing import ClassVar

from imageloop.knobs import Knobs, knob
from imageloop.tools.stores.engines import AnnEngine


class IndexOptions(Knobs):
    """`imageloop index`: how images are embedded, and how the embedded store searches them once large."""

    LOOP: ClassVar[str] = "index"
    batch_size: int = knob(bound="batch_size")
    ann: AnnEngine | None = knob(
        None,
        description="the embedded store's search index past 100,000 images, recorded in the index: hnsw (a graph "
        "over the vectors) or quantized (4-bit codes in memory, re-ranked exactly; for vectors that do not fit "
        "in memory); unset: the recorded one, else by size",
    )
    threads: int | None = knob(bound="threads")
