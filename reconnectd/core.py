"""The decision core: what to do for one printer, given what happened and the time.

Pure by design: no clock, no I/O, no threads. The daemon feeds a :class:`PrinterCore`
events (a device appeared or vanished, OctoPrint answered, a deadline passed) with
the current monotonic time; the core returns :class:`Action` values (read
OctoPrint, connect, disconnect, log a line) and exposes the next time it wants to
be woken. Every rule of the contract's behaviour list lives here and is unit-tested
with an injected clock.

How the core tells situations apart, since OctoPrint says "Closed" for all of them:

* It remembers the device *instance* on which it last saw OctoPrint connected. An
  instance changes whenever the device vanishes and comes back (see ``Device``).
* A closure it did not cause, on the instance it saw connected, is the user's
  Disconnect (no error), a firmware stop (fatal error) or a failed line (transport
  error). The first two place a hold; the third is retried.
* After the device vanished and came back, OctoPrint's old error is stale: the
  core connects. At start, with nothing remembered, it connects too (rule 9),
  except over a fatal error it cannot prove stale.
* A closure after its own connect attempt is a failed attempt, never a hold: a
  silent printer ends "Offline" with no error, exactly like a manual Disconnect.

Since reconnectd sends no request while nothing happens, a Disconnect is noticed
when the core next looks (an event, a reload, a restart), which is exactly when it
matters: nothing would reconnect in between anyway.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Union

from reconnectd.devices import Device
from reconnectd.host import (
    Accepted,
    CommandResult,
    ErrorKind,
    HostView,
    Phase,
    ReadResult,
    Refused,
    Unreachable,
)

# --- timing -------------------------------------------------------------------

RETRY_FIRST = 5.0  # contract rule 7: a failed connect is retried after 5 s ...
RETRY_CAP = 300.0  # ... doubling up to 300 s
# An event-driven printer (poll = 0) whose connects keep failing waits for the
# device to come back after this many attempts: each attempt at a silent printer
# holds OctoPrint ~40 s and leaks one of its threads (OctoPrint #5420).
EVENT_DRIVEN_ATTEMPTS = 8
CONFIRM_FIRST = 0.5  # first look after a connect; Operational takes 0.1 s to ~12 s
CONFIRM_CAP = 5.0
# A host that still reports the printer connected right after the device came back
# is looked at again this often while CoreSettings.recheck_after_return lasts.
RECHECK_EVERY = 1.0
# "Opening serial connection" lasts milliseconds when the port opens, ~10 s when
# ModemManager holds a fresh ttyACM, and forever when the node cannot be opened.
STUCK_AFTER = 20.0
UNREACHABLE_FIRST = 1.0  # OctoPrint restarting: look again soon ...
UNREACHABLE_CAP = 30.0  # ... but not more than twice a minute while it is down
REFUSED_RETRY = 60.0  # a rejected key needs a person; look again now and then
# OctoPrint rebuilds its port list on every request, but after a replug it can lag
# udev's add by seconds (udev still making the by-id link, /dev bound into a
# container, a loaded machine): a node that is present but not listed is looked for
# again every second for this long before it counts as never offered.
UNLISTED_GRACE = 10.0
UNLISTED_LOOK = 1.0
UNLISTED_FIRST_LOOK = 0.5
UNLISTED_RETRY = 30.0  # then, with the advice given, 30 s doubling to RETRY_CAP
# Klipper's second MCU not there yet: looked for again 5 s doubling to this.
WAIT_CAP = 60.0
# Klippy drops its link to Moonraker while it restarts (503 for about 1.2 s): after our
# own restart, an unreachable host is looked at again quietly for this long.
RESTART_QUIET = 10.0
# Devices remembered as seen running as a printer (zero config); the oldest go first.
KNOWN_DEVICES_MAX = 16


class HoldKind(enum.Enum):
    MANUAL = "manual disconnect"
    FATAL = "firmware error"


@dataclass(frozen=True)
class Hold:
    """A reason not to connect, released when the device vanishes and comes back."""

    kind: HoldKind
    reason: str
    instance: str


@dataclass(frozen=True)
class CoreSettings:
    """The part of a printer's config the decisions depend on."""

    name: str
    settle: float = 1.0
    poll: float = 0.0
    port: str | None = None
    baudrate: int | None = None
    profile: str | None = None
    dry_run: bool = False
    # Zero config: any known board matches, and a Pi's Zigbee or GPS stick often has
    # the same USB chip as the printer. Connect only a device OctoPrint itself points
    # at (its saved port) or one seen running as a printer before.
    only_known_devices: bool = False
    # The printer host, as the journal names it: "OctoPrint", or "Klippy" (Klipper's
    # host, reached through Moonraker), whose "connect" is a FIRMWARE_RESTART.
    host: str = "OctoPrint"
    # After the device came back, a host that still reports the printer connected may
    # not have noticed the old line died yet: OctoPrint notices in 0.1 s, Klippy in
    # 4.5 to 5.5 s. It is looked at again, every RECHECK_EVERY, until this long after
    # the return.
    recheck_after_return: float = 5.0
    # The config's stuck_after, retry_first and retry_max (defaults: the contract's).
    stuck_after: float = STUCK_AFTER
    retry_first: float = RETRY_FIRST
    retry_cap: float = RETRY_CAP


# --- actions ------------------------------------------------------------------


@dataclass(frozen=True)
class ReadHost:
    """Read the printer host; answer with :meth:`PrinterCore.host_read`.

    ``detail`` False when nothing but the host's state could change the decision (the
    first look after the device came back): one request fewer on the way to the
    connect (OctoPrint's ``/api/job``, whose error text is then None in the view).
    """

    detail: bool = True


@dataclass(frozen=True)
class Connect:
    """Bring the printer back: OctoPrint's connect to ``port``, or Klipper's
    FIRMWARE_RESTART (``port`` None: Klipper's config names it). Answer with
    :meth:`PrinterCore.command_done`."""

    port: str | None
    baudrate: int | None
    profile: str | None


@dataclass(frozen=True)
class Disconnect:
    """POST disconnect; answer with :meth:`PrinterCore.command_done`."""


@dataclass(frozen=True)
class Log:
    """One line for the journal: a decision and its reason."""

    level: int
    message: str


Action = Union[ReadHost, Connect, Disconnect, Log]


class State(enum.Enum):
    """Where a printer is, as a person would say it (status file, STATUS=)."""

    ABSENT = "absent"
    SETTLING = "settling"
    CHECKING = "checking"
    CONNECTING = "connecting"
    OPERATIONAL = "operational"
    BUSY = "busy"
    HELD = "held"
    RETRY_WAIT = "waiting to retry"
    GAVE_UP = "gave up"
    RECOVERING = "recovering"
    UNREACHABLE = "unreachable"  # the status says whose: "octoprint unreachable"
    REJECTED = "key rejected"
    PORT_PENDING = "waiting for the port to be listed"
    NO_PORT = "port not offered"
    UNKNOWN_DEVICE = "not known as a printer"
    WAITING = "waiting for another board"
    DRY_RUN = "dry run"


@dataclass
class _Attempt:
    """Our own connect in flight: a closure now means it failed, not a hold."""

    started: float
    looks: int = 0


@dataclass
class PrinterCore:
    """All decisions for one printer. Create one per printer; feed it events."""

    settings: CoreSettings
    device: Device | None = None
    holds: list[Hold] = field(default_factory=list)
    # Persisted across restarts (see memory()/restore()):
    connected_instance: str | None = None  # where we last saw OctoPrint connected
    # The last instance OctoPrint was read on. Not the last one seen: stored when the
    # device came back, a restart before the look would take the return as old news.
    last_instance: str | None = None
    # Devices (device_identity) on which OctoPrint was seen running a printer.
    known_devices: list[str] = field(default_factory=list)

    state: State = State.ABSENT
    decision: str = "none"
    reason: str = "starting"
    decided_at: float | None = None
    attempts: int = 0  # failed connects since the last device event
    total_connects: int = 0

    _generation: int = 0  # bumped by every device event; stale answers are dropped
    _asked_in: int = 0  # the generation in which the request in flight was sent
    _fresh: bool = False  # this presence began with a vanish and return we know of
    _seen_connected: bool = False  # we saw a connection during this presence
    _seen_opening: bool = False  # we saw someone's connection being made, ditto
    _deadline: float | None = None
    _in_flight: bool = False
    _attempt: _Attempt | None = None
    _recovering: bool = False  # we disconnected a stuck connection: connect on Closed
    _opening_since: float | None = None
    _outage: str | None = None  # Unreachable/Refused reason while it lasts
    _outage_kind: State | None = None  # UNREACHABLE or REJECTED, while it lasts
    _outage_count: int = 0
    _held_logged: bool = False
    _failing: str | None = None  # the cause of the current run of failed connects, once logged
    _unlisted_since: float | None = None  # first look that found the device's port unlisted
    _unlisted_looks: int = 0  # looks since the grace ended, for the backoff
    _returned_at: float | None = None  # when the device we have came back (observed)
    _waits: int = 0  # looks that found another board missing (waiting_for), for the backoff

    # --- inputs -------------------------------------------------------------

    def device_added(
        self,
        device: Device,
        now: float,
        *,
        enumerated: bool = False,
        settle_until: float | None = None,
    ) -> list[Action]:
        """Given a matching device that appeared (or was present at start), act after settling.

        An observed add of a new instance means the device vanished and came back
        (or was plugged for the first time): holds are released and the backoff
        starts over. An add for the instance we already have is udev announcing it
        again (a ``change`` after ``udevadm trigger``): it earns a fresh look, but
        releases nothing, since nothing was switched off. An enumerated device at
        start releases only holds placed on another instance. ``settle_until`` carries a
        settle window that was running when this core replaced another (a reload that
        changed the printer's config): an enumerated device then waits for it too.
        """
        previous = self.device
        self.device = device
        self._generation += 1
        self.state = State.SETTLING
        # An outage of the host is not the device's: it stays said once across events.
        if not enumerated and previous is not None and _same_instance(previous, device):
            self._deadline = now + self.settings.settle
            return []
        actions: list[Action] = []
        if enumerated:
            # Fresh only when we remember another instance: with nothing remembered
            # (first start) an old fatal error cannot be proven stale.
            self._fresh = (
                bool(device.instance)
                and self.last_instance is not None
                and device.instance != self.last_instance
            )
            # It may have come back while we were away (the state file cannot always
            # tell): a host that says connected may not have noticed yet either.
            self._returned_at = now
            self._seen_connected = (
                bool(device.instance) and device.instance == self.connected_instance
            )
            self._seen_opening = False
            # A hold on an unknown instance is kept: safety over convenience.
            kept = [
                h
                for h in self.holds
                if not h.instance or not device.instance or h.instance == device.instance
            ]
            if len(kept) != len(self.holds):
                actions.append(self._log(logging.INFO, "holds released: the device was replugged"))
            self.holds = kept
            # Nothing to debounce at start: decide now, unless the core this one
            # replaces was still waiting for a burst to settle (rule 2).
            self._deadline = now if settle_until is None else max(now, settle_until)
        else:
            self._fresh = True
            self._returned_at = now
            self._seen_connected = False
            self._seen_opening = False
            if self.holds:
                actions.append(
                    self._log(logging.INFO, "holds released: the device vanished and came back")
                )
            self.holds = []
            self._deadline = now + self.settings.settle
        self._reset_attempts()
        self._held_logged = False
        self._unlisted_since = None
        self._waits = 0
        return actions

    def device_removed(self, now: float) -> list[Action]:
        """Given that the matching device vanished, forget it; holds end here."""
        actions: list[Action] = []
        self._generation += 1
        if self.holds:
            actions.append(self._log(logging.INFO, "holds released: the device vanished"))
        self.holds = []
        self.device = None
        self._fresh = False
        self._seen_connected = False
        self._seen_opening = False
        self._reset_attempts()
        self._recovering = False
        self._opening_since = None
        self._unlisted_since = None
        self._returned_at = None
        self._deadline = None
        self.state = State.ABSENT
        return actions

    def let_go(self, now: float) -> list[Action]:
        """Forget the device without it having vanished (zero config moves on from a
        device it will not connect to another candidate); holds stay as they are."""
        del now
        self._generation += 1
        self.device = None
        self._fresh = self._seen_connected = self._seen_opening = False
        self._reset_attempts()
        self._recovering = False
        self._opening_since = self._unlisted_since = self._deadline = None
        self.state = State.ABSENT
        return []

    def reconfigure(self, settings: CoreSettings) -> None:
        """Given the printer's changed settings (a reload), decide by them from now on.

        Everything known of the device and OctoPrint is kept: a new core would take a
        return not yet acted on for a start, and an old fatal error as unproven.
        """
        self.settings = settings

    def reconcile(self, now: float, why: str) -> list[Action]:
        """Given a reason to look again (a reload), read OctoPrint soon if a device is here.

        A look already scheduled is never brought forward: a settle window still
        running keeps one burst to one connect (rule 2), and a retry's backoff keeps
        a silent printer from costing OctoPrint a thread per reload (rule 7). Only a
        rejected key is looked at again at once: the reload may have brought a new one.
        """
        if self.device is None or self._in_flight:
            return []
        if self._deadline is not None and self.state != State.REJECTED:
            return [self._log(logging.DEBUG, f"{why}; the look already planned stands")]
        self._deadline = now
        return [self._log(logging.DEBUG, f"looking again: {why}")]

    def tick(self, now: float) -> list[Action]:
        """Given the time, act on a deadline that has passed."""
        if self._deadline is None or now < self._deadline or self._in_flight:
            return []
        self._deadline = None
        if self.device is None:
            return []
        if self.state == State.SETTLING:
            self.state = State.CHECKING
        return [self._ask(ReadHost(detail=self._error_matters()))]

    def host_read(self, result: ReadResult, now: float) -> list[Action]:
        """Given what the host answered to a read, decide."""
        if not self._answered():
            return []  # a device event came while we asked: it decides anew
        if isinstance(result, (Unreachable, Refused)):
            return self._outage_started(result, now)
        if self.device is not None:  # always: a device event makes the answer stale
            self.last_instance = self.device.instance
        actions = self._outage_ended()
        actions += self._decide(result, now)
        return actions

    def command_done(self, result: CommandResult, now: float) -> list[Action]:
        """Given OctoPrint's answer to our connect or disconnect, plan the next look."""
        if not self._answered():
            return []
        if isinstance(result, Accepted):
            self._deadline = now + CONFIRM_FIRST
            return []
        if isinstance(result, Refused) and not result.key_rejected:
            # 400: the port left OctoPrint's list since we read it (or never was valid).
            self._attempt = None
            return self._attempt_failed(f"{self.settings.host} refused: {result.reason}", now)
        # Unreachable: the connect may or may not have landed; look before acting again.
        return self._outage_started(result, now)

    # --- outputs ------------------------------------------------------------

    @property
    def deadline(self) -> float | None:
        """The monotonic time at which :meth:`tick` wants to run, or None."""
        return None if self._in_flight else self._deadline

    @property
    def settling_until(self) -> float | None:
        """The end of the settle window this core waits for, or None when not settling."""
        return self._deadline if self.state == State.SETTLING else None

    @property
    def awaiting_answer(self) -> bool:
        """Whether a request this core asked for has not been answered yet."""
        return self._in_flight

    def memory(self) -> dict[str, object]:
        """Return what must survive a restart, as JSON-ready values."""
        memory: dict[str, object] = {
            "holds": [
                {"kind": h.kind.name.lower(), "reason": h.reason, "instance": h.instance}
                for h in self.holds
            ],
            "connected_instance": self.connected_instance,
            "last_instance": self.last_instance,
        }
        if self.known_devices:  # absent when empty: a file from before it stays as it is
            memory["known_devices"] = list(self.known_devices)
        return memory

    def restore(self, memory: object) -> list[str]:
        """Given what :meth:`memory` returned before a restart, take it back.

        Return a list of problems with entries that were skipped; never raise.
        """
        problems: list[str] = []
        if not isinstance(memory, dict):
            return [f"{self.settings.name}: stored state is not an object; ignored"]
        for key in ("connected_instance", "last_instance"):
            value = memory.get(key)
            if value is None or isinstance(value, str):
                setattr(self, key, value)
            else:
                problems.append(f"{self.settings.name}: stored {key} is not a string; ignored")
        known = memory.get("known_devices", [])
        if isinstance(known, list) and all(isinstance(k, str) for k in known):
            self.known_devices = list(known)[-KNOWN_DEVICES_MAX:]
        else:
            problems.append(f"{self.settings.name}: stored known_devices are not strings; ignored")
        holds = memory.get("holds", [])
        if not isinstance(holds, list):
            return [*problems, f"{self.settings.name}: stored holds are not a list; ignored"]
        for entry in holds:
            try:
                kind = HoldKind[str(entry["kind"]).upper()]
                self.holds.append(Hold(kind, str(entry["reason"]), str(entry["instance"])))
            except (KeyError, TypeError):
                problems.append(
                    f"{self.settings.name}: stored hold {entry!r} is malformed; ignored"
                )
        return problems

    # --- the decision -------------------------------------------------------

    def _decide(self, view: HostView, now: float) -> list[Action]:
        phase = view.phase
        if phase in (Phase.OPERATIONAL, Phase.BUSY):
            return self._connected(view, now)
        if phase in (Phase.CONNECTING, Phase.OPENING):
            # A connection made during this presence: an error it ends with is new.
            self._seen_opening = True
        if phase == Phase.CONNECTING:
            self._opening_since = None
            return self._look_again(now, f"{self.settings.host} is {view.state}")
        if phase == Phase.OPENING:
            return self._opening(now, view.state)
        if phase == Phase.ERROR:
            # Closing takes milliseconds: look again soon, then decide on "Closed".
            return self._look_again(
                now, f"{self.settings.host} is closing after an error", CONFIRM_FIRST
            )
        return self._closed(view, now)

    def _connected(self, view: HostView, now: float) -> list[Action]:
        actions: list[Action] = []
        self._opening_since = None
        self._recovering = False
        was_attempt = self._attempt is not None
        # Right after the device came back, a connection we did not make is more
        # likely the host not yet noticing the old line died (OctoPrint busy or hung;
        # Klippy takes 5 s) than someone connecting the new one: look again to be sure.
        unconfirmed = (
            not was_attempt
            and self._returned_at is not None
            and now < self._returned_at + self.settings.recheck_after_return
        )
        self._note_connection(view)
        if self.holds:
            self.holds = []
            actions.append(self._log(logging.INFO, "holds released: connected by the user"))
        self._reset_attempts()
        self.state = State.OPERATIONAL if view.phase == Phase.OPERATIONAL else State.BUSY
        self._watch(now)
        if unconfirmed:
            assert self._returned_at is not None
            again = min(now + RECHECK_EVERY, self._returned_at + self.settings.recheck_after_return)
            self._deadline = again if self._deadline is None else min(self._deadline, again)
        said = f"{self.settings.host} is {view.state}"
        if was_attempt:
            actions.append(self._decided(now, "connected", said))
        elif (self.decision, self.reason) not in (("connected", said), ("leave", said)):
            # A look that finds things as they were (a polled printer's watch) is no
            # decision: the status keeps the last one and the journal stays quiet.
            actions.append(self._decided(now, "leave", said))
        return actions

    def _opening(self, now: float, state: str) -> list[Action]:
        if self._opening_since is None:
            self._opening_since = now
        stuck_for = now - self._opening_since
        stuck_after = self.settings.stuck_after
        if stuck_for < stuck_after:
            self.state = State.CONNECTING
            self._deadline = min(now + self._confirm_delay(), self._opening_since + stuck_after)
            return []
        # Rule 6: only a disconnect ends this state; a connect would be ignored.
        self._opening_since = None
        if self._attempt is not None:
            self.attempts += 1
            self._attempt = None
        self._recovering = True
        self.state = State.RECOVERING
        actions: list[Action] = [
            self._decided(
                now,
                "disconnect",
                # OctoPrint's own words: "Opening serial connection" on 1.x,
                # "Connecting" on 2.0, which also means opening there.
                f'OctoPrint stuck in "{state}" for {stuck_for:.0f} s',
                level=logging.WARNING,
            )
        ]
        if self.settings.dry_run:
            self._recovering = False
            self.state = State.DRY_RUN
            actions.append(self._log(logging.INFO, "dry run: no disconnect sent"))
            return actions
        actions.append(self._ask(Disconnect()))
        return actions

    def _error_matters(self) -> bool:
        """Return whether OctoPrint's error could change the next decision.

        Only :meth:`_closed` reads it, and not while the device's return is all that
        happened: nothing recovering, no attempt made, no connection seen or being
        made, no hold; a closed OctoPrint is then connected whatever its old error was.
        Kept in step with :meth:`_closed` by tests/test_core.py, which feeds that look
        every error.
        """
        return not (
            self._fresh
            and not self._recovering
            and self._attempt is None
            and not self.attempts
            and not self._seen_connected
            and not self._seen_opening
            and not self.holds
        )

    def _closed(self, view: HostView, now: float) -> list[Action]:
        self._opening_since = None
        assert self.device is not None
        if self._recovering:
            self._recovering = False
            if self.attempts:
                return self._schedule_retry(now, "the stuck connection was closed")
            return self._connect(view, now, "the stuck connection was closed")
        if self._attempt is not None:
            self._attempt = None
            kind = view.error_kind
            if kind == ErrorKind.FATAL:
                return self._hold(HoldKind.FATAL, view.error or "", now)
            detail = f": {view.error}" if view.error else " (no answer from the printer)"
            return self._attempt_failed(f"connect did not reach Operational{detail}", now)

        kind = view.error_kind
        if self.attempts:
            # Between our retries: the closure is what our failed attempt left.
            if kind == ErrorKind.FATAL and not self._fresh:
                return self._hold(HoldKind.FATAL, view.error or "", now)
            if self.holds:
                return self._report_held(now)
            return self._connect(view, now, f"retry {self.attempts + 1}")
        if self._seen_connected:
            # OctoPrint closed a connection we saw during this presence: the device
            # never vanished in between (an observed return resets _seen_connected).
            if kind == ErrorKind.FATAL:
                return self._hold(HoldKind.FATAL, view.error or "", now)
            if kind == ErrorKind.NONE:
                return self._hold(HoldKind.MANUAL, "disconnected in OctoPrint", now)
        elif kind == ErrorKind.FATAL and (not self._fresh or self._seen_opening):
            # At start with nothing remembered, we cannot prove this error stale; after
            # a connection someone made since the return, it is the firmware's answer.
            return self._hold(HoldKind.FATAL, view.error or "", now)

        if self.holds:
            return self._report_held(now)
        if self._fresh:
            why = "device came back"
        elif kind == ErrorKind.TRANSPORT:
            why = f"{self.settings.host} lost the printer ({view.error})"
        else:
            why = f"device present and {self.settings.host} closed"
        return self._connect(view, now, why)

    def _connect(self, view: HostView, now: float, why: str) -> list[Action]:
        assert self.device is not None
        if self.settings.only_known_devices and not self._vouched_for(view):
            return self._unknown_device(view, now)
        if view.waiting_for is not None:
            return self._wait_for_other_board(view.waiting_for, now)
        self._waits = 0
        if not view.needs_port:
            return self._restart(view, now, why)
        port = choose_port(self.device, view.ports, self.settings.port)
        if port is None:
            return self._port_unlisted(view, now)
        self._unlisted_since = None
        baudrate = self.settings.baudrate
        if baudrate is None:
            baudrate = view.baudrate_preference
        profile = self.settings.profile
        if profile is None:
            profile = view.profile_preference
        at = f" at {baudrate} baud" if baudrate else ""
        if self.settings.dry_run:
            self.state = State.DRY_RUN
            return [self._decided(now, "connect", f"{why}: would connect to {port}{at} (dry run)")]
        self._attempt = _Attempt(started=now)
        self.total_connects += 1
        self.state = State.CONNECTING
        return [
            self._decided(
                now, "connect", f"{why}: connecting to {port}{at}", quiet=self._failing is not None
            ),
            self._ask(Connect(port=port, baudrate=baudrate, profile=profile)),
        ]

    def _restart(self, view: HostView, now: float, why: str) -> list[Action]:
        """Klipper: FIRMWARE_RESTART through Moonraker (contract K1)."""
        actions: list[Action] = []
        if view.lost_print is not None:
            # K2: nothing can resume it; say what was lost before the restart forgets it.
            actions.append(
                self._log(
                    logging.WARNING,
                    f"the print {view.lost_print} was cut off when Klippy lost the board; "
                    "it cannot resume",
                )
            )
        reported = f"{view.state}: {view.error}" if view.error else view.state
        said = f"{why}: restarting the firmware ({reported})"
        if self.settings.dry_run:
            self.state = State.DRY_RUN
            return [*actions, self._decided(now, "restart", f"{said} (dry run)")]
        self._attempt = _Attempt(started=now)
        self.total_connects += 1
        self.state = State.CONNECTING
        return [
            *actions,
            self._decided(now, "restart", said, quiet=self._failing is not None),
            self._ask(Connect(port=None, baudrate=None, profile=None)),
        ]

    def _wait_for_other_board(self, missing: str, now: float) -> list[Action]:
        """Contract K4: another MCU Klipper's config names is not there yet; look again,
        less and less often (its board's return sends no event for this printer)."""
        quiet = self.state == State.WAITING and self.reason.endswith(missing)
        self.state = State.WAITING
        self._deadline = now + min(self.settings.retry_first * 2.0**self._waits, WAIT_CAP)
        self._waits += 1
        return [self._decided(now, "wait", f"not restarting: {missing}", quiet=quiet)]

    def _unknown_device(self, view: HostView, now: float) -> list[Action]:
        """Zero config, a known board that nothing says is the printer: leave it."""
        assert self.device is not None
        quiet = self.state == State.UNKNOWN_DEVICE
        self.state = State.UNKNOWN_DEVICE
        self._deadline = None
        device = self.device
        saved = view.port_preference or "none"
        return [
            self._decided(
                now,
                "leave",
                f"{device.node} ({device.usb_id}) may be a printer, but it is not OctoPrint's "
                f"saved port ({saved}) and was never seen running as one; not connecting it. "
                "If it is your printer, paste the [[printer]] stanza that `reconnectd devices` "
                "prints into the config, or connect it once in OctoPrint",
                level=logging.WARNING,
                quiet=quiet,
            )
        ]

    def _port_unlisted(self, view: HostView, now: float) -> list[Action]:
        """The device is here but OctoPrint does not list it (yet): look again.

        Within UNLISTED_GRACE the list is most likely lagging udev: look every
        second, quietly. Past it, OctoPrint really does not offer the port: say how
        to make it (the by-id glob) once, and look again less and less often.
        """
        assert self.device is not None
        hint = self.device.paths[0]
        if self._unlisted_since is None:
            self._unlisted_since = now
            self._unlisted_looks = 0
        waited = now - self._unlisted_since
        if waited < UNLISTED_GRACE:
            first = self.state != State.PORT_PENDING
            self.state = State.PORT_PENDING
            delay = UNLISTED_FIRST_LOOK if first else UNLISTED_LOOK
            self._deadline = now + min(delay, self._unlisted_since + UNLISTED_GRACE - now)
            return [
                self._decided(
                    now,
                    "wait",
                    f"OctoPrint does not list {hint} yet; looking again every second",
                    quiet=not first,
                )
            ]
        quiet = self.state == State.NO_PORT
        self.state = State.NO_PORT
        offered = ", ".join(view.ports) or "none"
        cap = self.settings.retry_cap
        self._deadline = now + min(UNLISTED_RETRY * 2.0**self._unlisted_looks, cap)
        self._unlisted_looks += 1
        return [
            self._decided(
                now,
                "wait",
                f"OctoPrint does not offer {hint} (it offers: {offered}; waited "
                f'{waited:.0f} s); add "{glob_hint(hint)}" to serial.additionalPorts in '
                "OctoPrint's settings",
                level=logging.ERROR,
                quiet=quiet,
            )
        ]

    def _attempt_failed(self, why: str, now: float) -> list[Action]:
        self.attempts += 1
        if self.settings.poll <= 0 and self.attempts >= EVENT_DRIVEN_ATTEMPTS:
            self.state = State.GAVE_UP
            self._deadline = None
            return [
                self._decided(
                    now,
                    "give up",
                    f"{why}; {self.attempts} attempts failed, waiting for the device to "
                    "vanish and come back",
                    level=logging.WARNING,
                )
            ]
        return self._schedule_retry(now, why)

    def _schedule_retry(self, now: float, why: str) -> list[Action]:
        settings = self.settings
        delay = retry_delay(self.attempts, settings.poll, settings.retry_first, settings.retry_cap)
        quiet = why == self._failing
        self._failing = why
        self.state = State.RETRY_WAIT
        self._deadline = now + delay
        return [
            self._decided(
                now,
                "retry",
                f"{why}; attempt {self.attempts} failed, next in {delay:.0f} s",
                level=logging.WARNING,
                quiet=quiet,
            )
        ]

    def _hold(self, kind: HoldKind, reason: str, now: float) -> list[Action]:
        assert self.device is not None
        self._attempt = None
        self._reset_attempts()
        if not any(h.kind == kind for h in self.holds):
            self.holds.append(Hold(kind, reason, self.device.instance))
            self._held_logged = False
        return self._report_held(now)

    def _report_held(self, now: float) -> list[Action]:
        self.state = State.HELD
        self._deadline = None
        self._watch(now)  # a polled printer notices the user's own connect this way
        if self._held_logged:
            return []
        self._held_logged = True
        reasons = "; ".join(f"{h.kind.value}: {h.reason}" for h in self.holds)
        return [
            self._decided(
                now,
                "hold",
                f"{reasons} — not reconnecting until the printer is switched off and on "
                "or connected in OctoPrint",
                level=logging.WARNING,
            )
        ]

    def _watch(self, now: float) -> None:
        """Read OctoPrint again after one poll period, for a printer that is polled.

        A port that never vanishes sends no udev event when the printer behind it is
        switched off or on: only looking tells. An event-driven printer (poll = 0)
        is left alone, and costs OctoPrint no request while nothing happens.
        """
        if self.settings.poll > 0:
            self._deadline = now + self.settings.poll

    def _look_again(self, now: float, why: str, delay: float | None = None) -> list[Action]:
        self.state = State.CONNECTING
        self._deadline = now + (self._confirm_delay() if delay is None else delay)
        return [self._log(logging.DEBUG, f"{why}; looking again")]

    def _confirm_delay(self) -> float:
        if self._attempt is None:
            return CONFIRM_CAP
        self._attempt.looks += 1
        return min(CONFIRM_FIRST * 2.0 ** (self._attempt.looks - 1), CONFIRM_CAP)

    def _note_connection(self, view: HostView) -> None:
        """Remember an established connection (Operational or busy) on this instance,
        and, when it runs on this device's port, the device as a printer's.

        Only an established one counts: a closure from "Connecting" is a failed
        attempt, never the user's Disconnect.
        """
        assert self.device is not None
        self._seen_connected = True
        self._fresh = False
        self.connected_instance = self.device.instance
        if view.port is not None and view.port in self.device.paths:
            identity = device_identity(self.device)
            if identity not in self.known_devices:
                self.known_devices = [*self.known_devices, identity][-KNOWN_DEVICES_MAX:]

    def _vouched_for(self, view: HostView) -> bool:
        """Whether OctoPrint points at this device (its saved port) or the device was
        seen running as a printer before."""
        assert self.device is not None
        if view.port_preference is not None and view.port_preference in self.device.paths:
            return True
        return device_identity(self.device) in self.known_devices

    def _outage_started(self, result: Unreachable | Refused, now: float) -> list[Action]:
        if (
            isinstance(result, Unreachable)
            and self._attempt is not None
            and now - self._attempt.started < RESTART_QUIET
        ):
            # Our own restart takes Klippy away from Moonraker for a moment: expected.
            return self._look_again(now, f"{self.settings.host} is restarting ({result.reason})")
        if isinstance(result, Refused):
            text, delay, state = (
                f"HTTP {result.status}: {result.reason}",
                REFUSED_RETRY,
                State.REJECTED,
            )
        else:
            self._outage_count += 1
            delay = min(UNREACHABLE_FIRST * 2.0 ** (self._outage_count - 1), UNREACHABLE_CAP)
            text, state = result.reason, State.UNREACHABLE
        self._deadline = now + delay
        same_kind = self._outage is not None and self._outage_kind == state
        self._outage_kind = state
        self.state = state
        if self._outage == text:
            return []  # logged once; logged again when it ends
        first = self._outage is None
        self._outage = text
        host = self.settings.host
        verb = f"cannot reach {host}" if isinstance(result, Unreachable) else f"{host} refused"
        if same_kind:
            # Still the same outage in other words (a host starting up refuses, then
            # resets, then answers): the status says the latest, the journal once.
            self.reason = f"{verb}: {text}"
            return []
        level = logging.ERROR if isinstance(result, Refused) else logging.WARNING
        suffix = "; will keep trying" if first else ""
        return [self._decided(now, "wait", f"{verb}: {text}{suffix}", level=level)]

    def _outage_ended(self) -> list[Action]:
        self._outage_count = 0
        if self._outage is None:
            return []
        self._outage = None
        return [self._log(logging.INFO, f"{self.settings.host} answers again; reconciling")]

    def _ask(self, action: Action) -> Action:
        self._in_flight = True
        self._asked_in = self._generation
        return action

    def _answered(self) -> bool:
        """Mark the request answered; return whether its answer still counts."""
        self._in_flight = False
        return self.device is not None and self._asked_in == self._generation

    def _reset_attempts(self) -> None:
        self.attempts = 0
        self._attempt = None
        self._failing = None

    def _decided(
        self,
        now: float,
        decision: str,
        reason: str,
        *,
        level: int = logging.INFO,
        quiet: bool = False,
    ) -> Log:
        """Record a decision for the status and log it; ``quiet`` logs it at debug.

        Callers pass ``quiet`` for a decision that repeats one already logged (the
        next retry of a printer left off), so the journal tells a person what
        changed, not every tick.
        """
        if not quiet:
            self.decided_at = now  # "at" says since when, not when last repeated
        self.decision = decision
        self.reason = reason
        return self._log(logging.DEBUG if quiet else level, f"{decision}: {reason}")

    def _log(self, level: int, message: str) -> Log:
        return Log(level, f"{self.settings.name}: {message}")


def retry_delay(
    failed_attempts: int,
    poll: float = 0.0,
    first: float = RETRY_FIRST,
    cap: float = RETRY_CAP,
) -> float:
    """Given the number of failed connects, return seconds until the next one.

    5 s doubling to 300 s by default (contract rule 7; the config's retry_first and
    retry_max). A polled printer backs off from its poll period instead, to the same
    cap (or to the poll period, if longer): every attempt at a silent printer costs
    OctoPrint ~40 s and a thread (#5420).
    """
    start = max(poll, first)
    return min(start * 2.0 ** max(failed_attempts - 1, 0), max(cap, poll))


def choose_port(device: Device, offered: tuple[str, ...], configured: str | None) -> str | None:
    """Given a device and the ports OctoPrint offers, return the one to connect to.

    A configured port wins when OctoPrint offers it. Otherwise the by-id link (stable
    across ttyUSB0/ttyUSB1 renames) is preferred, then the node, then any other udev
    link. Return None when OctoPrint offers none of them: it would answer 400.
    """
    if configured is not None and configured in offered:
        return configured
    for path in device.paths:
        if path in offered:
            return path
    return None


def device_identity(device: Device) -> str:
    """Given a device, return what tells it apart from other boards across replugs:
    its USB ids and serial number, or, without one, the USB port it is plugged into."""
    if device.serial:
        return f"{device.usb_id}:{device.serial}"
    return f"{device.usb_id}@{device.usb_path or device.devpath}"


def _same_instance(a: Device, b: Device) -> bool:
    """Whether two sightings are the same appearance of the same device.

    Without an instance stamp (no udev database, no USB parent) a second add for
    the same devpath cannot be told from a return, and is taken as one.
    """
    return a.devpath == b.devpath and bool(a.instance) and a.instance == b.instance


def glob_hint(path: str) -> str:
    """Given a device path OctoPrint does not offer, return the additional-ports
    pattern that makes it offer it (a by-id link: all of them)."""
    if path.startswith("/dev/serial/by-id/"):
        return "/dev/serial/by-id/*"
    return path
