"""End to end with several printers: one reconnectd, three OctoPrints, three printers.

One umockdev testbed holds three Prusa MK3 boards on USB ports 1-1, 1-2 and 1-3;
three real OctoPrint 1.11.8 servers run under it (each sees every by-id link) and
one reconnectd process serves the three, each printer with its own
``[printer.octoprint]``. One OctoPrint goes down (stopped: refused, or SIGSTOP'ed:
hanging); the other two printers must still come back within the settle window
plus a few seconds, each on its own OctoPrint, and the third once its OctoPrint
is back.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon_process import DaemonProcess
from tests.support.fake_marlin import FakeMarlin
from tests.support.octoprint_instance import OctoPrintInstance
from tests.support.printers import SimulatedPrinters
from tests.support.real import require_umockdev_and_octoprint
from tests.support.testbed import Plugged, Testbed

pytestmark = [pytest.mark.umockdev, pytest.mark.octoprint]

SETTLE = 0.5
# From the replug to OctoPrint Operational on the by-id link: the settle window, a
# read, a connect and OctoPrint's handshake with the fake firmware (~1 s), plus slack
# for a loaded machine. A dead OctoPrint elsewhere must not add to it.
BOUND = 10.0
NAMES = ("mk3-a", "mk3-b", "mk3-c")
USB_PORTS = ("1-1", "1-2", "1-3")
DOWN = 2  # the index of the printer whose OctoPrint goes down
_serials = itertools.count(1)


@dataclass
class Slot:
    """One printer of the rig: its name, USB port, OctoPrint and current device."""

    name: str
    usb_port: str
    octoprint: OctoPrintInstance
    serial: str = ""
    plugged: Plugged | None = None
    marlin: FakeMarlin | None = None

    @property
    def by_id(self) -> str:
        assert self.plugged is not None and self.plugged.by_id is not None
        return self.plugged.by_id

    def current(self) -> dict[str, object]:
        current = self.octoprint.connection()["current"]
        assert isinstance(current, dict)
        return current


@dataclass
class Rig:
    """The module's testbed and three OctoPrints, plus helpers to play the printers."""

    testbed: Testbed
    slots: list[Slot]
    workdir: Path
    printers: SimulatedPrinters

    def plug(self, slot: Slot) -> None:
        """Switch the slot's printer on: its USB device appears and its firmware answers."""
        slot.plugged, slot.marlin = self.printers.switch_on(slot.serial, usb_port=slot.usb_port)

    def unplug(self, slot: Slot) -> None:
        """Switch the slot's printer off: the firmware goes, the USB device vanishes."""
        assert slot.plugged is not None
        self.printers.switch_off(slot.plugged)
        slot.plugged = slot.marlin = None

    def clear(self) -> None:
        """Unplug whatever a test left plugged."""
        self.printers.clear()
        for slot in self.slots:
            slot.plugged = slot.marlin = None

    def config(self, *, down_timeout: float | None = None) -> str:
        """The config: shared defaults, then one [[printer]] per slot with its own OctoPrint."""
        text = "[octoprint]\ntimeout = 5\n"
        for index, slot in enumerate(self.slots):
            text += (
                "\n[[printer]]\n"
                f'name = "{slot.name}"\n'
                'vendor_id = "2c99"\n'
                'product_id = "0002"\n'
                f'serial = "{slot.serial}"\n'
                f"settle = {SETTLE}\n"
                "[printer.octoprint]\n"
                f'url = "{slot.octoprint.url}"\n'
                f'api_key = "{slot.octoprint.api_key}"\n'
            )
            if index == DOWN and down_timeout is not None:
                text += f"timeout = {down_timeout:g}\n"
        return text

    def daemon(self, name: str, **kw: float) -> DaemonProcess:
        return DaemonProcess(self.workdir / name, self.config(**kw), env=self.testbed.env)


def _start_all(instances: list[OctoPrintInstance]) -> None:
    """Start the OctoPrints side by side (each takes seconds); raise the first failure."""
    errors: list[BaseException] = []

    def start(instance: OctoPrintInstance) -> None:
        try:
            instance.start()
        except BaseException as exc:  # re-raised in the test thread below
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(i,)) for i in instances]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    require_umockdev_and_octoprint()
    workdir = tmp_path_factory.mktemp("many")
    with Testbed(workdir / "testbed") as testbed, contextlib.ExitStack() as stack:
        instances = [
            OctoPrintInstance(
                workdir / f"octoprint-{name}",
                env=testbed.env,
                additional_ports=["/dev/serial/by-id/*"],
            )
            for name in NAMES
        ]
        for instance in instances:
            stack.callback(instance.__exit__)
        _start_all(instances)
        slots = [Slot(n, p, o) for n, p, o in zip(NAMES, USB_PORTS, instances)]
        yield Rig(testbed, slots, workdir, SimulatedPrinters(testbed))


@pytest.fixture
def rig(module_rig: Rig) -> Iterator[Rig]:
    for slot in module_rig.slots:
        slot.serial = f"CZPX{os.getpid()}M{next(_serials):03d}"
    yield module_rig
    # Leave every OctoPrint running and Closed, and the bench empty, for the next test.
    try:
        stopped = [s.octoprint for s in module_rig.slots if not s.octoprint.running]
        _start_all(stopped)
        for slot in module_rig.slots:
            slot.octoprint.reset()
    finally:
        module_rig.clear()


def wait_connected(slot: Slot, timeout: float) -> float:
    """Wait until the slot's OctoPrint is Operational on its by-id link; return when."""
    wanted = slot.by_id
    deadline = time.monotonic() + timeout
    while True:
        current = slot.current()
        now = time.monotonic()
        if current["state"] == "Operational" and current["port"] == wanted:
            return now
        if now >= deadline:
            raise AssertionError(
                f"{slot.name}: not Operational on {wanted} within {timeout:g} s; "
                f"last {current['state']!r} on {current['port']!r}\n"
                f"--- octoprint.log (tail) ---\n{slot.octoprint.log_tail(30)}"
            )
        time.sleep(0.05)


def wait_all_connected(slots: list[Slot], timeout: float) -> dict[str, float]:
    """Poll the slots' OctoPrints side by side; return when each was first seen connected."""
    seen: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    while len(seen) < len(slots):
        for slot in slots:
            if slot.name not in seen:
                current = slot.current()
                if current["state"] == "Operational" and current["port"] == slot.by_id:
                    seen[slot.name] = time.monotonic()
        if time.monotonic() >= deadline:
            for slot in slots:
                if slot.name not in seen:
                    wait_connected(slot, 0)  # raises with the details
        time.sleep(0.05)
    return seen


def connect_all(rig: Rig, daemon: DaemonProcess) -> None:
    """Switch the three printers on and wait until reconnectd connected each once."""
    for slot in rig.slots:
        rig.plug(slot)
    for slot in rig.slots:
        wait_connected(slot, 30)
        row = daemon.wait_for_printer(
            slot.name, lambda r: r["state"] == "operational", "operational"
        )
        assert row["connects"] == 1


def power_cycle_all(rig: Rig, up: list[Slot]) -> dict[str, float]:
    """Switch the three printers off, then on again; return each one's replug time.

    The replugs wait until the running OctoPrints saw their port vanish, so that an
    Operational seen afterwards is the new connection, not the old one lingering. The
    printer whose OctoPrint is down comes back first: its request is the first in line.
    """
    for slot in rig.slots:
        rig.unplug(slot)
    for slot in up:
        slot.octoprint.wait_for_state(lambda s: s != "Operational", 15)
    replugged: dict[str, float] = {}
    for slot in sorted(rig.slots, key=lambda s: s in up):
        rig.plug(slot)
        replugged[slot.name] = time.monotonic()
    return replugged


def assert_no_cross_talk(rig: Rig) -> None:
    """Each OctoPrint talks to its own printer only: its port, and no other link in its log."""
    for slot in rig.slots:
        assert slot.current()["port"] == slot.by_id
        text = slot.octoprint.serial_log.read_text(errors="replace")
        assert slot.serial in text, f"{slot.name}: its own link is not in its serial.log"
        for other in rig.slots:
            if other is not slot:
                assert other.serial not in text, f"{slot.name}'s OctoPrint opened {other.name}"


def check_the_two_up(
    rig: Rig, daemon: DaemonProcess, up: list[Slot], replugged: dict[str, float]
) -> dict[str, float]:
    """Assert the printers with a running OctoPrint are back within BOUND; return the times."""
    seen = wait_all_connected(up, BOUND + 20)
    times = {name: when - replugged[name] for name, when in seen.items()}
    for slot in up:
        assert slot.marlin is not None and slot.marlin.opens >= 1
        row = daemon.wait_for_printer(
            slot.name, lambda r: r["state"] == "operational", "operational"
        )
        assert row["connects"] == 2
        assert slot.plugged is not None and row["device"] == slot.plugged.node
    print(f"reconnect times: {', '.join(f'{n} {t:.2f} s' for n, t in times.items())}")
    for name, elapsed in times.items():
        assert SETTLE <= elapsed <= BOUND, f"{name}: Operational {elapsed:.2f} s after replug"
    return times


def check_back(rig: Rig, daemon: DaemonProcess, slot: Slot, since: float) -> None:
    """Assert the printer of the OctoPrint that came back is connected, once more.

    A resumed OctoPrint still says Operational on the by-id link (the old, dead port)
    until it notices; only the new device's firmware being opened proves a new link.
    """
    assert slot.marlin is not None
    slot.marlin.wait_for(lambda m: m.opens >= 1, 60)
    elapsed = wait_connected(slot, 30) - since
    print(f"{slot.name}: Operational {elapsed:.2f} s after its OctoPrint was back")
    assert slot.marlin is not None and slot.marlin.opens >= 1
    row = daemon.wait_for_printer(slot.name, lambda r: r["state"] == "operational", "operational")
    assert row["connects"] == 2
    assert slot.plugged is not None and row["device"] == slot.plugged.node


def test_one_octoprint_stopped_does_not_delay_the_others(rig: Rig) -> None:
    up, down = rig.slots[:DOWN], rig.slots[DOWN]
    with rig.daemon("stopped") as daemon:
        connect_all(rig, daemon)
        down.octoprint.stop()
        replugged = power_cycle_all(rig, up)
        check_the_two_up(rig, daemon, up, replugged)
        row = daemon.wait_for_printer(
            down.name, lambda r: r["state"] == "octoprint unreachable", "the outage"
        )
        assert row["connects"] == 1
        # The two others stayed where they were while the third one is out.
        assert [daemon.printer(s.name)["connects"] for s in up] == [2, 2]
        down.octoprint.start()
        check_back(rig, daemon, down, time.monotonic())
        assert [daemon.printer(s.name)["connects"] for s in rig.slots] == [2, 2, 2]
        assert_no_cross_talk(rig)
        assert daemon.stop() == 0
    log = daemon.log()
    assert log.count("cannot reach OctoPrint") == 1, "only the third OctoPrint was down, once"
    assert "OctoPrint answers again; reconciling" in log
    for slot in rig.slots:
        assert slot.octoprint.api_key not in log


def test_one_octoprint_hanging_does_not_delay_the_others(rig: Rig) -> None:
    up, down = rig.slots[:DOWN], rig.slots[DOWN]
    with rig.daemon("hanging", down_timeout=2) as daemon:
        connect_all(rig, daemon)
        pid = down.octoprint.pid
        assert pid is not None
        os.kill(pid, signal.SIGSTOP)
        try:
            replugged = power_cycle_all(rig, up)
            check_the_two_up(rig, daemon, up, replugged)
            row = daemon.wait_for_printer(
                down.name, lambda r: r["state"] == "octoprint unreachable", "the outage"
            )
            assert row["connects"] == 1
            assert "no answer within 2 s" in str(row["reason"])
            assert [daemon.printer(s.name)["connects"] for s in up] == [2, 2]
        finally:
            os.kill(pid, signal.SIGCONT)
        check_back(rig, daemon, down, time.monotonic())
        assert [daemon.printer(s.name)["connects"] for s in rig.slots] == [2, 2, 2]
        assert_no_cross_talk(rig)
        assert daemon.stop() == 0
    log = daemon.log()
    assert log.count("cannot reach OctoPrint") == 1, "only the third OctoPrint hung, once"
    assert "OctoPrint answers again; reconciling" in log
    # The hung request was sent first and took 2 s to fail; the others' connects (the
    # second of each, after the power cycle) were sent while it still hung.
    hung = log.index(f"{down.name}: wait: cannot reach OctoPrint: no answer within 2 s")
    for slot in up:
        came_back = f"{slot.name}: connect: device came back: connecting to {slot.by_id}"
        second = log.index(came_back, log.index(came_back) + 1)
        assert second < hung, f"{slot.name} waited for the hung OctoPrint\n{log}"
