"""Where the tests keep what they build once.

``$RECONNECTD_TEST_CACHE`` or ``~/.cache/reconnectd-tests``: tests/bootstrap fills the same
directory (OctoPrint venvs, the Klipper build, systemd-nspawn).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """Return the test cache directory (not created)."""
    return Path(os.environ.get("RECONNECTD_TEST_CACHE") or Path.home() / ".cache/reconnectd-tests")
