"""Build ``close_guard.c`` once into the test cache and say where it is.

The library restores, under the umockdev preload, the kernel's promise that closing a
descriptor while another thread reads, writes or ioctls on it is harmless (the C file
says how umockdev 0.17.16 breaks it). :class:`tests.support.testbed.Testbed` puts it in
``LD_PRELOAD`` ahead of umockdev's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.cache import cache_dir

SOURCE = Path(__file__).with_name("close_guard.c")


class CloseGuardError(RuntimeError):
    """The guard could not be built here."""


def unavailable_reason() -> str | None:
    """Return why the guard cannot be built on this machine, or None if it can."""
    if shutil.which("gcc") is None:
        return "gcc is missing (tests/bootstrap installs it)"
    return None


def close_guard_library() -> Path:
    """Return the path of the built library, building it first if its source changed."""
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    target = cache_dir() / f"close-guard-{digest}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built beside the target and renamed: a concurrent build or an interrupted one never
    # leaves a half-written library where the next run would load it.
    fd, temp = tempfile.mkstemp(prefix=".close-guard-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        built = subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O2", "-Wall", "-Werror", "-o", temp, str(SOURCE), "-ldl"],
            capture_output=True,
            text=True,
            check=False,
        )
        if built.returncode != 0:
            reason = built.stderr.strip()[-500:]
            raise CloseGuardError(f"gcc could not build {SOURCE.name}: {reason}")
        os.replace(temp, target)
    finally:
        if os.path.exists(temp):
            os.unlink(temp)
    return target
