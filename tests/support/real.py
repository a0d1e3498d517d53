"""Whether the real components the end-to-end tests drive are on this machine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.support.octoprint_instance import octoprint_bin
from tests.support.testbed import unavailable_reason


def missing(what: str) -> None:
    """Skip for want of ``what``; fail instead when the run demands everything real.

    ``bash tests/run`` (and so CI) sets RECONNECTD_REQUIRE_REAL=1: there a missing
    umockdev or OctoPrint is a broken machine, not a reason to pass quietly.
    """
    if os.environ.get("RECONNECTD_REQUIRE_REAL") == "1":
        pytest.fail(what)
    pytest.skip(what)


def require_umockdev_and_octoprint() -> None:
    """Skip (or fail, see :func:`missing`) unless umockdev and OctoPrint are here."""
    problems = []
    reason = unavailable_reason()
    if reason:
        problems.append(reason)
    if not Path(octoprint_bin()).exists():
        problems.append(f"no OctoPrint at {octoprint_bin()} (tests/bootstrap installs it)")
    if problems:
        missing("; ".join(problems))
