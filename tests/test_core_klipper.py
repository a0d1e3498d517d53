"""The decision core with Klipper's host (K1-K7), as moonraker_state reads it: the
same rules as OctoPrint's, in Klipper's words. Injected clock, no I/O."""

from __future__ import annotations

import logging
from dataclasses import replace

from reconnectd.core import (
    CONFIRM_CAP,
    RESTART_QUIET,
    RETRY_FIRST,
    WAIT_CAP,
    Connect,
    CoreSettings,
    HoldKind,
    PrinterCore,
    ReadHost,
    State,
)
from reconnectd.devices import Device
from reconnectd.host import HostView, Unreachable
from reconnectd.moonraker_state import view_of
from tests.test_core import Bench

MCU = Device(
    devpath="/devices/pci0000:00/usb1/1-1/1-1:1.0/tty/ttyACM0",
    node="/dev/ttyACM0",
    links=("/dev/serial/by-id/usb-Klipper_stm32f446xx_1A0031-if00",),
    vendor_id="1d50",
    product_id="614e",
    serial="1A0031",
    instance="500",
)
BACK = replace(MCU, instance="501", node="/dev/ttyACM1")
RESTART = Connect(port=None, baudrate=None, profile=None)
FIRST_LOOK = ReadHost(detail=False)

LOST = view_of({"state": "shutdown", "state_message": "Lost communication with MCU 'mcu'"}, {})
ESTOP = view_of({"state": "shutdown", "state_message": "Shutdown due to webhooks request"}, {})
M112 = view_of({"state": "shutdown", "state_message": "Shutdown due to M112 command"}, {})
FAILED_RESET = view_of(
    {"state": "error", "state_message": "Failed automated reset of MCU 'mcu'"}, {}
)
UNABLE = view_of({"state": "error", "state_message": "mcu 'mcu': Unable to connect"}, {})
READY = view_of({"state": "ready"}, {"print_stats": {"state": "standby"}})
PRINTING = view_of({"state": "ready"}, {"print_stats": {"state": "printing"}})
STARTUP = view_of({"state": "startup"}, None)
KLIPPY_AWAY = Unreachable("Klippy is not connected to Moonraker (Klippy Host not connected)")


def klipper(**settings: object) -> Bench:
    fields: dict[str, object] = {"name": "voron", "host": "Klippy", "recheck_after_return": 10.0}
    fields.update(settings)
    core = PrinterCore(CoreSettings(**fields))  # type: ignore[arg-type]
    return Bench(core, error_needs_detail=False)


def restarted_until_ready(b: Bench, view: HostView = LOST) -> None:
    """From the first read being due: answer with ``view``, accept the restart, then
    Klippy away for a moment, startup, ready."""
    assert b.advance(60) == [FIRST_LOOK]
    assert b.answer(view) == [RESTART]
    assert b.done() == []
    assert b.advance(1) == [ReadHost()]
    assert b.answer(KLIPPY_AWAY) == [], "Klippy away during our own restart is expected"
    assert b.advance(CONFIRM_CAP) == [ReadHost()]
    assert b.answer(STARTUP) == []
    assert b.advance(CONFIRM_CAP) == [ReadHost()]
    assert b.answer(READY) == []
    assert b.state() == State.OPERATIONAL


def test_k1_a_board_that_came_back_to_a_lost_mcu_is_restarted_once() -> None:
    b = klipper()
    b.add(MCU)
    restarted_until_ready(b)
    assert b.connects() == [RESTART]
    assert b.messages(logging.WARNING) == [], "nothing for a person to look at"
    said = " ".join(b.messages())
    assert "device came back: restarting the firmware (shutdown: Lost communication" in said
    assert "connected: Klippy is ready" in said


def test_k1_a_restart_that_does_not_reach_ready_is_retried_with_backoff() -> None:
    b = klipper()
    b.add(MCU)
    b.advance(1)
    assert b.answer(LOST) == [RESTART]
    b.done()
    b.advance(1)
    # A board that kept power while its link dropped: the first restart fails ...
    assert b.answer(FAILED_RESET) == []
    assert b.state() == State.RETRY_WAIT
    assert b.advance(RETRY_FIRST - 0.01) == []
    assert b.advance(0.01) == [ReadHost()]
    assert b.answer(FAILED_RESET) == [RESTART], "... and the retry recovers it"


def test_k2_nothing_is_sent_while_klippy_is_ready_printing_or_starting() -> None:
    for view in (READY, PRINTING, STARTUP):
        b = klipper()
        b.add(MCU)
        b.advance(1)
        assert b.answer(view) == []
        for _ in range(4):
            b.advance(CONFIRM_CAP)
            if b.core.awaiting_answer:
                b.answer(view)
        assert b.connects() == [], view.state


def test_k2_a_ready_klippy_right_after_the_return_is_looked_at_until_it_noticed() -> None:
    # Klippy notices a lost MCU 4.5 to 5.5 s after it went: a quick power cycle can
    # find it still "ready" at the first look.
    b = klipper()
    b.add(MCU)
    b.advance(1)
    assert b.answer(READY) == []
    assert b.advance(CONFIRM_CAP) == [ReadHost()]
    assert b.answer(LOST) == [RESTART]


def test_k2_a_print_cut_off_by_the_mcu_loss_is_logged_before_the_restart() -> None:
    b = klipper()
    b.add(MCU)
    b.advance(1)
    lost_mid_print = replace(LOST, lost_print="benchy.gcode, 43.1 % done")
    assert b.answer(lost_mid_print) == [RESTART]
    warnings = b.messages(logging.WARNING)
    assert warnings == [
        "voron: the print benchy.gcode, 43.1 % done was cut off when Klippy lost the "
        "board; it cannot resume"
    ]
    log = [entry.message for entry in b.log]
    assert log.index(warnings[0]) < next(i for i, m in enumerate(log) if "restart:" in m)


def test_k3_an_emergency_stop_or_m112_holds_until_the_board_comes_back() -> None:
    for stop in (ESTOP, M112):
        b = klipper()
        b.add(MCU)
        restarted_until_ready(b)
        b.core.reconcile(b.now, "reload")
        b.advance(0)
        assert b.answer(stop) == []
        assert [h.kind for h in b.core.holds] == [HoldKind.FATAL]
        assert b.state() == State.HELD
        # Holds survive a restart of reconnectd.
        again = klipper()
        again.core.restore(b.core.memory())
        again.add(MCU, enumerated=True)
        again.advance(0)
        assert again.answer(stop) == []
        assert again.connects() == []
        # The board switched off and on: the old verdict is stale.
        b.remove()
        b.add(BACK)
        restarted_until_ready(b, stop)
        assert len(b.connects()) == 2


def test_k4_a_second_board_still_off_makes_it_wait_and_look_again() -> None:
    b = klipper()
    b.add(MCU)
    b.advance(1)
    missing = "[mcu toolhead] serial /dev/serial/by-id/usb-Klipper_rp2040-if00 not there"
    assert b.answer(replace(LOST, waiting_for=missing)) == []
    assert b.state() == State.WAITING
    assert b.core.deadline == b.now + RETRY_FIRST
    for _ in range(6):
        b.advance(WAIT_CAP)
        b.answer(replace(LOST, waiting_for=missing))
    assert b.core.deadline == b.now + WAIT_CAP, "capped"
    assert len([m for m in b.messages() if "not restarting" in m]) == 1, "said once"
    b.advance(WAIT_CAP)
    assert b.answer(LOST) == [RESTART], "the toolhead board is back"


def test_k5_moonraker_or_klippy_away_is_retried_and_reconciled() -> None:
    b = klipper()
    b.add(MCU)
    b.advance(1)
    assert (
        b.answer(Unreachable("connection refused (GET http://127.0.0.1:7125/printer/info)")) == []
    )
    assert b.state() == State.UNREACHABLE
    warnings = b.messages(logging.WARNING)
    assert len(warnings) == 1 and "cannot reach Klippy: connection refused" in warnings[0]
    b.advance(1)
    assert b.answer(LOST) == [RESTART]
    assert any("Klippy answers again" in m for m in b.messages())


def test_unreachable_long_after_our_restart_is_an_outage_again() -> None:
    b = klipper()
    b.add(MCU)
    b.advance(1)
    b.answer(LOST)
    b.done()
    b.now += RESTART_QUIET
    b.advance(CONFIRM_CAP)
    b.answer(KLIPPY_AWAY)
    assert b.state() == State.UNREACHABLE
    assert any("cannot reach Klippy" in m for m in b.messages(logging.WARNING))


def test_k6_at_start_a_klippy_down_for_its_mcu_is_restarted() -> None:
    b = klipper()
    b.add(MCU, enumerated=True)
    assert b.advance(0) == [ReadHost()]
    assert b.answer(UNABLE) == [RESTART]


def test_k6_at_start_an_unproven_emergency_stop_holds() -> None:
    b = klipper()
    b.add(MCU, enumerated=True)
    b.advance(0)
    assert b.answer(ESTOP) == []
    assert b.state() == State.HELD


def test_k7_a_polled_board_that_never_vanished_is_restarted_every_poll() -> None:
    b = klipper(poll=30.0)
    b.add(MCU, enumerated=True)
    b.advance(0)
    b.answer(READY)
    assert b.advance(30) == [ReadHost()]
    assert b.answer(LOST) == [RESTART]
    b.done()
    b.advance(1)
    b.answer(UNABLE)
    assert b.core.deadline == b.now + 30, "backs off from the poll period"
