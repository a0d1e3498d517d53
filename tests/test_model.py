"""A model of the rules: Hypothesis plays everything the world can do, in any order,
against the real daemon's dispatch and the real decision core, and checks the
contract's promises after every step.

The daemon (``reconnectd.daemon.Daemon``) runs as in production except for its ends:
a fake clock that only the model moves; a device source the model fills; workers
that run a request only when the model says so (and may hand its answer over later,
as a loaded machine does), one printer at a time in submission order, as the real
workers do; an OctoPrint that keeps OctoPrint's connection rules (connect ignored
while a connection exists, an unlisted port refused, "Closed" after every ending);
and a state-file writer the model can make fail. The loop's steps are called the way
``Daemon.run`` calls them.

The promises, in the contract's words (README "How it decides"), checked as invariants:

- P3  Nothing is sent while OctoPrint is connecting, operational, printing or
      paused: every connect follows a reading of OctoPrint that said "Closed".
- P4  A manual Disconnect is respected: no connect after the user disconnected a
      connection reconnectd had seen, until the device vanishes and comes back or the
      user connects again, including across restarts.
- P5  After a firmware fatal error, no connect until the device vanishes and comes back.
      One window is beyond any reader of OctoPrint's API, and the model exempts it by
      name: after a return, a fatal error that ends a connection someone else made
      before reconnectd saw it (all inside the settle window, say) reads exactly like
      the old error from before the power cycle (README, "How it decides").
- P1  A device that came back is connected ``settle`` seconds after the last event
      for it, not before;
- P2  and a burst leads to at most one connect: another one only after a failed
      attempt's backoff (rule 7), never sooner than 5 s.
- P-stored  Nothing the user decided is lost by a restart: whenever the disk takes
      writes, the state file says what the cores remember after each wake-up.
- P-live  Once the device is present, OctoPrint is up and no hold stands, the printer
      is connected within the documented bound (settle, plus the backoff already
      running, plus a confirmation).

The same model runs over both hosts (the seam of ``host.py``): OctoPrint, and Klipper's
Klippy behind Moonraker, read by the real ``moonraker_state``. For Klipper the promises
read: never a restart while Klippy is ready or starting (P3, K2); after an emergency
stop or M112 none until the board comes back (P5, K3); none while another MCU's board
is missing (K4); and a board that came back to a Klippy that lost it is restarted (K1).

``RECONNECTD_MODEL=soak`` runs many more and longer examples (docs/development.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from reconnectd.config import Config, MoonrakerConfig, OctoPrintConfig, PrinterConfig
from reconnectd.core import RETRY_FIRST, ReadHost, State
from reconnectd.core import Connect as ConnectAction
from reconnectd.daemon import Daemon
from reconnectd.devices import Device, DeviceAdded, DeviceEvent, DeviceRemoved
from reconnectd.host import (
    Accepted,
    CommandResult,
    HostClient,
    ReadResult,
    Refused,
    Unreachable,
)
from reconnectd.jsonfiles import write_json_atomic
from reconnectd.moonraker_state import view_of
from reconnectd.octoprint_state import octoprint_view
from reconnectd.workers import Completed, Job

NAME = "mk3s"
SETTLE = 0.5
BY_ID = "/dev/serial/by-id/usb-Prusa_Research_Original_Prusa_i3_MK3_CZPX1-if00"
USB_PORTS = ("1-1", "1-2")  # the cable can move between two ports
VANISHED = "SerialException: device reports readiness to read but returned no data"
THERMAL = "Thermal Runaway, system stopped! Heater_ID: bed - Printer halted. kill() called!"
CONNECTED = ("Operational", "Printing", "Paused")
# Klipper's words (klipper-facts.md), and the MCUs its config names.
LOST = "Lost communication with MCU 'mcu'"
UNABLE = "mcu 'mcu': Unable to connect"
ESTOP = "Shutdown due to webhooks request"
KLIPPY_AWAY = "Klippy is not connected to Moonraker (Klippy Host not connected)"
MCU_SERIAL = "/dev/serial/by-id/usb-Klipper_stm32f446xx_1A0031-if00"
TOOLHEAD_SERIAL = "/dev/serial/by-id/usb-Klipper_rp2040_E66138-if00"
KLIPPY_NOTICES = 5.5  # seconds from losing the MCU to "Lost communication", at most

settings.register_profile(
    "ci",
    max_examples=int(os.environ.get("RECONNECTD_MODEL_EXAMPLES", "120")),
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
settings.register_profile(
    "soak",
    max_examples=5000,
    stateful_step_count=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
PROFILE = "soak" if os.environ.get("RECONNECTD_MODEL") == "soak" else "ci"


@dataclass(frozen=True)
class Snapshot:
    """What the world was when a read ran: what the daemon then decided on."""

    state: str
    up: bool
    closed: bool  # the host said it holds nothing: the only state to act in
    visible: bool  # the reading showed the daemon a connection (or one being made)
    boards_there: bool  # every MCU Klipper's config names is there (always, for OctoPrint)
    fatal_hold: bool
    fatal_unseeable: bool
    manual_hold: bool


@dataclass
class World:
    """The printer, its USB device, and its OctoPrint, as they really are."""

    device: Device | None = None
    instances: int = 0
    state: str = "Closed"
    error: str | None = None
    up: bool = True  # OctoPrint answers
    listed: bool = True  # OctoPrint's port list has caught up with udev
    firmware_ok: bool = True  # a connect reaches Operational (else it ends Closed, no error)
    fatal_hold: bool = False  # a firmware fatal error, not yet cleared by a power cycle
    # ...that ended a connection made after a return before the daemon saw any (P5's limit)
    fatal_unseeable: bool = False
    unseen_since_return: bool = False  # no reading showed a connection since the return
    manual_hold: bool = False  # a Disconnect of a connection the daemon had seen
    daemon_saw_connection: bool = False  # ...on this device instance
    connects: int = 0  # connects that reached OctoPrint

    def new_device(self, usb_port: str) -> Device:
        self.instances += 1
        n = self.instances
        return Device(
            devpath=f"/devices/pci0000:00/usb1/{usb_port}/{usb_port}:1.0/tty/ttyACM{n}",
            node=f"/dev/ttyACM{n}",
            links=(BY_ID,),
            vendor_id="2c99",
            product_id="0002",
            serial="CZPX1",
            usb_path=f"pci-0000:00:14.0-usb-0:{usb_port[2:]}:1.0",
            instance=str(1000 + n),
        )

    def ports(self) -> tuple[str, ...]:
        if self.device is None or not self.listed:
            return ("/dev/ttyS0",)
        return ("/dev/ttyS0", self.device.node, BY_ID)

    def lose_connection(self) -> None:
        """The device vanished: OctoPrint drops whatever connection it had."""
        if self.state != "Closed":
            self.state, self.error = "Closed", VANISHED
        self.forget_holds()

    def forget_holds(self) -> None:
        self.fatal_hold = self.manual_hold = self.daemon_saw_connection = False
        self.fatal_unseeable = False

    def closed(self) -> bool:
        return self.state == "Closed"

    def connected(self) -> bool:
        return self.state in CONNECTED

    def progressing(self) -> bool:
        return self.state == "Connecting"

    def progress(self) -> None:
        """The host gets where it was going by itself."""
        if self.device is not None and self.firmware_ok:
            self.state = "Operational"
        else:
            self.state, self.error = "Closed", None  # a silent printer: no error

    def can_user_connect(self) -> bool:
        return self.closed() and self.device is not None

    def user_connects(self) -> None:
        self.state, self.error = "Operational", None

    def can_user_disconnect(self) -> bool:
        return self.connected()

    def can_start_print(self) -> bool:
        return self.state == "Operational"

    def start_print(self) -> None:
        self.state = "Printing"

    def printing(self) -> bool:
        return self.state in ("Printing", "Paused")

    def pause_or_end_print(self, paused: bool) -> None:
        self.state = "Paused" if paused and self.state == "Printing" else "Operational"

    def can_stop(self) -> bool:
        return self.connected()

    def stop(self) -> None:
        """The firmware stops itself (or a person stops it): a verdict, not a lost line."""
        self.state, self.error = "Closed", THERMAL

    def shows_verdict(self) -> bool:
        return self.error == THERMAL

    def snapshot(self) -> Snapshot:
        return Snapshot(
            state=self.state,
            up=self.up,
            closed=self.closed(),
            visible=self.up and not self.closed(),
            boards_there=True,
            fatal_hold=self.fatal_hold,
            fatal_unseeable=self.fatal_unseeable,
            manual_hold=self.manual_hold,
        )

    def client(self, model: DaemonModel) -> HostClient:
        return ModelOctoPrint(model)

    def printer(self, settle: float, changed: bool) -> PrinterConfig:
        octoprint = OctoPrintConfig(url="http://127.0.0.1:5000", api_key="KEY")
        return PrinterConfig(
            name=NAME,
            octoprint=octoprint,
            vendor_id="2c99",
            product_id="0002",
            serial="CZPX1",
            settle=settle,
            baudrate=250000 if changed else None,
        )


@dataclass
class KlippyWorld(World):
    """A Klipper printer: its MCU's USB device, Klippy, and Moonraker in front of it.

    ``state`` is Klippy's, plus two the API never shows as such: "restarting" (Klippy
    away from Moonraker, 503) and "ready-lost" (the MCU went, Klippy has not noticed
    yet and still says ready, as it does for 4.5 to 5.5 s).
    """

    state: str = "error"
    error: str | None = UNABLE
    toolhead: bool = True  # the second MCU's board is there
    print_on: bool = False
    clock: Clock | None = None  # the model's: Klippy notices a lost MCU in time
    lost_at: float | None = None

    def notice(self) -> None:
        """Klippy notices the lost MCU 4.5 to 5.5 s after it went, whoever looks."""
        lost_at, clock = self.lost_at, self.clock
        lost = self.state == "ready-lost" and clock is not None and lost_at is not None
        if (
            lost
            and clock is not None
            and lost_at is not None
            and clock.now - lost_at >= KLIPPY_NOTICES
        ):
            self.progress()

    def new_device(self, usb_port: str) -> Device:
        device = super().new_device(usb_port)
        return replace(device, vendor_id="1d50", product_id="614e", serial="1A0031")

    def reported(self) -> str:
        return "ready" if self.state == "ready-lost" else self.state

    def lose_connection(self) -> None:
        if self.state == "ready":
            self.state = "ready-lost"
            self.lost_at = self.clock.now if self.clock is not None else None
        self.forget_holds()

    def closed(self) -> bool:
        return self.reported() in ("shutdown", "error")

    def connected(self) -> bool:
        return self.state == "ready"

    def progressing(self) -> bool:
        return self.state in ("restarting", "ready-lost", "startup")

    def progress(self) -> None:
        if self.state == "ready-lost":
            self.state, self.error = "shutdown", LOST
        elif self.device is not None and self.toolhead:
            self.state, self.error, self.print_on = "ready", None, False
        else:
            self.state, self.error, self.print_on = "error", UNABLE, False

    def can_user_connect(self) -> bool:
        return self.closed()

    def user_connects(self) -> None:
        self.state = "restarting"  # the user's own FIRMWARE_RESTART

    def can_user_disconnect(self) -> bool:
        return False  # nothing in Klipper reads like OctoPrint's Disconnect

    def can_start_print(self) -> bool:
        return self.state == "ready" and not self.print_on

    def start_print(self) -> None:
        self.print_on = True

    def printing(self) -> bool:
        return self.state == "ready" and self.print_on

    def pause_or_end_print(self, paused: bool) -> None:
        self.print_on = paused  # paused still holds the print

    def can_stop(self) -> bool:
        return self.state == "ready"

    def stop(self) -> None:
        self.state, self.error = "shutdown", ESTOP  # an emergency stop; M112 reads alike

    def shows_verdict(self) -> bool:
        return self.error == ESTOP

    def snapshot(self) -> Snapshot:
        snap = super().snapshot()
        return replace(
            snap,
            state=self.reported(),
            visible=self.up and not self.closed() and self.state != "restarting",
            boards_there=self.device is not None and self.toolhead,
        )

    def client(self, model: DaemonModel) -> HostClient:
        return ModelKlippy(model)

    def printer(self, settle: float, changed: bool) -> PrinterConfig:
        moonraker = MoonrakerConfig(url="http://127.0.0.1:7125", timeout=6.0 if changed else 5.0)
        return PrinterConfig(
            name=NAME,
            octoprint=OctoPrintConfig(),
            vendor_id="1d50",
            product_id="614e",
            serial="1A0031",
            settle=settle,
            moonraker=moonraker,
        )


class ModelOctoPrint:
    """OctoPrint's connection API over the world, with OctoPrint's rules."""

    def __init__(self, model: DaemonModel) -> None:
        self.model = model

    def read(self, *, detail: bool = True) -> ReadResult:
        world = self.model.world
        self.model.read_snapshot = world.snapshot()
        if not world.up:
            return Unreachable("connection refused")
        return octoprint_view(
            state=world.state,
            error=world.error if detail else None,
            ports=world.ports(),
            baudrate_preference=115200,
        )

    def connect(self, port: str, baudrate: int | None, profile: str | None) -> CommandResult:
        world = self.model.world
        if not world.up:
            return Unreachable("connection refused")
        if port not in world.ports():
            return Refused(400, "port is invalid")
        if world.state == "Closed":  # ignored while any connection exists
            world.state, world.error = "Connecting", None
            world.connects += 1
        return Accepted()

    url = "http://127.0.0.1:5000"

    def act(self, port: str | None, baudrate: int | None, profile: str | None) -> CommandResult:
        assert port is not None, "OctoPrint is always given a port"
        return self.connect(port, baudrate, profile)

    def recover(self) -> CommandResult:
        return self.disconnect()

    def disconnect(self) -> CommandResult:
        world = self.model.world
        if not world.up:
            return Unreachable("connection refused")
        world.state, world.error = "Closed", None
        return Accepted()

    def reconnect_plugins(self) -> list[tuple[str, str]]:
        return []

    def close(self) -> None:
        pass


class ModelKlippy:
    """Moonraker's API over the world, answering as Moonraker and Klippy do; read by the
    real moonraker_state, as the real client reads it."""

    url = "http://127.0.0.1:7125"

    def __init__(self, model: DaemonModel) -> None:
        self.model = model

    def read(self, *, detail: bool = True) -> ReadResult:
        world = self.model.world
        assert isinstance(world, KlippyWorld)
        world.notice()
        self.model.read_snapshot = world.snapshot()
        if not world.up:
            return Unreachable("connection refused")
        if world.state == "restarting":
            return Unreachable(KLIPPY_AWAY)
        info = {"state": world.reported(), "state_message": world.error or "Printer is ready"}
        printing = "paused" if world.print_on and world.closed() else "printing"
        objects = {
            "print_stats": {"state": printing if world.print_on else "standby"},
            "configfile": {
                "settings": {
                    "mcu": {"serial": MCU_SERIAL},
                    "mcu toolhead": {"serial": TOOLHEAD_SERIAL},
                }
            },
        }

        def exists(path: str) -> bool:
            return (path == MCU_SERIAL and world.device is not None) or (
                path == TOOLHEAD_SERIAL and world.toolhead
            )

        return view_of(info, objects, exists)

    def act(self, port: str | None, baudrate: int | None, profile: str | None) -> CommandResult:
        world = self.model.world
        if not world.up:
            return Unreachable("connection refused")
        if world.state == "restarting":
            return Unreachable(KLIPPY_AWAY)
        world.state, world.error = "restarting", None
        world.connects += 1
        return Accepted()

    def recover(self) -> CommandResult:
        raise AssertionError("nothing in Klippy is recovered by a disconnect")

    def close(self) -> None:
        pass


@dataclass
class Pending:
    key: str
    owner: object
    request: object
    job: Job


class ModelWorkers:
    """Requests run when the model says, one printer's in submission order."""

    def __init__(self, model: DaemonModel) -> None:
        self.model = model
        self.queues: dict[str, deque[Pending]] = {}
        self.ready: list[tuple[Completed[object], Snapshot | None]] = []  # ran, not collected
        self.handing_over: list[Completed[object]] = []
        self._wake, self._wake_writer = socket.socketpair()

    def fileno(self) -> int:
        return self._wake.fileno()

    def submit(self, key: str, owner: object, request: object, job: Job) -> None:
        self.model.submitted(key, request)
        self.queues.setdefault(key, deque()).append(Pending(key, owner, request, job))

    def collect(self) -> list[Completed[object]]:
        handed, self.handing_over = self.handing_over, []
        return handed

    def retire(self, key: str) -> None:
        pass  # the queue still runs what was submitted, as the real worker does

    def close(self) -> None:
        self._wake.close()
        self._wake_writer.close()

    def pending(self) -> list[str]:
        return [key for key, queue in self.queues.items() if queue]

    def run_next(self, key: str) -> None:
        """Run the oldest request of ``key`` now; its answer waits to be collected."""
        task = self.queues[key].popleft()
        self.model.read_snapshot = None
        result = task.job()
        snap = self.model.read_snapshot if isinstance(task.request, ReadHost) else None
        self.ready.append((Completed(task.key, task.owner, task.request, result), snap))


class ModelSource:
    """Device events, as udev would deliver them, queued by the model."""

    def __init__(self, present: list[Device]) -> None:
        self.present = present
        self.events: list[DeviceEvent] = []
        self._fd, self._other = socket.socketpair()

    def start(self) -> list[Device]:
        return list(self.present)

    def fileno(self) -> int:
        return self._fd.fileno()

    def drain(self) -> list[DeviceEvent]:
        events, self.events = self.events, []
        return events

    def close(self) -> None:
        self._fd.close()
        self._other.close()


class QuietNotifier:
    def ready(self, status: str) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    def reloading(self) -> None:
        pass

    def stopping(self) -> None:
        pass

    def watchdog_ping(self) -> None:
        pass

    @property
    def watchdog_interval(self) -> float | None:
        return None


@dataclass
class Clock:
    now: float = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Books:
    """What one daemon process did, for the invariants (a restart starts new books)."""

    last_event_at: float | None = None  # the last device event it heard for the printer
    last_connect_at: float | None = None  # its last connect, in this burst
    owed: bool = False  # the contract owes the user a connect (P-live)


class DaemonModel(RuleBasedStateMachine):
    """Everything the world can do, in any order; the promises after every step."""

    world_kind: type[World] = World

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="reconnectd-model-"))
        self.clock = Clock()
        self.world = self.world_kind()
        if isinstance(self.world, KlippyWorld):
            self.world.clock = self.clock
        self.disk_fails = False
        self.changed = False  # the config as a reload with a change leaves it
        self.read_snapshot: Snapshot | None = None
        self.delivering: Snapshot | None = None
        self.books = Books()
        self.woke_with_disk = False
        self.daemon: Daemon | None = None
        self.workers: ModelWorkers | None = None
        self.source: ModelSource | None = None

    # --- the daemon's ends ------------------------------------------------------

    def config(self) -> Config:
        printer = self.world.printer(SETTLE, self.changed)
        return Config(
            source=self.tmp / "reconnectd.toml", octoprint=printer.octoprint, printers=(printer,)
        )

    def write_state(self, path: Path, document: object, mode: int = 0o644) -> None:
        if self.disk_fails:
            raise OSError(28, "No space left on device")
        write_json_atomic(path, document, mode)

    def start_daemon(self) -> None:
        present = [self.world.device] if self.world.device is not None else []
        self.source = ModelSource(present)
        self.workers = ModelWorkers(self)
        env = {
            "RUNTIME_DIRECTORY": str(self.tmp / "run"),
            "STATE_DIRECTORY": str(self.tmp / "state"),
        }
        self.daemon = Daemon(
            self.config(),
            source=self.source,
            api_factory=lambda _: self.world.client(self),
            notifier=QuietNotifier(),
            reload_config=self.config,
            environ=env,
            clock=self.clock,
            wall_clock=lambda: 1_800_000_000.0 + self.clock.now,
            sys_root=str(self.tmp / "sys"),
            workers=self.workers,
            write_state=self.write_state,
        )
        self.books = Books(owed=bool(present) and not self.world.shows_verdict())
        assert self.daemon.start() is None
        self.woke()

    def woke(self) -> None:
        self.woke_with_disk = not self.disk_fails

    def step(self) -> None:
        """One pass of the loop after its selector returned."""
        assert self.daemon is not None
        self.daemon.after_select()
        self.woke()

    def hear(self, *events: DeviceEvent) -> None:
        assert self.source is not None and self.daemon is not None
        self.source.events.extend(events)
        self.books.last_event_at = self.clock.now
        self.books.last_connect_at = None
        self.daemon.on_udev()
        self.step()

    def submitted(self, key: str, request: object) -> None:
        """Called as the daemon submits a request: the promises about sending."""
        if not isinstance(request, ConnectAction):
            return
        now = self.clock.now
        snap = self.delivering
        assert snap is not None, "a connect that no reading of the host led to"
        assert snap.closed, f"P3: connect while the host said {snap.state!r}"
        assert snap.boards_there, "K4: restart while a board Klipper needs is missing"
        assert not snap.fatal_hold or snap.fatal_unseeable, "P5: connect after a firmware stop"
        assert not snap.manual_hold, "P4: connect after the user's Disconnect"
        if self.books.last_event_at is not None:
            quiet = now - self.books.last_event_at
            assert quiet >= SETTLE - 1e-9, f"P1: connect {quiet:.3f} s after the last event"
        if self.books.last_connect_at is not None:
            gap = now - self.books.last_connect_at
            assert gap >= RETRY_FIRST - 1e-9, f"P2: a second connect {gap:.3f} s after one"
        self.books.last_connect_at = now

    def deliver(self) -> None:
        """Hand every answer that ran to the loop, one wake-up each, oldest first."""
        assert self.workers is not None and self.daemon is not None
        while self.workers.ready:
            completed, snap = self.workers.ready.pop(0)
            if snap is not None and snap.visible:
                self.world.unseen_since_return = False
            self.workers.handing_over = [completed]
            self.delivering = snap
            try:
                self.daemon.on_results()
                self.step()
            finally:
                self.delivering = None
            self.observe()

    def observe(self) -> None:
        """Keep the model's view of what the daemon knows and owes in step."""
        assert self.daemon is not None
        core = self.daemon.printer_cores[NAME]
        world = self.world
        if world.connected() and core.state in (State.OPERATIONAL, State.BUSY):
            world.daemon_saw_connection = True
        if world.connected() or world.fatal_hold or world.manual_hold:
            self.books.owed = False
        if core.state == State.GAVE_UP:
            self.books.owed = False  # rule 7's documented end for a printer that never answers

    # --- rules: the device ----------------------------------------------------

    @initialize()
    def boot(self) -> None:
        self.start_daemon()

    @precondition(lambda self: self.world.device is None)
    @rule(usb_port=st.sampled_from(USB_PORTS), announced_twice=st.booleans())
    def switch_on(self, usb_port: str, announced_twice: bool) -> None:
        self.world.device = device = self.world.new_device(usb_port)
        self.world.unseen_since_return = True
        self.books.owed = True
        events: list[DeviceEvent] = [DeviceAdded(device)]
        if announced_twice:
            events.append(DeviceAdded(device))  # a "change" for the same node
        self.hear(*events)
        self.observe()

    @precondition(lambda self: self.world.device is not None)
    @rule()
    def switch_off(self) -> None:
        assert self.world.device is not None
        gone = self.world.device
        self.world.device = None
        self.world.lose_connection()
        self.books.owed = False
        self.hear(DeviceRemoved(gone.devpath))

    @precondition(lambda self: self.world.device is not None)
    @rule()
    def move_the_cable(self) -> None:
        """The cable moves to the other USB port; the old node's remove comes late."""
        old = self.world.device
        assert old is not None
        other = USB_PORTS[1] if f"/{USB_PORTS[0]}/" in old.devpath else USB_PORTS[0]
        self.world.lose_connection()
        self.world.device = self.world.new_device(other)
        self.world.unseen_since_return = True
        self.books.owed = True
        self.hear(DeviceAdded(self.world.device), DeviceRemoved(old.devpath))

    @precondition(lambda self: self.world.device is not None)
    @rule()
    def udev_announces_it_again(self) -> None:
        assert self.world.device is not None
        self.hear(DeviceAdded(self.world.device))

    # --- rules: time and answers -----------------------------------------------

    @rule(seconds=st.sampled_from([0.1, 0.3, 0.5, 1.0, 5.0, 30.0]))
    def time_passes(self, seconds: float) -> None:
        """Time goes by; the loop wakes at each deadline on the way, as select() does.
        Requests it submits wait for the rules below to run them."""
        assert self.daemon is not None
        end = self.clock.now + seconds
        for _ in range(200):
            deadline = self.daemon.next_deadline()
            if deadline is None or deadline > end:
                break
            self.clock.now = max(self.clock.now, deadline)
            self.step()
        self.clock.now = end

    @precondition(lambda self: self.workers is not None and self.workers.pending())
    @rule(late=st.booleans())
    def octoprint_answers(self, late: bool) -> None:
        """The oldest request runs against OctoPrint now; its answer reaches the loop
        now, or later (``late``: the world may change before the loop reads it)."""
        assert self.workers is not None
        self.workers.run_next(self.workers.pending()[0])
        if not late:
            self.deliver()

    @precondition(lambda self: self.workers is not None and self.workers.ready)
    @rule()
    def late_answers_arrive(self) -> None:
        self.deliver()

    # --- rules: OctoPrint and the user ------------------------------------------

    @precondition(lambda self: self.world.progressing())
    @rule()
    def the_host_gets_there(self) -> None:
        """OctoPrint finishes connecting (Operational, or Closed for a silent printer);
        Klippy comes back from a restart, or notices the MCU it lost."""
        self.world.progress()
        self.observe()

    @precondition(lambda self: self.world.can_user_connect())
    @rule()
    def user_connects(self) -> None:
        """The user clicks Connect (OctoPrint) or sends FIRMWARE_RESTART (Klipper)."""
        self.world.user_connects()
        self.world.fatal_hold = self.world.manual_hold = self.world.fatal_unseeable = False
        self.observe()

    @precondition(lambda self: self.world.can_user_disconnect())
    @rule()
    def user_disconnects(self) -> None:
        world = self.world
        world.state, world.error = "Closed", None
        # Binding once reconnectd has seen the connection: OctoPrint says "Closed" for
        # a Disconnect and for a connect that found no printer alike.
        world.manual_hold = world.daemon_saw_connection
        self.observe()

    @precondition(lambda self: self.world.can_start_print())
    @rule()
    def a_print_starts(self) -> None:
        self.world.start_print()

    @precondition(lambda self: self.world.printing())
    @rule(paused=st.booleans())
    def a_print_pauses_or_ends(self, paused: bool) -> None:
        self.world.pause_or_end_print(paused)

    @precondition(lambda self: self.world.can_stop())
    @rule()
    def firmware_stops_itself(self) -> None:
        """A firmware safety stop (OctoPrint), an emergency stop or M112 (Klipper)."""
        self.world.stop()
        self.world.fatal_hold = True
        self.world.fatal_unseeable = self.world.unseen_since_return
        self.observe()

    @rule(up=st.booleans(), listed=st.booleans(), firmware_ok=st.booleans())
    def octoprint_changes(self, up: bool, listed: bool, firmware_ok: bool) -> None:
        """OctoPrint goes down or comes back; its port list lags or catches up; the
        printer's firmware answers or stays silent."""
        self.world.up, self.world.listed, self.world.firmware_ok = up, listed, firmware_ok

    # --- rules: the daemon's life ------------------------------------------------

    @rule(changed=st.booleans())
    def systemctl_reload(self, changed: bool) -> None:
        assert self.daemon is not None
        if changed:
            self.changed = not self.changed
        self.daemon.request_reload()
        self.step()

    @rule(fails=st.booleans())
    def the_disk(self, fails: bool) -> None:
        self.disk_fails = fails

    @rule()
    def restart(self) -> None:
        """The daemon dies (kill -9, a crash, an upgrade) and systemd starts it again.
        Requests not yet sent die with it; what it knew survives only on disk."""
        assert self.daemon is not None
        self.daemon.close()
        # The new process knows what the state file says, no more: whether it saw the
        # printer connected on this device (then a "Closed" without error is the
        # user's Disconnect), and the holds. Not the daemon's fault when the disk
        # refused every write since it learned more.
        state = self.tmp / "state" / "state.json"
        stored = json.loads(state.read_text())["printers"].get(NAME, {}) if state.exists() else {}
        device = self.world.device
        knows = device is not None and stored.get("connected_instance") == device.instance
        held = any(h["kind"] == "manual" for h in stored.get("holds", []))
        self.world.daemon_saw_connection = knows
        self.world.manual_hold = self.world.manual_hold and (knows or held)
        # What the new process takes for a return is its own to judge: exempt as after one.
        self.world.unseen_since_return = True
        self.start_daemon()

    # --- the promises that hold after every step --------------------------------

    @invariant()
    def what_the_cores_remember_is_on_disk(self) -> None:
        if self.daemon is None or not self.woke_with_disk:
            return
        state = self.tmp / "state" / "state.json"
        remembered = {n: c.memory() for n, c in self.daemon.printer_cores.items()}
        on_disk = json.loads(state.read_text())["printers"] if state.exists() else None
        assert on_disk == remembered, "P-stored: a wake-up with a working disk left it behind"

    @precondition(lambda self: self.books.owed and self.world.device is not None)
    @rule()
    def the_world_settles(self) -> None:
        """P-live: OctoPrint up, port listed, firmware answering, everything answered
        promptly: the printer is connected within settle + the backoff already running
        + a confirmation."""
        assert self.daemon is not None and self.workers is not None
        world = self.world
        world.up = world.listed = world.firmware_ok = True
        if isinstance(world, KlippyWorld):
            world.toolhead = True
        self.deliver()
        core = self.daemon.printer_cores[NAME]
        running = 0.0 if core.deadline is None else max(0.0, core.deadline - self.clock.now)
        horizon = self.clock.now + max(running, SETTLE) + 3.0
        for _ in range(500):
            while self.workers.pending():
                self.workers.run_next(self.workers.pending()[0])
                self.deliver()
            while world.progressing():
                self.the_host_gets_there()
            if world.connected() or not self.books.owed:
                break
            deadline = self.daemon.next_deadline()
            if deadline is None or deadline > horizon:
                break
            self.clock.now = max(self.clock.now, deadline)
            self.step()
        self.observe()
        if self.books.owed:
            raise AssertionError(
                f"P-live: not connected by {horizon - self.clock.now:+.1f} s of the bound; "
                f"the daemon says {core.state.value}: {core.reason}"
            )

    def teardown(self) -> None:
        if self.daemon is not None:
            self.daemon.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(autouse=True)
def quiet_logs() -> Iterator[None]:
    # Thousands of steps each log a decision; the invariants are what is checked here.
    logger = logging.getLogger("reconnectd")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    yield
    logger.setLevel(level)


class KlipperModel(DaemonModel):
    """The same rules and promises over Klipper's host."""

    world_kind = KlippyWorld

    @rule(present=st.booleans())
    def the_toolhead_board(self, present: bool) -> None:
        """A second MCU's board (a toolhead board) switched on or off on its own: it is
        not the printer's device, and sends the printer no event."""
        world = self.world
        assert isinstance(world, KlippyWorld)
        world.toolhead = present


@pytest.mark.parametrize("model", [DaemonModel, KlipperModel], ids=["octoprint", "klipper"])
def test_the_model_of_the_rules(model: type[DaemonModel]) -> None:
    model.TestCase.settings = settings.get_profile(PROFILE)
    model.TestCase().runTest()


@pytest.mark.parametrize("model", [DaemonModel, KlipperModel], ids=["octoprint", "klipper"])
def test_the_model_is_not_vacuous_a_power_cycle_brings_the_printer_back(
    model: type[DaemonModel],
) -> None:
    # The machinery itself, on the one path every promise rests on: were the world or
    # the workers broken, the state machine could pass without ever connecting.
    machine = model()
    try:
        machine.boot()
        machine.switch_on("1-1", announced_twice=False)
        machine.the_world_settles()
        assert machine.world.connected()
        assert machine.world.connects == 1
        machine.switch_off()
        machine.switch_on("1-2", announced_twice=True)
        machine.the_world_settles()
        assert machine.world.connected() and machine.world.connects == 2
    finally:
        machine.teardown()
