"""How OctoPrint's state texts and error texts are read.

The texts here are the ones OctoPrint 1.11.8 really produces; test_octoprint_api.py
checks the same classification against a running OctoPrint.
"""

from __future__ import annotations

import pytest

from reconnectd.octoprint_state import ErrorKind, OctoPrintView, Phase, classify_error, phase_of


@pytest.mark.parametrize(
    ("state", "phase"),
    [
        ("Closed", Phase.CLOSED),
        ("Offline", Phase.CLOSED),  # OctoPrint 2.0
        ("Offline after error", Phase.ERROR),  # 1.11.8: closing, the connection still exists
        ("Opening serial connection", Phase.OPENING),
        ("Detecting serial connection", Phase.CONNECTING),
        ("Connecting", Phase.CONNECTING),
        ("Operational", Phase.OPERATIONAL),
        ("Error", Phase.ERROR),
        ("Printing", Phase.BUSY),
        ("Printing from SD", Phase.BUSY),
        ("Paused", Phase.BUSY),
        ("Cancelling", Phase.BUSY),
        ("Transferring file to SD", Phase.BUSY),
        ("  operational ", Phase.OPERATIONAL),
        ("A state nobody has seen yet", Phase.BUSY),
    ],
)
def test_phase_of(state: str, phase: Phase) -> None:
    assert phase_of(state) == phase


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (None, ErrorKind.NONE),
        ("", ErrorKind.NONE),
        ("   ", ErrorKind.NONE),
        (
            "SerialException: device reports readiness to read but returned no data "
            "(device disconnected or multiple access on port?)",
            ErrorKind.TRANSPORT,
        ),
        ("OSError: [Errno 5] Input/output error", ErrorKind.TRANSPORT),
        ("Too many consecutive timeouts, printer still connected and alive?", ErrorKind.TRANSPORT),
        (
            "could not open port /dev/ttyACM0: [Errno 2] No such file or directory",
            ErrorKind.TRANSPORT,
        ),
        (
            "Thermal Runaway, system stopped! Heater_ID: bed - Printer halted. kill() called!",
            ErrorKind.FATAL,
        ),
        ("Printer halted. kill() called!", ErrorKind.FATAL),
        ("MINTEMP triggered, system stopped! Heater_ID: E0", ErrorKind.FATAL),
        ("Heating failed, system stopped! Heater_ID: 0", ErrorKind.FATAL),
        ("Emergency stop", ErrorKind.FATAL),
        # An unknown firmware error is fatal: a person must look.
        ("Error: Z probe out of range", ErrorKind.FATAL),
        # A fatal text that also mentions the line is still fatal.
        ("Printer halted. kill() called! SerialException follows", ErrorKind.FATAL),
    ],
)
def test_classify_error(error: str | None, kind: ErrorKind) -> None:
    assert classify_error(error) == kind


def test_view_exposes_phase_and_error_kind() -> None:
    v = OctoPrintView(state="Closed", error="Printer halted. kill() called!")
    assert (v.phase, v.error_kind) == (Phase.CLOSED, ErrorKind.FATAL)
