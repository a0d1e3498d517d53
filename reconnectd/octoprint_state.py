"""What reconnectd learns from OctoPrint, as plain values, and how to read it.

The HTTP client (``octoprint_api.py``) produces these values; the decision core
(``core.py``) consumes them. Neither side sees ``requests`` or JSON.

OctoPrint's traps, and why the code below looks the way it does:

* ``GET /api/connection`` says ``"Closed"`` for a manual Disconnect, a vanished
  device and a firmware fatal error alike. The difference is only visible in
  ``GET /api/job``: ``"Offline"`` with no error, or ``"Offline after error"`` with
  the error text. Both are read together into one :class:`OctoPrintView`.
* A connect is silently ignored while any connection object exists, so the only
  safe moment to connect is ``Phase.CLOSED``.

What differs between versions (each seen against a real one, 1.9.3 to 2.0.0rc7):

* OctoPrint 2.0 says ``"Offline"`` where 1.x says ``"Closed"``.
* OctoPrint 2.0 says ``"Connecting"`` both while it opens the port (where 1.x says
  ``"Opening serial connection"``, and where both hang forever on a node that
  cannot be opened) and while it greets the firmware: from 2.0 on, "Connecting"
  is read as ``Phase.OPENING``, so that a connection stuck there is recovered.
* OctoPrint 2.0.0rc7 loses the error text: after a vanished device, a silent
  printer or a firmware ``kill()`` alike, ``/api/job`` says ``"Offline after
  error"`` with no ``error`` (and ``/api/printer/error`` is empty). Such an error
  cannot be told from a firmware stop, so it counts as one (:func:`error_of`).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Union


class Phase(enum.Enum):
    """OctoPrint's connection state, reduced to what the decision core needs."""

    CLOSED = "closed"  # no connection object: the only state in which a connect is obeyed
    OPENING = "opening"  # "Opening serial connection": can hang forever on an unopenable node
    CONNECTING = "connecting"  # detecting, connecting: OctoPrint is still trying
    OPERATIONAL = "operational"  # connected and idle
    BUSY = "busy"  # printing, paused, and everything between: never touch
    ERROR = "error"  # the brief "Error"/"Offline after error" states before OctoPrint closes


_PHASE_BY_STATE: dict[str, Phase] = {
    "closed": Phase.CLOSED,
    "offline": Phase.CLOSED,  # OctoPrint 2.0's word for no connection
    # OctoPrint 1.11.8 shows this for ~15 ms after an error while the connection
    # object still exists (seen against a real one): a connect sent then would be
    # ignored, so it is "closing, look again", not closed.
    "offline after error": Phase.ERROR,
    "opening serial connection": Phase.OPENING,
    "detecting serial connection": Phase.CONNECTING,
    "detecting serial port": Phase.CONNECTING,
    "detecting baudrate": Phase.CONNECTING,
    "detecting": Phase.CONNECTING,  # OctoPrint 2.0, from a connector that says no more
    "connecting": Phase.CONNECTING,
    "operational": Phase.OPERATIONAL,
    "error": Phase.ERROR,
}


def phase_of(state: str, version: str | None = None) -> Phase:
    """Given OctoPrint's ``current.state`` text (and its version, when known), return
    its :class:`Phase`.

    Every state not known to be closed, opening, connecting, operational or error
    (printing, paused, cancelling, transferring to SD, and any state a future
    OctoPrint invents) is ``BUSY``: unknown means hands off. From 2.0 on,
    ``"Connecting"`` is ``OPENING``: 2.0 uses that one word for opening the port too,
    and only OPENING is recovered when it lasts.
    """
    text = state.strip().lower()
    if text == "connecting" and is_2_or_later(version):
        return Phase.OPENING
    return _PHASE_BY_STATE.get(text, Phase.BUSY)


def is_2_or_later(version: str | None) -> bool:
    """Given OctoPrint's version text (``"2.0.0rc7"``, ``"1.11.8"``), return whether it
    is 2.0 or later; an unknown or unreadable version is not."""
    if not version:
        return False
    major = version.strip().split(".", 1)[0]
    return major.isdigit() and int(major) >= 2


# What a closed OctoPrint's error is taken to be when /api/job says there was one but
# not which (OctoPrint 2.0.0rc7 drops the text when it closes the connection).
UNNAMED_ERROR = (
    'OctoPrint says "Offline after error" but not which error (OctoPrint 2.0 does not '
    "report it); taken as a firmware stop"
)


def error_of(job_state: str | None, error: str | None) -> str | None:
    """Given ``/api/job``'s ``state`` and ``error`` while no connection exists, return
    the error text to decide on.

    The error text when there is one; :data:`UNNAMED_ERROR` when the state says there
    was an error but no text came (OctoPrint 2.0); None when there was no error.
    """
    if error is not None and error.strip():
        return error
    if job_state is not None and "error" in job_state.strip().lower():
        return UNNAMED_ERROR
    return None


class ErrorKind(enum.Enum):
    """Why OctoPrint closed, read from the error text of ``/api/job``."""

    NONE = "none"  # no error: a manual Disconnect, or a connect attempt that found no printer
    TRANSPORT = "transport"  # the line went away or went silent: safe to try again
    FATAL = "fatal"  # the firmware stopped itself (thermal runaway, kill()): a person must look


# Firmware safety stops. Checked first: a fatal message may also mention the port.
_FATAL_MARKERS = (
    "kill() called",
    "printer halted",
    "thermal runaway",
    "heating failed",
    "maxtemp",
    "mintemp",
    "emergency",
    "system stopped",
)

# Texts OctoPrint produces when the serial line itself failed or went quiet.
_TRANSPORT_MARKERS = (
    "serialexception",
    "device reports readiness to read but returned no data",
    "device disconnected",
    "input/output error",
    "[errno 5]",
    "[errno 2]",
    "[errno 6]",
    "[errno 19]",
    "no such file or directory",
    "could not open port",
    "too many consecutive timeouts",
    "no more candidates to test",
    "failed to autodetect",
    "unexpected error while connecting",
    "connection closed",
)


def classify_error(error: str | None) -> ErrorKind:
    """Given the error text OctoPrint reports after closing, return why it closed.

    An error that is neither a known firmware stop nor a known failure of the
    serial line is taken as FATAL: OctoPrint disconnects on firmware ``Error:``
    lines by default, and reconnecting after an unknown firmware error resets the
    board through DTR. Unknown means a person must look.
    """
    if error is None or not error.strip():
        return ErrorKind.NONE
    text = error.lower()
    if any(marker in text for marker in _FATAL_MARKERS):
        return ErrorKind.FATAL
    if any(marker in text for marker in _TRANSPORT_MARKERS):
        return ErrorKind.TRANSPORT
    return ErrorKind.FATAL


@dataclass(frozen=True)
class OctoPrintView:
    """One reading of ``/api/connection`` and ``/api/job`` taken together."""

    state: str
    port: str | None = None
    error: str | None = None
    ports: tuple[str, ...] = ()
    baudrates: tuple[int, ...] = ()
    port_preference: str | None = None
    baudrate_preference: int | None = None
    profile_preference: str | None = None
    version: str | None = None  # OctoPrint's, read only when a state text needs it

    @property
    def phase(self) -> Phase:
        return phase_of(self.state, self.version)

    @property
    def error_kind(self) -> ErrorKind:
        return classify_error(self.error)


@dataclass(frozen=True)
class Accepted:
    """OctoPrint took a command (204). It runs in the background and says nothing more."""


@dataclass(frozen=True)
class Unreachable:
    """OctoPrint did not answer usefully: refused, timed out, 5xx, or not JSON.

    Transient by nature: OctoPrint is starting, restarting or overloaded.
    """

    reason: str


@dataclass(frozen=True)
class Refused:
    """OctoPrint answered and said no: 403 (key rejected or lacking permission),
    400 (port or baudrate not in its lists), 409, 415. Retrying the same request
    does not help until something changes.
    """

    status: int
    reason: str


ReadResult = Union[OctoPrintView, Unreachable, Refused]
CommandResult = Union[Accepted, Unreachable, Refused]


# OctoPrint plugins that reconnect the printer on their own, by plugin identifier (the
# key of their settings under ``plugins`` in /api/settings, compared without case),
# with the name their users know. Two reconnectors fight: each undoes the other's
# decision (a Disconnect reconnectd respects, a plugin reconnects).
RECONNECT_PLUGINS: dict[str, str] = {
    "serialreconnect": "SerialReconnect",
    "portretry": "PortRetry",
    "portretryplus": "PortRetryPlus",
    "autoconnectplus": "AutoConnectPlus",
    "reconnectguru": "ReconnectGuru",  # its first releases
    "reconnect_guru": "ReconnectGuru",
}


def reconnect_plugins(plugin_settings: object) -> list[tuple[str, str]]:
    """Given the ``plugins`` object of ``GET /api/settings``, return the reconnect
    plugins in it as (identifier, name), sorted by identifier.

    OctoPrint lists there every enabled plugin that has settings, under its
    identifier. A plugin whose own ``enabled`` setting is false is loaded but idle,
    and is left out. Anything that is not an object yields nothing.
    """
    if not isinstance(plugin_settings, dict):
        return []
    found: list[tuple[str, str]] = []
    for identifier, settings in plugin_settings.items():
        name = RECONNECT_PLUGINS.get(str(identifier).lower())
        if name is None:
            continue
        if isinstance(settings, dict) and settings.get("enabled") is False:
            continue
        found.append((str(identifier), name))
    return sorted(found)
