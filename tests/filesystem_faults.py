"""Real filesystem faults for tests: a read-only disk and a full one, inside a private mount namespace.

`imageloop` runs as a subprocess under `unshare --mount` (plus `--map-root-user` when not root), where a
folder is bind-mounted read-only onto itself, or a small tmpfs is mounted over it. The namespace dies
with the process: nothing is mounted for anyone else, nothing to clean up. Where namespaces are not
allowed, the tests that need them are skipped.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def _unshare() -> tuple[str, ...] | None:
    """The unshare command that gives this user a private mount namespace, or None."""
    if shutil.which("unshare") is None:
        return None
    command = ("unshare", "--mount") if os.geteuid() == 0 else ("unshare", "--mount", "--map-root-user")
    try:
        done = subprocess.run([*command, "mount", "-t", "tmpfs", "tmpfs", "/mnt"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return command if done.returncode == 0 else None


def namespaces_available() -> bool:
    """Whether this machine lets tests mount privately (a read-only bind, a small tmpfs)."""
    return _unshare() is not None


def imageloop_in_namespace(
    args: Sequence[str],
    *,
    read_only: Sequence[Path] = (),
    tmpfs: tuple[Path, str, Path] | None = None,
    env: Mapping[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """`python -m imageloop.cli ARGS` with each of `read_only` mounted read-only, and with `tmpfs`
    (FOLDER, SIZE, SOURCE) a tmpfs of SIZE (e.g. "300k") over FOLDER, filled with a copy of SOURCE."""
    command = _unshare()
    assert command is not None, "check namespaces_available() first"
    script = ["set -e"]
    if tmpfs is not None:
        folder, size, source = tmpfs
        script += [f'mount -t tmpfs -o size={size} tmpfs "{folder}"', f'cp -r "{source}"/. "{folder}"/']
    for path in read_only:
        script += [f'mount --bind "{path}" "{path}"', f'mount -o remount,ro,bind "{path}" "{path}"']
    script.append('exec "$@"')
    return subprocess.run(
        [*command, "sh", "-c", "\n".join(script), "sh", sys.executable, "-m", "imageloop.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )
