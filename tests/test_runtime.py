"""`imageloop.runtime`: the process-wide model cache and the lookups threads share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

# A fresh process (diffusers not yet imported), eight threads asking diffusers for pipelines at once: four
# server runs loading their generators the first time. diffusers' lazy names alone answer some of them
# "module 'diffusers' has no attribute ...".
RACE = """
import threading
from imageloop.runtime import diffusers_class
names = ["OmniGenPipeline", "FluxPipeline", "StableDiffusionXLPipeline", "AutoencoderKL"] * 2
found = []
threads = [threading.Thread(target=lambda name=name: found.append(diffusers_class(name))) for name in names]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(sum(cls is not None for cls in found))
"""


def test_threads_looking_up_diffusers_classes_at_once_each_get_theirs() -> None:
    result = subprocess.run([sys.executable, "-c", RACE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.stdout.strip() == "8", result.stderr


def test_a_name_diffusers_lacks_is_none() -> None:
    from imageloop.runtime import diffusers_class

    assert diffusers_class("NoSuchPipeline") is None
