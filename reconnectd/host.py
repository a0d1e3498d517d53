"""What a printer host reports, in the decision core's own words.

A printer host is the program that holds the printer's serial line: OctoPrint, or
Klipper's host (Klippy) behind Moonraker. Each has a client and a module that reads
its answers (``octoprint_api``/``octoprint_state``, ``moonraker_api``/``moonraker_state``);
both turn what they read into the values below, and the core (``core.py``) decides on
these alone. Neither the core nor this module knows HTTP, JSON or either host's words.

The vocabulary, and what each host means by it:

=============  ==================================  ====================================
phase          OctoPrint                           Klippy (``/printer/info`` state)
=============  ==================================  ====================================
CLOSED         no connection ("Closed")            ``shutdown`` or ``error``
OPENING        "Opening serial connection"         (never)
CONNECTING     detecting, connecting               ``startup``
OPERATIONAL    "Operational"                       ``ready``, nothing printing
BUSY           printing, paused, cancelling...     ``ready`` while printing or paused
ERROR          closing after an error              (never)
=============  ==================================  ====================================

Only CLOSED is a state in which the core acts; why the host closed (``ErrorKind``) says
whether acting is safe. The host's own words stay in ``state`` and ``error``, for the
journal and the status.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol, Union, runtime_checkable


class Phase(enum.Enum):
    """The host's state, reduced to what the decision core needs."""

    CLOSED = "closed"  # nothing holds the printer: the only state in which the core acts
    OPENING = "opening"  # opening the port: can hang forever on an unopenable node
    CONNECTING = "connecting"  # the host is getting there by itself: look again
    OPERATIONAL = "operational"  # connected and idle
    BUSY = "busy"  # printing, paused, and everything between: never touch
    ERROR = "error"  # closing after an error: look again in a moment


class ErrorKind(enum.Enum):
    """Why the host closed."""

    NONE = "none"  # no error: a manual Disconnect, or a connect that found no printer
    TRANSPORT = "transport"  # the line went away or silent (the MCU was lost): safe to act
    FATAL = "fatal"  # the firmware or a person stopped it: a person must look


@dataclass(frozen=True)
class HostView:
    """One reading of the printer host.

    ``ports`` are the ports the host offers to connect to (OctoPrint); a host that
    needs no port chosen (Klipper's config names it) offers none and sets
    ``needs_port`` False. ``waiting_for`` says why acting must wait although the host
    is closed (a second MCU's board still off). ``lost_print`` names the print an MCU
    loss cut off, for the journal. ``profiles`` are the ids of the printer profiles the
    host offers (OctoPrint), ``profile_names`` their names in the same order.
    """

    state: str
    phase: Phase
    error: str | None = None
    error_kind: ErrorKind = ErrorKind.NONE
    port: str | None = None
    ports: tuple[str, ...] = ()
    needs_port: bool = True
    baudrates: tuple[int, ...] = ()
    port_preference: str | None = None
    baudrate_preference: int | None = None
    profile_preference: str | None = None
    profiles: tuple[str, ...] = ()
    profile_names: tuple[str, ...] = ()
    waiting_for: str | None = None
    lost_print: str | None = None


@dataclass(frozen=True)
class Accepted:
    """The host took a command. It runs in the background and says nothing more."""


@dataclass(frozen=True)
class Unreachable:
    """The host did not answer usefully: refused, timed out, 5xx, not JSON, or (Klipper)
    Klippy not connected to Moonraker. Transient by nature: it is starting, restarting
    or overloaded."""

    reason: str


@dataclass(frozen=True)
class Refused:
    """The host answered and said no. ``key_rejected``: the API key is wrong or may not
    do this (a person must fix it); otherwise the request itself was refused (a port
    that left the list), and a fresh look decides again. ``status`` is the HTTP status,
    for the journal only."""

    status: int
    reason: str
    key_rejected: bool = False


ReadResult = Union[HostView, Unreachable, Refused]
CommandResult = Union[Accepted, Unreachable, Refused]


class HostClient(Protocol):
    """What the loop needs of a printer host's client: ``octoprint_api.OctoPrintApi`` or
    ``moonraker_api.MoonrakerApi``. Every call returns a value and never raises."""

    @property
    def url(self) -> str: ...

    def read(self, *, detail: bool = True) -> ReadResult:
        """Return what the host reports (``detail``: see ``core.ReadHost``)."""
        ...

    def act(self, port: str | None, baudrate: int | None, profile: str | None) -> CommandResult:
        """Bring the printer back: OctoPrint connects to ``port``; Klipper restarts."""
        ...

    def recover(self) -> CommandResult:
        """End an attempt stuck in the host (OctoPrint: disconnect)."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class PluginChecked(Protocol):
    """A host that can run a reconnect plugin of its own (OctoPrint), asked once."""

    def reconnect_plugins(self) -> list[tuple[str, str]] | Unreachable | Refused: ...
