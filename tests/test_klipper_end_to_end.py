"""End to end with Klipper: the real reconnectd process, a real Klippy with its Linux-
process MCU, a real Moonraker, and real libudev on a umockdev testbed.

The board is switched off and on on both sides at once (``SimulatedKlipperBoard``):
Klippy loses its MCU ("Lost communication with MCU 'mcu'") and udev hears the USB
device go and come back. One test per rule of the contract's "Klipper printers"
section (K1-K7), each asserting what Klippy really did.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon_process import DaemonProcess
from tests.support.klipper_build import KlipperBuild, find_build
from tests.support.klipper_stack import KlipperStack, SimulatedKlipperBoard
from tests.support.real import missing
from tests.support.testbed import Testbed, unavailable_reason

pytestmark = [pytest.mark.umockdev, pytest.mark.klipper]

SETTLE = 0.5
# What the daemon's debug log shows each time it asks Moonraker whether a print runs.
PRINT_STATE_QUERY = "GET /printer/objects/query?print_stats=state: HTTP 200"
LOST_WITHIN = 9.0  # Klippy notices a lost MCU in 3.3-5.5 s (tests/test_klipper_stack.py)
READY_WITHIN = 10.0  # a restart takes 1.5-1.9 s; our look comes after the settle window


@dataclass
class Rig:
    testbed: Testbed
    stack: KlipperStack
    board: SimulatedKlipperBoard
    workdir: Path

    def config(self, *, key: str | None = None, poll: float = 0) -> str:
        lines = ["[moonraker]", f'url = "{self.stack.url}"', "timeout = 5"]
        if key is not None:
            lines.append(f'api_key = "{key}"')
        return "\n".join(
            [
                *lines,
                "",
                "[[printer]]",
                'name = "voron"',
                'vendor_id = "1d50"',
                'product_id = "614e"',
                f"settle = {SETTLE}",
                f"poll = {poll}",
                "[printer.moonraker]",
                "",
            ]
        )

    def daemon(self, name: str, config: str | None = None) -> DaemonProcess:
        return DaemonProcess(self.workdir / name, config or self.config(), env=self.testbed.env)

    def state(self) -> str:
        return str(self.stack.info()["state"])

    def recover(self) -> None:
        """Leave the board on and Klippy ready, for the next test."""
        if not self.board.is_on:
            self.board.switch_on()
        if self.state() != "ready":
            self.stack.firmware_restart()
            self.stack.wait_for_state("ready", READY_WITHIN)
        # A print a failed test left running would make the next start_print "SD busy".
        stats = self.stack.query({"print_stats": ["state"]})["print_stats"]
        if stats["state"] in ("printing", "paused"):
            self.stack.gcode("CANCEL_PRINT")


@contextlib.contextmanager
def klipper_rig(
    factory: pytest.TempPathFactory,
    name: str,
    *,
    mcus: tuple[str, ...] = ("mcu",),
    api_key: bool = False,
) -> Iterator[Rig]:
    """Given a name and the stack's options, start a testbed and a Klipper stack with one
    simulated board per MCU (the first is the rig's); stop them all on leaving."""
    build = build_or_skip()
    workdir = factory.mktemp(name)
    with (
        Testbed(workdir / "testbed") as testbed,
        KlipperStack(workdir / "stack", build=build, mcus=mcus, api_key=api_key) as stack,
    ):
        boards = [SimulatedKlipperBoard(testbed, stack, mcu) for mcu in mcus]
        try:
            yield Rig(testbed, stack, boards[0], workdir)
        finally:
            for board in reversed(boards):
                board.close()


def build_or_skip() -> KlipperBuild:
    reason = unavailable_reason()
    if reason:
        missing(reason)
    found = find_build()
    if isinstance(found, str):
        missing(f"no Klipper stack: {found}")
    assert isinstance(found, KlipperBuild)
    return found


@pytest.fixture(scope="module")
def module_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with klipper_rig(tmp_path_factory, "klipper-e2e") as rig:
        yield rig


@pytest.fixture
def rig(module_rig: Rig) -> Iterator[Rig]:
    module_rig.recover()
    yield module_rig
    module_rig.recover()


def switch_off(rig: Rig) -> None:
    """Switch the board off; a running Klippy notices ("Lost communication"), one shut
    down already keeps what it said."""
    was_ready = rig.state() == "ready"
    rig.board.switch_off()
    if was_ready:
        rig.stack.wait_for_state("shutdown", LOST_WITHIN, message="Lost communication")


def power_cycle(rig: Rig) -> float:
    """Switch the board off until Klippy noticed, then on; return when it came back."""
    switch_off(rig)
    rig.board.switch_on()
    return time.monotonic()


def test_k1_a_board_switched_off_and_on_is_restarted_once(rig: Rig) -> None:
    with rig.daemon("k1") as daemon:
        back = power_cycle(rig)
        rig.stack.wait_for_state("ready", READY_WITHIN)
        took = time.monotonic() - back
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
        assert row["connects"] == 1
        assert took >= SETTLE, "restarted before the settle window ended"
        time.sleep(2 * SETTLE)
        assert daemon.printer("voron")["connects"] == 1, "one restart per burst"
    log = daemon.log()
    assert "device came back: restarting the firmware (shutdown: Lost communication" in log
    assert "connected: Klippy is ready" in log


def test_k2_a_printing_klipper_is_never_restarted(rig: Rig) -> None:
    rig.stack.start_print(30)
    with rig.daemon("k2") as daemon:
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "busy", "the first look")
        assert (row["decision"], row["reason"]) == ("leave", "Klippy is ready")
        looks = daemon.log().count(PRINT_STATE_QUERY)
        # A spurious event for the board (a udev "change", a re-trigger): it looks again.
        assert rig.board.plugged is not None
        rig.testbed.send_uevent(rig.board.plugged, "change")
        daemon.wait_for_log(PRINT_STATE_QUERY, looks + 1)
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "busy", "the next look")
        assert (row["decision"], row["reason"]) == ("leave", "Klippy is ready")
        time.sleep(2 * SETTLE)
        stats = rig.stack.query({"print_stats": ["state"]})["print_stats"]
        assert stats["state"] == "printing", "the print goes on"
        assert daemon.printer("voron")["connects"] == 0


def test_k2_a_print_cut_off_by_the_lost_board_is_logged_and_does_not_block(rig: Rig) -> None:
    rig.stack.start_print(60, name="lost.gcode")
    with rig.daemon("k2-lost") as daemon:
        power_cycle(rig)
        rig.stack.wait_for_state("ready", READY_WITHIN)
        daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
    log = daemon.log()
    assert "the print lost.gcode" in log and "cannot resume" in log
    assert log.index("cannot resume") < log.index("restarting the firmware")


@pytest.mark.parametrize("stop", ["emergency_stop", "m112"])
def test_k3_an_emergency_stop_or_m112_holds_until_the_board_comes_back(rig: Rig, stop: str) -> None:
    with rig.daemon(f"k3-{stop}") as daemon:
        getattr(rig.stack, stop)()
        rig.stack.wait_for_state("shutdown", 5)
        # Anything that makes it look (here a udev "change"): it must not restart.
        assert rig.board.plugged is not None
        rig.testbed.send_uevent(rig.board.plugged, "change")
        row = daemon.wait_for_printer(
            "voron", lambda r: str(r["state"]).startswith("holding"), "the hold"
        )
        assert row["state"] == "holding after firmware error"
        time.sleep(2 * SETTLE)
        assert rig.state() == "shutdown"
        # The board switched off and on: the old verdict is stale, a restart is safe.
        power_cycle(rig)
        rig.stack.wait_for_state("ready", READY_WITHIN)
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
        assert row["connects"] == 1
    assert "not reconnecting until the printer is switched off and on" in daemon.log()


def test_k3_a_hold_survives_a_restart_of_reconnectd(rig: Rig) -> None:
    daemon = rig.daemon("k3-restart")
    with daemon:
        rig.stack.emergency_stop()
        rig.stack.wait_for_state("shutdown", 5)
        daemon.signal(signal.SIGHUP)  # look again
        daemon.wait_for_printer("voron", lambda r: str(r["state"]).startswith("holding"), "hold")
    with daemon:  # the same state directory
        row = daemon.wait_for_printer(
            "voron", lambda r: str(r["state"]).startswith("holding"), "the stored hold"
        )
        assert row["connects"] == 0
        time.sleep(2 * SETTLE)
        assert rig.state() == "shutdown"


def test_k5_moonraker_restarting_is_waited_for_then_reconciled(rig: Rig) -> None:
    with rig.daemon("k5") as daemon:
        switch_off(rig)
        rig.stack.stop_moonraker()
        rig.board.switch_on()
        row = daemon.wait_for_printer(
            "voron", lambda r: r["state"] == "moonraker unreachable", "the outage"
        )
        assert row["connects"] == 0
        rig.stack.start_moonraker()
        rig.stack.wait_for_state("ready", READY_WITHIN + 30)  # outage backoff up to 30 s
        daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
    assert "Klippy answers again; reconciling" in daemon.log()


def test_k6_at_start_a_present_board_with_klippy_down_for_its_mcu_is_restarted(
    rig: Rig,
) -> None:
    power_cycle(rig)  # reconnectd was not running: nobody restarted Klippy
    assert rig.state() == "shutdown"
    with rig.daemon("k6") as daemon:
        rig.stack.wait_for_state("ready", READY_WITHIN)
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
        assert row["connects"] == 1


@pytest.fixture(scope="module")
def two_mcus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with klipper_rig(tmp_path_factory, "klipper-two", mcus=("mcu", "toolhead")) as rig:
        yield rig


def test_k4_with_the_toolhead_board_still_off_nothing_is_restarted(two_mcus: Rig) -> None:
    rig = two_mcus
    rig.stack.power_off("toolhead")  # its own power, still off
    with rig.daemon("k4") as daemon:
        power_cycle(rig)
        row = daemon.wait_for_printer(
            "voron", lambda r: r["state"] == "waiting for another board", "the wait"
        )
        assert "[mcu toolhead] serial" in str(row["reason"])
        assert rig.state() == "shutdown" and row["connects"] == 0
        rig.stack.power_on("toolhead")
        rig.stack.wait_for_state("ready", READY_WITHIN + 10)  # looked for again with backoff
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
        assert row["connects"] == 1


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with klipper_rig(tmp_path_factory, "klipper-key", api_key=True) as rig:
        yield rig


def test_a_key_moonraker_rejects_is_said_and_nothing_is_restarted(keyed: Rig) -> None:
    rig = keyed
    with rig.daemon("badkey", rig.config(key="not-the-key-0123")) as daemon:
        power_cycle(rig)
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "key rejected", "refusal")
        assert row["connects"] == 0
        assert rig.state() == "shutdown"
    log = daemon.log()
    assert "not-the-key-0123" not in log
    assert "Klippy refused: HTTP 401" in log
    assert rig.stack.api_key is not None
    with rig.daemon("goodkey", rig.config(key=rig.stack.api_key)) as daemon:
        rig.stack.wait_for_state("ready", READY_WITHIN)  # K6: restarted at start
        daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
    assert rig.stack.api_key not in daemon.log()


def test_k7_a_polled_board_that_never_vanishes_is_restarted_when_its_mcu_is_back(
    rig: Rig,
) -> None:
    # A board whose USB side stays (powered from the Pi) while its MCU goes: no udev
    # event at all; only looking every `poll` seconds tells.
    with rig.daemon("k7", rig.config(poll=5)) as daemon:
        daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
        rig.stack.power_off()
        rig.stack.wait_for_state("shutdown", LOST_WITHIN, message="Lost communication")
        rig.stack.power_on()
        rig.stack.wait_for_state("ready", READY_WITHIN + 10)  # the next look, then a restart
        row = daemon.wait_for_printer("voron", lambda r: r["state"] == "operational", "ready")
        assert row["connects"] == 1
    assert "Klippy lost the printer (Lost communication with MCU 'mcu')" in daemon.log()
