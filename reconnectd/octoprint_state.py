"""What reconnectd learns from OctoPrint, as plain values, and how to read it.

The HTTP client (``octoprint_api.py``) produces these values; the decision core
(``core.py``) consumes them. Neither side sees ``requests`` or JSON.

OctoPrint's traps, and why the code below looks the way it does:

* ``GET /api/connection`` says ``"Closed"`` for a manual Disconnect, a vanished
  device and a firmware fatal error alike. The difference is only visible in
  ``GET /api/job``: ``"Offline"`` with no error, or ``"Offline after error"`` with
  the error text. Both are read together into one :class:`OctoPrintView`.
* OctoPrint 2.0 says ``"Offline"`` where 1.x says ``"Closed"``.
* A connect is silently ignored while any connection object exists, so the only
  safe moment to connect is ``Phase.CLOSED``.
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
    "connecting": Phase.CONNECTING,
    "operational": Phase.OPERATIONAL,
    "error": Phase.ERROR,
}


def phase_of(state: str) -> Phase:
    """Given OctoPrint's ``current.state`` text, return its :class:`Phase`.

    Every state not known to be closed, opening, connecting, operational or error
    (printing, paused, cancelling, transferring to SD, and any state a future
    OctoPrint invents) is ``BUSY``: unknown means hands off.
    """
    return _PHASE_BY_STATE.get(state.strip().lower(), Phase.BUSY)


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

    @property
    def phase(self) -> Phase:
        return phase_of(self.state)

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
