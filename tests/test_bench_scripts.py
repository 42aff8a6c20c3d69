"""Every benchmark still imports what it uses: a refactor that renames a module's name breaks a script
nobody runs until the next measurement (bench/mcp.py imported a class #20 had removed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Each script is loaded as `python bench/X.py` loads it (its folder first on sys.path, so it may import its
# neighbours), but not run (its name is not __main__), in one fresh process that its sys.path edits cannot harm.
LOAD_ALL = """
import os, runpy, sys
path = list(sys.path)
for script in sys.argv[1:]:
    sys.path[:] = [os.path.dirname(script), *path]
    runpy.run_path(script, run_name="bench_import_check")
"""


def test_every_benchmark_loads() -> None:
    scripts = sorted(str(path) for path in (REPO / "bench").glob("*.py"))
    assert scripts
    loaded = subprocess.run(
        [sys.executable, "-c", LOAD_ALL, *scripts], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert loaded.returncode == 0, loaded.stderr[-2000:]
