"""How OctoPrint's state texts and error texts are read.

The texts here are the ones OctoPrint 1.11.8 really produces (1.9.3 and 1.10.3
produce the same), and those of 2.0.0rc7 where it differs; test_octoprint_api.py
checks the same classification against a running OctoPrint, and
test_octoprint_versions.py runs the core scenarios against each version.
"""

from __future__ import annotations

import pytest

from reconnectd.host import ErrorKind, Phase
from reconnectd.octoprint_state import (
    UNNAMED_ERROR,
    classify_error,
    error_of,
    is_2_or_later,
    octoprint_view,
    phase_of,
    reconnect_plugins,
)


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
        ("Detecting", Phase.CONNECTING),  # OctoPrint 2.0
        ("Transferring file to printer", Phase.BUSY),  # OctoPrint 2.0
    ],
)
def test_phase_of(state: str, phase: Phase) -> None:
    assert phase_of(state) == phase


@pytest.mark.parametrize(
    ("state", "version", "phase"),
    [
        # 2.0.0rc7 says "Connecting" from the moment it opens the port, and forever
        # on a node that cannot be opened (seen): only OPENING is recovered.
        ("Connecting", "2.0.0rc7", Phase.OPENING),
        ("Connecting", "2.1.0", Phase.OPENING),
        ("Connecting", "1.11.8", Phase.CONNECTING),
        ("Connecting", "1.9.3", Phase.CONNECTING),
        ("Connecting", None, Phase.CONNECTING),  # unknown: read as 1.x means it
        ("Offline", "2.0.0rc7", Phase.CLOSED),
        ("Operational", "2.0.0rc7", Phase.OPERATIONAL),
        ("Opening serial connection", "1.10.3", Phase.OPENING),
    ],
)
def test_phase_of_depends_on_the_version_only_for_connecting(
    state: str, version: str | None, phase: Phase
) -> None:
    assert phase_of(state, version) == phase
    assert octoprint_view(state=state, version=version).phase == phase


@pytest.mark.parametrize(
    ("version", "two"),
    [
        ("2.0.0rc7", True),
        ("2.0.0", True),
        ("10.1", True),
        ("1.11.8", False),
        ("1.9.3", False),
        (None, False),
        ("", False),
        ("unknown", False),
        ("0+unknown", False),
    ],
)
def test_is_2_or_later(version: str | None, two: bool) -> None:
    assert is_2_or_later(version) is two


@pytest.mark.parametrize(
    ("job_state", "error", "read_as"),
    [
        # 1.x, and 2.0 after a manual Disconnect or a connect nobody answered.
        ("Offline", None, None),
        # 1.9.3 to 1.11.8 after a firmware kill(): the text is there.
        ("Offline after error", "Printer halted. kill() called!", "Printer halted. kill() called!"),
        # 2.0.0rc7 after a vanished device, a silent printer and a kill() alike.
        ("Offline after error", None, UNNAMED_ERROR),
        ("Offline after error", "", UNNAMED_ERROR),
        (None, None, None),
    ],
)
def test_error_of(job_state: str | None, error: str | None, read_as: str | None) -> None:
    assert error_of(job_state, error) == read_as


def test_an_error_octoprint_does_not_name_counts_as_a_firmware_stop() -> None:
    # Reconnecting after a firmware stop resets the board: without the text, a
    # person must look (a power cycle releases the hold, as for any firmware stop).
    assert classify_error(UNNAMED_ERROR) == ErrorKind.FATAL


@pytest.mark.parametrize(
    ("plugins", "found"),
    [
        ({"portretry": {"interval": 5.0}}, [("portretry", "PortRetry")]),
        (
            {"SerialReconnect": {"enabled": True, "poll_period": 5}, "appkeys": {}},
            [("SerialReconnect", "SerialReconnect")],
        ),
        ({"SerialReconnect": {"enabled": False, "poll_period": 5}}, []),  # loaded but idle
        (
            {"reconnect_guru": {}, "portretryplus": {}, "autoconnectplus": {"x": 1}},
            [
                ("autoconnectplus", "AutoConnectPlus"),
                ("portretryplus", "PortRetryPlus"),
                ("reconnect_guru", "ReconnectGuru"),
            ],
        ),
        ({"reconnectguru": {}}, [("reconnectguru", "ReconnectGuru")]),
        ({"portlister": {}, "serial_connector": {"log": True}}, []),
        (None, []),
        (["portretry"], []),
    ],
)
def test_reconnect_plugins(plugins: object, found: list[tuple[str, str]]) -> None:
    assert reconnect_plugins(plugins) == found


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
    v = octoprint_view(state="Closed", error="Printer halted. kill() called!")
    assert (v.phase, v.error_kind) == (Phase.CLOSED, ErrorKind.FATAL)
