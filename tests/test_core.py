"""The decision core, rule by rule, with an injected clock and no I/O."""

from __future__ import annotations

import copy
import logging
import random
from dataclasses import dataclass, field, replace

import pytest

from reconnectd.core import (
    CONFIRM_CAP,
    EVENT_DRIVEN_ATTEMPTS,
    RECHECK_EVERY,
    RETRY_CAP,
    STUCK_AFTER,
    UNLISTED_GRACE,
    UNLISTED_LOOK,
    UNLISTED_RETRY,
    Action,
    Connect,
    CoreSettings,
    Disconnect,
    HoldKind,
    Log,
    PrinterCore,
    ReadHost,
    State,
    choose_port,
    retry_delay,
)
from reconnectd.devices import Device
from reconnectd.host import Accepted, CommandResult, HostView, ReadResult, Refused, Unreachable
from reconnectd.octoprint_state import UNNAMED_ERROR, octoprint_view

BY_ID = "/dev/serial/by-id/usb-Prusa_Research__prusa3d.com__Original_Prusa_i3_MK3_CZPX-if00"
NODE = "/dev/ttyACM0"
DEVICE = Device(
    devpath="/devices/pci0000:00/usb1/1-1/1-1:1.0/tty/ttyACM0",
    node=NODE,
    links=(BY_ID, "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1:1.0"),
    vendor_id="2c99",
    product_id="0002",
    serial="CZPX",
    instance="1000",
)
REPLUGGED = replace(
    DEVICE,
    devpath="/devices/pci0000:00/usb1/1-1/1-1:1.0/tty/ttyACM1",
    node="/dev/ttyACM1",
    instance="2000",
)
PORTS = (NODE, "/dev/ttyACM1", BY_ID)
THERMAL = "Thermal Runaway, system stopped! Heater_ID: bed - Printer halted. kill() called!"
VANISHED = (
    "SerialException: device reports readiness to read but returned no data "
    "(device disconnected or multiple access on port?)"
)


def view(state: str = "Closed", error: str | None = None, **kw: object) -> HostView:
    fields: dict[str, object] = {"ports": PORTS, "baudrate_preference": 115200}
    fields.update(kw)
    return octoprint_view(state=state, error=error, **fields)  # type: ignore[arg-type]


# The first look after the device came back skips /api/job: no error can change it.
FIRST_LOOK = ReadHost(detail=False)
CLOSED = view()
OPERATIONAL = view("Operational", port=BY_ID)


@dataclass
class Bench:
    """A core, a clock, and everything the core asked for."""

    core: PrinterCore
    now: float = 100.0
    log: list[Log] = field(default_factory=list)
    requests: list[Action] = field(default_factory=list)
    # OctoPrint's client reads no error without the detail (/api/job); Moonraker's
    # has it in /printer/info, the one request a look always makes.
    error_needs_detail: bool = True

    def _take(self, actions: list[Action]) -> list[Action]:
        for action in actions:
            if isinstance(action, Log):
                self.log.append(action)
            else:
                self.requests.append(action)
        return [a for a in actions if not isinstance(a, Log)]

    def add(self, device: Device = DEVICE, *, enumerated: bool = False) -> list[Action]:
        return self._take(self.core.device_added(device, self.now, enumerated=enumerated))

    def remove(self) -> list[Action]:
        return self._take(self.core.device_removed(self.now))

    def advance(self, seconds: float) -> list[Action]:
        """Move the clock, waking the core at each deadline on the way, as the loop does."""
        end = self.now + seconds
        out: list[Action] = []
        while (deadline := self.core.deadline) is not None and deadline <= end:
            self.now = max(self.now, deadline)
            out += self._take(self.core.tick(self.now))
            if out and not isinstance(out[-1], Log):
                break  # a request is in flight: the caller answers it
        else:
            self.now = end
        return out

    def answer(self, result: ReadResult) -> list[Action]:
        """Answer the read in flight; without the job, the error is not read (as the
        client does it)."""
        asked = [a for a in self.requests if isinstance(a, ReadHost)]
        if (
            self.error_needs_detail
            and asked
            and not asked[-1].detail
            and isinstance(result, HostView)
        ):
            result = replace(result, error=None)
        return self._take(self.core.host_read(result, self.now))

    def done(self, result: CommandResult = Accepted()) -> list[Action]:  # noqa: B008
        return self._take(self.core.command_done(result, self.now))

    def state(self) -> State:
        """The core's state, as a call: mypy would narrow an attribute across asserts."""
        return self.core.state

    def connects(self) -> list[Connect]:
        return [a for a in self.requests if isinstance(a, Connect)]

    def messages(self, level: int = logging.INFO) -> list[str]:
        return [entry.message for entry in self.log if entry.level >= level]

    def connect_until_operational(self, first: ReadResult = CLOSED) -> None:
        """From the first read after a return being due: answer Closed, accept the
        connect, confirm Operational."""
        assert self.advance(60) == [FIRST_LOOK]
        actions = self.answer(first)
        assert len(actions) == 1 and isinstance(actions[0], Connect)
        assert self.done() == []
        assert self.advance(60) == [ReadHost()]
        assert self.answer(OPERATIONAL) == []
        assert self.core.state == State.OPERATIONAL


def bench(**settings: object) -> Bench:
    return Bench(PrinterCore(CoreSettings(name="mk3s", **settings)))  # type: ignore[arg-type]


def connected_bench() -> Bench:
    """A printer that reconnectd connected after a power cycle, now idle."""
    b = bench()
    b.add()
    b.connect_until_operational(view(error=VANISHED))
    return b


# --- rule 1: a device that came back is connected once, after settling --------


def test_power_cycle_connects_once_after_settle_to_by_id_link() -> None:
    b = bench(settle=1.0)
    assert b.add() == []
    assert b.advance(0.99) == []
    assert b.advance(0.01) == [FIRST_LOOK]
    assert b.core.awaiting_answer
    assert b.answer(view(error=VANISHED)) == [Connect(BY_ID, 115200, None)]
    assert b.state() == State.CONNECTING
    assert b.core.awaiting_answer, "the connect is asked for"
    assert b.done() == []
    assert not b.core.awaiting_answer
    assert b.advance(0.5) == [ReadHost()]
    assert b.answer(view("Connecting")) == []
    assert b.advance(1.0) == [ReadHost()]
    assert b.answer(OPERATIONAL) == []
    assert b.state() == State.OPERATIONAL
    assert b.core.deadline is None, "idle once Operational: no request while nothing happens"
    assert len(b.connects()) == 1
    assert any("device came back: connecting to " + BY_ID in m for m in b.messages())
    assert any("connected: OctoPrint is Operational" in m for m in b.messages())


@pytest.mark.parametrize(
    ("offered", "configured", "expected"),
    [
        (PORTS, None, BY_ID),
        ((NODE,), None, NODE),
        (("/dev/ttyACM1",), None, None),
        ((), None, None),
        ((NODE, BY_ID, "/dev/printer"), "/dev/printer", "/dev/printer"),
        ((NODE, BY_ID), "/dev/printer", BY_ID),
        (
            ("/dev/serial/by-path/pci-0000:00:14.0-usb-0:1:1.0",),
            None,
            "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1:1.0",
        ),
    ],
)
def test_choose_port(
    offered: tuple[str, ...], configured: str | None, expected: str | None
) -> None:
    assert choose_port(DEVICE, offered, configured) == expected


def test_configured_baudrate_and_profile_win_over_octoprint_preferences() -> None:
    b = bench(baudrate=250000, profile="mk3s")
    b.add()
    b.advance(1)
    assert b.answer(view(profile_preference="_default")) == [Connect(BY_ID, 250000, "mk3s")]


def test_octoprint_preferences_are_used_when_nothing_is_configured() -> None:
    b = bench()
    b.add()
    b.advance(1)
    actions = b.answer(view(baudrate_preference=None, profile_preference="_default"))
    assert actions == [Connect(BY_ID, None, "_default")]


def test_port_never_offered_is_one_clear_error_after_the_grace_and_no_connect() -> None:
    b = bench()
    b.add()
    b.advance(1)
    unlisted = view(ports=("/dev/ttyS0",))
    assert b.answer(unlisted) == []
    assert b.state() == State.PORT_PENDING
    # Within the grace OctoPrint's list may be lagging udev: looked for every second,
    # and no advice yet (it would be wrong: the port is fine and appears seconds later).
    looks = 1
    while b.now - 101 < UNLISTED_GRACE:
        assert b.advance(UNLISTED_LOOK) == [FIRST_LOOK]
        b.answer(unlisted)
        looks += 1
        if b.state() == State.NO_PORT:
            break
        assert b.messages(logging.ERROR) == []
    assert b.state() == State.NO_PORT
    assert looks <= UNLISTED_GRACE / UNLISTED_LOOK + 2, "bounded: about one look a second"
    errors = b.messages(logging.ERROR)
    assert len(errors) == 1
    assert f"OctoPrint does not offer {BY_ID}" in errors[0]
    assert '"/dev/serial/by-id/*" to serial.additionalPorts' in errors[0]
    # OctoPrint rebuilds its list per request: look again later (backing off), without
    # a second error line.
    assert b.core.deadline == pytest.approx(b.now + UNLISTED_RETRY)
    assert b.advance(UNLISTED_RETRY) == [FIRST_LOOK]
    b.answer(unlisted)
    assert b.core.deadline == pytest.approx(b.now + 2 * UNLISTED_RETRY)
    for _ in range(6):
        b.advance(RETRY_CAP)
        b.answer(unlisted)
    assert b.core.deadline == pytest.approx(b.now + RETRY_CAP), "capped"
    assert len(b.messages(logging.ERROR)) == 1
    assert b.connects() == []


@pytest.mark.parametrize("lag", [0.2, 1.0, 3.0, 9.5])
def test_a_port_listed_late_is_connected_within_a_second_of_being_listed(lag: float) -> None:
    b = bench()
    b.add()
    b.advance(1)
    listed_at = b.now + lag
    b.answer(view(ports=()))
    while not b.connects():
        assert b.advance(UNLISTED_LOOK) == [FIRST_LOOK]
        b.answer(view() if b.now >= listed_at else view(ports=()))
    assert b.now - listed_at <= UNLISTED_LOOK
    assert b.connects() == [Connect(BY_ID, 115200, None)]
    assert b.messages(logging.ERROR) == [], "no by-id advice for a port that was only late"
    waits = [m for m in b.messages() if "does not list" in m]
    assert len(waits) == 1, "said once, not per look"


def test_the_grace_starts_again_after_the_device_comes_back() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.answer(view(ports=()))
    for _ in range(20):
        b.advance(UNLISTED_RETRY)
        b.answer(view(ports=()))
    assert b.state() == State.NO_PORT
    b.remove()
    b.add(REPLUGGED)
    b.advance(1)
    b.answer(view(ports=()))
    assert b.state() == State.PORT_PENDING
    assert b.core.deadline is not None and b.core.deadline - b.now <= UNLISTED_LOOK


# --- rule 2: a burst of events leads to at most one connect ------------------


def test_burst_of_events_gives_one_read_and_one_connect_after_the_last_event() -> None:
    b = bench(settle=1.0)
    for _ in range(5):
        b.add()
        b.advance(0.3)
        b.remove()
        b.advance(0.3)
    b.add(REPLUGGED)
    assert b.advance(0.99) == []
    assert b.advance(0.01) == [FIRST_LOOK]
    assert b.answer(CLOSED) == [Connect(BY_ID, 115200, None)]
    assert len([r for r in b.requests if isinstance(r, ReadHost)]) == 1
    assert len(b.connects()) == 1


def test_repeated_adds_without_a_remove_extend_the_settle_window() -> None:
    """udev "change" events (re-triggers) for the node we have: trailing edge too."""
    b = bench(settle=1.0)
    b.add()
    for _ in range(3):
        assert b.advance(0.8) == []
        b.add()
    assert b.advance(0.99) == []
    assert b.advance(0.01) == [FIRST_LOOK]


def test_event_during_a_read_discards_the_answer_and_settles_again() -> None:
    b = bench(settle=1.0)
    b.add()
    assert b.advance(1) == [FIRST_LOOK]
    b.remove()
    b.add(REPLUGGED)
    assert b.answer(CLOSED) == [], "an answer from before the event must not connect"
    assert b.advance(0.99) == []
    assert b.advance(0.01) == [FIRST_LOOK]
    assert b.answer(CLOSED) == [Connect(BY_ID, 115200, None)]


def test_event_during_a_connect_keeps_the_new_settle_window() -> None:
    b = bench(settle=1.0)
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    b.remove()
    b.add(REPLUGGED)
    assert b.done() == []
    assert b.core.deadline == pytest.approx(b.now + 1.0)


def test_device_removed_while_asking_drops_the_answer() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.remove()
    assert b.answer(CLOSED) == []
    assert b.core.deadline is None
    assert b.state() == State.ABSENT


def test_a_reload_inside_the_settle_window_does_not_cut_it_short() -> None:
    b = bench(settle=1.0)
    b.add()
    b.advance(0.3)
    b.core.reconcile(b.now, "config reloaded")
    assert b.advance(0.69) == [], "a reload must not read (and connect) before the burst settles"
    b.remove()
    b.add(REPLUGGED)  # the burst goes on after the reload
    assert b.advance(0.99) == []
    assert b.advance(0.01) == [FIRST_LOOK]
    assert b.answer(CLOSED) == [Connect(BY_ID, 115200, None)]
    b.done()
    b.advance(0.5)
    b.answer(OPERATIONAL)
    assert len(b.connects()) == 1, "one burst, one connect"


def test_a_core_replacing_another_inside_the_settle_window_waits_for_it() -> None:
    old = bench(settle=1.0)
    old.add()
    old.advance(0.4)
    ends = old.core.settling_until
    assert ends == pytest.approx(old.now + 0.6)
    # A reload changed the printer's config: a new core takes over the present device.
    new = Bench(PrinterCore(CoreSettings(name="mk3s", settle=1.0, baudrate=250000)), now=old.now)
    new.core.restore(old.core.memory())
    new._take(new.core.device_added(DEVICE, new.now, enumerated=True, settle_until=ends))
    assert new.advance(0.59) == []
    assert new.advance(0.01) != []
    assert new.core.settling_until is None


# --- rule 3: nothing is sent while OctoPrint is connecting or connected ------


@pytest.mark.parametrize(
    "state",
    [
        "Operational",
        "Printing",
        "Printing from SD",
        "Paused",
        "Pausing",
        "Resuming",
        "Cancelling",
        "Finishing",
        "Starting",
        "Sending file to SD",
        "Transferring file to SD",
        "Some state a future OctoPrint invents",
    ],
)
def test_connected_octoprint_is_left_alone(state: str) -> None:
    b = bench()
    b.add()
    b.advance(1)
    assert b.answer(view(state)) == []
    # A connection right after the device came back is looked at again every second
    # until 5 s after the return: OctoPrint may not have noticed the old line died.
    looks = 0
    while b.core.deadline is not None:
        assert b.advance(RECHECK_EVERY) == [ReadHost()]
        assert b.answer(view(state)) == []
        looks += 1
    assert looks == 4 and b.now == 105.0
    assert b.advance(3600) == []
    assert b.connects() == [] and not any(isinstance(r, Disconnect) for r in b.requests)
    assert any(f"leave: OctoPrint is {state}" in m for m in b.messages())


def test_closing_after_an_error_is_looked_at_again_soon_then_connected() -> None:
    b = bench()
    b.add()
    b.advance(1)
    assert b.answer(view("Offline after error", error=VANISHED)) == []
    assert b.advance(0.5) == [FIRST_LOOK], "closing takes milliseconds: look again soon"
    assert b.answer(view(error=VANISHED)) == [Connect(BY_ID, 115200, None)]


def test_connection_seen_right_after_a_return_is_checked_again() -> None:
    """A hung OctoPrint may still report the dead old port as Operational."""
    b = connected_bench()
    b.remove()
    b.add(REPLUGGED)
    assert b.advance(1) == [FIRST_LOOK]
    assert b.answer(OPERATIONAL) == [], "hands off while it says Operational"
    assert b.advance(RECHECK_EVERY) == [ReadHost()], "but look again soon"
    assert b.answer(view(error=VANISHED)) == [Connect(BY_ID, 115200, None)]


def test_a_confirmed_connection_after_a_return_is_left_alone() -> None:
    b = connected_bench()
    b.remove()
    b.add(REPLUGGED)
    returned = b.now
    b.advance(1)
    b.answer(OPERATIONAL)
    while b.core.deadline is not None:
        b.advance(RECHECK_EVERY)
        assert b.answer(OPERATIONAL) == []
    assert b.now - returned == 5.0, "looked at until 5 s after the return, no longer"
    assert b.advance(3600) == [], "confirmed: no more requests"


@pytest.mark.parametrize(
    ("state", "next_look"),
    [
        # Someone's connection being made: an error it ends with would be new.
        ("Connecting", ReadHost()),
        ("Detecting serial connection", ReadHost()),
        # Closing after an error: the old connection's, as likely as not.
        ("Error", FIRST_LOOK),
    ],
)
def test_connecting_octoprint_is_watched_not_touched(state: str, next_look: ReadHost) -> None:
    b = bench()
    b.add()
    b.advance(1)
    assert b.answer(view(state)) == []
    assert b.advance(10) == [next_look]
    assert b.answer(OPERATIONAL) == []
    assert b.connects() == []
    assert b.state() == State.OPERATIONAL


# --- rule 4: a manual Disconnect is respected ---------------------------------


def test_manual_disconnect_holds_until_the_device_vanishes_and_comes_back() -> None:
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    assert b.advance(0) == [ReadHost()]
    assert b.answer(CLOSED) == [], "the user disconnected: no reconnect"
    assert b.state() == State.HELD
    assert [h.kind for h in b.core.holds] == [HoldKind.MANUAL]
    held = b.messages(logging.WARNING)
    assert len(held) == 1 and "manual disconnect" in held[0]
    # Looking again changes nothing and logs nothing new.
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    assert b.answer(CLOSED) == []
    assert len(b.messages(logging.WARNING)) == 1
    assert len(b.connects()) == 1
    # Power cycle: released, connected again.
    b.remove()
    assert b.core.holds == []
    b.add(REPLUGGED)
    b.connect_until_operational()
    assert len(b.connects()) == 2


def test_udev_change_for_the_same_device_keeps_the_hold_and_looks_again() -> None:
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    b.answer(CLOSED)
    assert b.core.holds
    assert b.add(DEVICE) == [], "a re-announced device (udevadm trigger) is no power cycle"
    assert b.core.holds, "the hold must survive"
    assert b.advance(1) == [ReadHost()]
    assert b.answer(CLOSED) == []
    assert b.state() == State.HELD
    assert len(b.connects()) == 1


def test_same_devpath_with_a_new_instance_is_a_return_and_releases_the_hold() -> None:
    """A remove lost (netlink overflow) and the device back under the same name."""
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    b.answer(CLOSED)
    b.add(replace(DEVICE, instance="3000"))
    assert b.core.holds == []
    b.connect_until_operational()


def test_user_connecting_again_releases_the_hold() -> None:
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    b.answer(CLOSED)
    assert b.core.holds
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    assert b.answer(OPERATIONAL) == []
    assert b.core.holds == []
    assert any("connected by the user" in m for m in b.messages())


def test_manual_disconnect_seen_before_a_restart_is_respected_after_it() -> None:
    b = connected_bench()
    memory = b.core.memory()
    restarted = bench()
    assert restarted.core.restore(memory) == []
    assert restarted.add(DEVICE, enumerated=True) == []
    assert restarted.advance(0) == [ReadHost()]
    assert restarted.answer(CLOSED) == []
    assert restarted.state() == State.HELD
    assert restarted.core.holds[0].kind == HoldKind.MANUAL


def test_closure_after_our_own_failed_attempt_is_not_a_manual_disconnect() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    b.done()
    b.advance(0.5)
    b.answer(view("Connecting"))
    b.advance(60)
    assert b.answer(CLOSED) == [], "a silent printer ends Offline with no error"
    assert b.core.holds == []
    assert b.state() == State.RETRY_WAIT


# --- rule 5: no reconnect after a firmware fatal error ------------------------


def test_fatal_error_holds_until_power_cycle() -> None:
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    assert b.answer(view(error=THERMAL)) == []
    assert b.core.holds[0].kind == HoldKind.FATAL
    assert THERMAL in b.messages(logging.WARNING)[0]
    b.remove()
    b.add(REPLUGGED)
    # OctoPrint still shows the old error: stale after the power cycle.
    b.connect_until_operational(view(error=THERMAL))
    assert len(b.connects()) == 2


def test_fatal_error_right_after_our_connect_holds() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    b.done()
    b.advance(0.5)
    assert b.answer(view(error="Error:Printer halted. kill() called!")) == []
    assert b.state() == State.HELD


def test_fatal_error_at_first_start_is_held_since_it_cannot_be_proven_stale() -> None:
    b = bench()
    b.add(DEVICE, enumerated=True)
    b.advance(0)
    assert b.answer(view(error=THERMAL)) == []
    assert b.state() == State.HELD


def test_fatal_error_is_stale_when_the_device_was_replugged_while_we_were_stopped() -> None:
    b = connected_bench()
    memory = b.core.memory()
    restarted = bench()
    restarted.core.restore(memory)
    restarted.add(REPLUGGED, enumerated=True)
    restarted.advance(0)
    assert restarted.answer(view(error=THERMAL)) == [Connect(BY_ID, 115200, None)]


def test_fatal_error_of_a_connection_made_since_the_return_holds() -> None:
    """Someone (OctoPrint's own autoconnect, a person) connects the returned printer
    first and its firmware halts: that error is new, not the stale one of before."""
    b = connected_bench()
    b.remove()
    b.add(REPLUGGED)
    assert b.advance(1) == [FIRST_LOOK]
    assert b.answer(view("Connecting", port=BY_ID)) == []
    assert b.advance(CONFIRM_CAP) == [ReadHost()], "an error may mean something now"
    assert b.answer(view(error=THERMAL)) == []
    assert [h.kind for h in b.core.holds] == [HoldKind.FATAL]
    assert len(b.connects()) == 1, "only the connect before the power cycle"


def test_transport_error_on_a_connection_we_saw_is_reconnected() -> None:
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    actions = b.answer(
        view(error="Too many consecutive timeouts, printer still connected and alive?")
    )
    assert actions == [Connect(BY_ID, 115200, None)]
    assert b.core.holds == []


# --- rule 6: the stuck "Opening serial connection" state is recovered ---------


# What a user is promised: OctoPrint stuck opening a port is freed within 30 s.
STUCK_RECOVERED_WITHIN = 30.0


def keep_answering(b: Bench, answer: HostView) -> list[Action]:
    """Answer every read with `answer` until the core does something else.

    Bounded by a fixed promise, not by the code's own constant, so a core that
    never acts fails here instead of looping.
    """
    give_up = b.now + STUCK_RECOVERED_WITHIN
    while b.now <= give_up:
        actions = b.answer(answer)
        if actions:
            return actions
        assert b.advance(give_up - b.now + 1) == [ReadHost()], "the core stopped looking"
    raise AssertionError(f"nothing but reads for {STUCK_RECOVERED_WITHIN} s")


def test_stuck_opening_is_disconnected_then_connected() -> None:
    b = bench()
    b.add(DEVICE, enumerated=True)
    b.advance(0)
    opening = view("Opening serial connection", port=NODE)
    first_seen = b.now
    assert keep_answering(b, opening) == [Disconnect()]
    assert first_seen + STUCK_AFTER <= b.now <= first_seen + STUCK_AFTER + CONFIRM_CAP
    assert any("stuck" in m for m in b.messages(logging.WARNING))
    assert b.done() == []
    assert b.advance(1) == [ReadHost()]
    assert b.answer(CLOSED) == [Connect(BY_ID, 115200, None)]


def test_short_opening_is_not_stuck() -> None:
    b = bench()
    b.add()
    b.advance(1)
    assert b.answer(view("Opening serial connection")) == []
    b.advance(STUCK_AFTER / 2)
    assert b.answer(OPERATIONAL) == []
    assert not any(isinstance(r, Disconnect) for r in b.requests)


def test_our_attempt_stuck_in_opening_counts_as_failed_and_backs_off() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    b.done()
    opening = view("Opening serial connection")
    b.advance(1)
    assert keep_answering(b, opening) == [Disconnect()]
    b.done()
    b.advance(1)
    assert b.answer(CLOSED) == [], "after a stuck attempt, wait for the backoff"
    assert b.core.attempts == 1
    assert b.state() == State.RETRY_WAIT
    assert b.advance(retry_delay(1)) == [ReadHost()]
    assert b.answer(CLOSED) == [Connect(BY_ID, 115200, None)]


# --- rule 7: a connect that does not reach Operational is retried with backoff --


@pytest.mark.parametrize(
    ("failed", "poll", "delay"),
    [
        (1, 0, 5),
        (2, 0, 10),
        (3, 0, 20),
        (4, 0, 40),
        (5, 0, 80),
        (6, 0, 160),
        (7, 0, 300),
        (12, 0, 300),
        (1, 30, 30),
        (2, 30, 60),
        (3, 30, 120),
        (4, 30, 240),
        (5, 30, 300),
        (40, 30, 300),
        (1, 5, 5),
        (1, 600, 600),
        (3, 600, 600),
    ],
)
def test_retry_delay(failed: int, poll: float, delay: float) -> None:
    assert retry_delay(failed, poll) == delay


def fail_attempt(b: Bench) -> None:
    """Answer the due read with Closed, accept the connect, then report it failed."""
    # Only the first attempt after the device came back skips the job.
    assert b.advance(RETRY_CAP) == [FIRST_LOOK if b.connects() == [] else ReadHost()]
    assert isinstance(b.answer(CLOSED)[0], Connect)
    b.done()
    assert b.advance(1) == [ReadHost()]
    b.answer(CLOSED)


def test_failed_connects_back_off_then_give_up_until_the_device_returns() -> None:
    b = bench()
    b.add()
    starts: list[float] = []
    for _ in range(EVENT_DRIVEN_ATTEMPTS):
        fail_attempt(b)
        starts.append(b.now)
    assert len(b.connects()) == EVENT_DRIVEN_ATTEMPTS
    assert b.state() == State.GAVE_UP
    assert b.advance(3600) == []
    gaps = [round(later - earlier) for earlier, later in zip(starts, starts[1:])]
    # each gap: the backoff plus the 0.5 s confirmation look
    assert gaps == [round(retry_delay(n) + 0.5) for n in range(1, EVENT_DRIVEN_ATTEMPTS)]
    # A new device event resets the backoff and connects again.
    b.remove()
    b.add(REPLUGGED)
    assert b.advance(1) == [FIRST_LOOK]
    assert isinstance(b.answer(CLOSED)[0], Connect)
    assert b.core.attempts == 0


def test_polled_printer_keeps_retrying_at_the_cap() -> None:
    b = bench(poll=60)
    b.add()
    for _ in range(EVENT_DRIVEN_ATTEMPTS + 3):
        fail_attempt(b)
    assert b.state() == State.RETRY_WAIT
    assert b.core.deadline == pytest.approx(b.now + RETRY_CAP)


def test_repeated_failures_are_logged_once_per_reason_change() -> None:
    b = bench(poll=60)
    b.add()
    for _ in range(12):
        fail_attempt(b)
    warnings = b.messages(logging.WARNING)
    assert len(warnings) == 1, warnings  # once per run of failures, not once per attempt
    assert "attempt 1 failed" in warnings[0]
    assert not [m for m in b.messages() if "retry 5: connecting" in m], "retries go to debug"
    # recovery is logged again
    assert b.advance(RETRY_CAP) == [ReadHost()]
    b.answer(CLOSED)
    b.done()
    b.advance(1)
    b.answer(OPERATIONAL)
    assert "connected: OctoPrint is Operational" in b.messages()[-1]


def test_port_refused_by_octoprint_is_a_failed_attempt() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    assert b.done(Refused(400, "port is invalid")) == []
    assert b.core.attempts == 1
    assert b.state() == State.RETRY_WAIT


# --- rule 8: OctoPrint down or answering errors: keep retrying, then reconcile ---


def test_unreachable_octoprint_is_retried_and_reconciled_when_back() -> None:
    b = bench()
    b.add()
    b.advance(1)
    delays = []
    for _ in range(8):
        before = b.now
        assert b.answer(Unreachable("connection refused")) == []
        assert b.advance(60) == [FIRST_LOOK]
        delays.append(round(b.now - before))
    assert delays == [1, 2, 4, 8, 16, 30, 30, 30]
    warnings = b.messages(logging.WARNING)
    assert len(warnings) == 1 and "cannot reach OctoPrint: connection refused" in warnings[0]
    assert b.answer(CLOSED) == [Connect(BY_ID, 115200, None)]
    assert any("answers again" in m for m in b.messages())


def test_rejected_key_is_an_error_logged_once_and_looked_at_again_later() -> None:
    b = bench()
    b.add()
    b.advance(1)
    assert b.answer(Refused(403, "API key rejected or lacking permission", key_rejected=True)) == []
    assert b.state() == State.REJECTED
    assert b.advance(59) == []
    assert b.advance(1) == [FIRST_LOOK]
    b.answer(Refused(403, "API key rejected or lacking permission", key_rejected=True))
    errors = b.messages(logging.ERROR)
    assert len(errors) == 1 and "HTTP 403" in errors[0]


def test_a_reload_looks_at_once_after_a_rejected_key() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.answer(Refused(403, "API key rejected or lacking permission", key_rejected=True))
    b.core.reconcile(b.now + 2, "config reloaded")  # the user put in a new key
    assert b.advance(2) == [FIRST_LOOK]


def test_a_reload_never_brings_a_retry_forward() -> None:
    # Found by the model of the rules: each reload connected at once, so a script
    # reloading now and then defeated the backoff a silent printer needs (#5420).
    b = bench()
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    b.done()
    b.advance(1)
    b.answer(CLOSED)  # the connect did not reach Operational
    assert b.state() == State.RETRY_WAIT
    for _ in range(3):
        b.core.reconcile(b.now, "config reloaded")
        assert b.advance(1) == []
    assert b.advance(2) == [ReadHost()], "the retry comes when its backoff ends"
    assert len(b.connects()) == 1


def test_connect_that_timed_out_is_checked_before_connecting_again() -> None:
    b = bench()
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    assert b.done(Unreachable("no answer within 5 s")) == []
    assert b.advance(1) == [ReadHost()]
    assert b.answer(view("Connecting")) == [], "the connect landed after all: do not stack another"
    assert len(b.connects()) == 1


# --- rule 9: at start, a present device with OctoPrint closed is connected ----


def test_start_with_device_present_connects_without_waiting_to_settle() -> None:
    b = bench(settle=5.0)
    assert b.add(DEVICE, enumerated=True) == []
    assert b.advance(0) == [ReadHost()]
    assert b.answer(CLOSED) == [Connect(BY_ID, 115200, None)]


def test_start_with_a_stored_hold_on_the_same_instance_does_not_connect() -> None:
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    b.answer(view(error=THERMAL))
    restarted = bench()
    restarted.core.restore(b.core.memory())
    restarted.add(DEVICE, enumerated=True)
    restarted.advance(0)
    assert restarted.answer(CLOSED) == []
    assert restarted.core.holds[0].kind == HoldKind.FATAL


def test_start_releases_a_stored_hold_when_the_device_was_replugged_meanwhile() -> None:
    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    b.answer(CLOSED)
    restarted = bench()
    restarted.core.restore(b.core.memory())
    restarted.add(REPLUGGED, enumerated=True)
    assert restarted.core.holds == []
    restarted.advance(0)
    assert restarted.answer(CLOSED) == [Connect(BY_ID, 115200, None)]


def test_start_keeps_a_hold_when_the_instance_is_unknown() -> None:
    anonymous = replace(DEVICE, instance="")
    b = bench()
    b.core.restore({"holds": [{"kind": "manual", "reason": "x", "instance": ""}]})
    b.add(anonymous, enumerated=True)
    b.advance(0)
    assert b.answer(CLOSED) == []
    assert b.state() == State.HELD


def test_start_with_nothing_remembered_and_octoprint_offline_connects() -> None:
    b = bench()
    b.add(DEVICE, enumerated=True)
    b.advance(0)
    assert b.answer(view(state="Offline")) == [Connect(BY_ID, 115200, None)]


# --- memory, dry run -----------------------------------------------------------


def test_memory_round_trips_and_is_json_ready() -> None:
    import json

    b = connected_bench()
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    b.answer(view(error=THERMAL))
    memory = json.loads(json.dumps(b.core.memory()))
    fresh = bench()
    assert fresh.core.restore(memory) == []
    assert fresh.core.holds == b.core.holds
    assert fresh.core.connected_instance == "1000"


@pytest.mark.parametrize(
    ("memory", "problem"),
    [
        ([], "stored state is not an object"),
        ({"holds": "x"}, "stored holds are not a list"),
        ({"holds": [{"kind": "sideways", "reason": "x", "instance": "1"}]}, "is malformed"),
        ({"holds": [{"reason": "x"}]}, "is malformed"),
        ({"connected_instance": 5}, "stored connected_instance is not a string"),
    ],
)
def test_malformed_memory_is_reported_not_raised(memory: object, problem: str) -> None:
    b = bench()
    problems = b.core.restore(memory)
    assert len(problems) == 1 and problem in problems[0] and problems[0].startswith("mk3s: ")


def test_dry_run_decides_and_logs_but_never_posts() -> None:
    b = bench(dry_run=True)
    b.add()
    b.advance(1)
    assert b.answer(CLOSED) == []
    assert b.state() == State.DRY_RUN
    assert any("would connect to " + BY_ID in m and "dry run" in m for m in b.messages())
    b.remove()
    b.add(REPLUGGED, enumerated=True)
    b.advance(0)
    stuck = view("Opening serial connection")
    b.answer(stuck)
    b.advance(STUCK_AFTER)
    assert b.answer(stuck) == []
    assert not any(isinstance(r, (Connect, Disconnect)) for r in b.requests)


# --- polled printers: ports that never vanish ------------------------------------

TIMEOUTS = "Too many consecutive timeouts, printer still connected and alive?"


def test_polled_printer_is_watched_every_poll_period_quietly() -> None:
    b = bench(poll=30)
    b.add()
    b.connect_until_operational()
    connected_at = b.core.decided_at
    for _ in range(5):
        assert b.advance(29.9) == []
        assert b.advance(0.1) == [ReadHost()]
        assert b.answer(OPERATIONAL) == []
    assert b.connects() == [Connect(BY_ID, 115200, None)]
    assert not [m for m in b.messages() if "leave" in m], "watching is not news"
    assert b.core.decided_at == connected_at, "the status keeps when it was decided"


def test_event_driven_printer_is_not_watched() -> None:
    b = bench()
    b.add()
    b.connect_until_operational()
    assert b.core.deadline is None
    assert b.advance(86400) == []


def test_polled_printer_switched_off_behind_a_powered_chip_is_retried_until_it_answers() -> None:
    b = bench(poll=30)
    b.add()
    b.connect_until_operational()
    # Switched off: the node stays, OctoPrint times out and closes. No udev event.
    assert b.advance(30) == [ReadHost()]
    assert b.answer(view(error=TIMEOUTS)) == [Connect(BY_ID, 115200, None)]
    starts = [b.now]
    for _ in range(5):  # each attempt ends "Offline" with no error: not a Disconnect
        b.done()
        assert b.advance(60) == [ReadHost()]
        assert b.answer(view("Connecting")) == []
        assert b.advance(60) == [ReadHost()]
        assert b.answer(CLOSED) == []
        assert b.core.holds == [], "the end of our own attempt is not the user's Disconnect"
        assert b.advance(RETRY_CAP) == [ReadHost()]
        assert isinstance(b.answer(CLOSED)[0], Connect)
        starts.append(b.now)
    gaps = [round(later - earlier) for earlier, later in zip(starts, starts[1:])]
    # the attempt's own two looks (0.5 s each) plus the backoff from poll to the cap
    assert gaps == [round(1.0 + retry_delay(n, 30)) for n in range(1, 6)]
    assert b.core.state == State.CONNECTING, "a polled printer never gives up"
    # Switched on: the attempt in progress reaches Operational.
    b.done()
    assert b.advance(1) == [ReadHost()]
    assert b.answer(OPERATIONAL) == []
    assert b.core.attempts == 0
    assert len(b.messages(logging.WARNING)) == 1, "a run of failures is logged once"


def test_polled_printer_respects_a_disconnect_and_sees_the_user_connect_again() -> None:
    b = bench(poll=30)
    b.add()
    b.connect_until_operational()
    assert b.advance(30) == [ReadHost()]
    assert b.answer(CLOSED) == [], "the user disconnected"
    assert b.state() == State.HELD
    for _ in range(3):
        assert b.advance(30) == [ReadHost()]
        assert b.answer(CLOSED) == []
    assert b.advance(30) == [ReadHost()]
    assert b.answer(OPERATIONAL) == [], "the user connected: hands off, hold ends"
    assert b.core.holds == []
    assert len(b.connects()) == 1


# --- the first look skips /api/job: no error may change its decision --------------

# Every kind of error a closed OctoPrint can show, and the states around a closure.
ERRORS = (None, VANISHED, THERMAL, TIMEOUTS, UNNAMED_ERROR, "Something nobody has seen before")
ANSWERS: tuple[ReadResult, ...] = (
    *(view(error=e) for e in ERRORS),
    *(view("Offline after error", error=e) for e in ERRORS),
    OPERATIONAL,
    view("Printing", port=BY_ID),
    view("Connecting", port=BY_ID),
    view("Opening serial connection", port=BY_ID),
    view(ports=("/dev/ttyS0",)),
    Unreachable("connection refused"),
    Refused(403, "API key rejected or lacking permission", key_rejected=True),
)
COMMAND_RESULTS: tuple[CommandResult, ...] = (
    Accepted(),
    Refused(400, "port is invalid"),
    Unreachable("no answer within 10 s"),
)


def _same_decision_whatever_the_error(core: PrinterCore, now: float, answer: HostView) -> None:
    """Given a core that asked without the job, check that every error OctoPrint could
    have shown leads to the decision the errorless answer leads to."""
    decisions = set()
    for error in ERRORS:
        twin = copy.deepcopy(core)
        actions = twin.host_read(replace(answer, error=error), now)
        decisions.add((repr(actions), twin.state, repr(twin.holds), twin.deadline))
    assert len(decisions) == 1, f"the error changes the decision after {answer}: {decisions}"


@pytest.mark.parametrize("seed", range(40))
def test_a_look_without_the_job_is_never_one_an_error_could_change(seed: int) -> None:
    """Random walks through events, answers and time; at every look asked without
    /api/job, each error is fed to copies of the core and must not matter."""
    rng = random.Random(seed)
    b = bench(poll=rng.choice((0, 30)))
    instance = 1000
    looks_without_job = 0
    pending: Action | None = None
    for _ in range(200):
        if pending is None:
            move = rng.random()
            if move < 0.15:
                instance += 1
                if b.core.device is not None and rng.random() < 0.8:
                    b.remove()
                b.add(replace(DEVICE, instance=str(instance)), enumerated=rng.random() < 0.1)
            elif move < 0.2 and b.core.device is not None:
                b.remove()
            elif move < 0.25:
                b.core.reconcile(b.now, "reload")
            actions = b.advance(rng.choice((0.5, 1, 5, 30, 300)))
            pending = actions[-1] if actions else None
            continue
        if isinstance(pending, ReadHost):
            answer = rng.choice(ANSWERS)
            if not pending.detail and isinstance(answer, HostView):
                looks_without_job += 1
                _same_decision_whatever_the_error(b.core, b.now, answer)
            actions = b.answer(answer)
        else:
            actions = b.done(rng.choice(COMMAND_RESULTS))
        pending = actions[-1] if actions else None
    assert looks_without_job > 0, "the walk never reached a look without the job"


def test_a_restart_during_the_settle_window_still_sees_the_return() -> None:
    """Stopped (kill -9, a reload that rebuilds the core) after the device came back but
    before reconnectd looked: OctoPrint 2.0 still shows the vanished device's unnamed
    error, which must read as stale, not as a firmware stop."""
    b = connected_bench()
    b.remove()
    b.add(REPLUGGED)
    memory = b.core.memory()  # as stored when the device came back
    restarted = bench()
    restarted.core.restore(memory)
    restarted.add(REPLUGGED, enumerated=True)
    assert restarted.advance(0) == [FIRST_LOOK]
    assert restarted.answer(view(error=UNNAMED_ERROR)) == [Connect(BY_ID, 115200, None)]
    assert restarted.core.holds == []


# --- zero config: only a device known to be the printer -----------------------


def test_zero_config_leaves_a_board_nothing_vouches_for_once_and_quietly_after() -> None:
    b = bench(only_known_devices=True)
    b.add()
    b.advance(1)
    assert b.answer(view(port_preference="AUTO")) == []
    assert b.state() == State.UNKNOWN_DEVICE
    assert b.core.deadline is None, "no request while nothing happens"
    warnings = b.messages(logging.WARNING)
    assert len(warnings) == 1 and "`reconnectd devices`" in warnings[0]
    b.core.reconcile(b.now, "reload")
    b.advance(0)
    b.answer(view(port_preference="AUTO"))
    assert len(b.messages(logging.WARNING)) == 1
    assert b.connects() == []


@pytest.mark.parametrize("preference", [NODE, BY_ID])
def test_zero_config_connects_the_board_octoprint_saved_as_its_port(preference: str) -> None:
    b = bench(only_known_devices=True)
    b.add()
    b.advance(1)
    assert b.answer(view(port_preference=preference)) == [Connect(BY_ID, 115200, None)]


def test_zero_config_remembers_a_board_seen_running_as_a_printer_across_a_restart() -> None:
    b = bench(only_known_devices=True)
    b.add()
    b.advance(1)
    b.answer(view(port_preference=NODE))
    b.done()
    b.advance(1)
    b.answer(OPERATIONAL)
    memory = b.core.memory()
    assert memory["known_devices"] == ["2c99:0002:CZPX"]
    again = bench(only_known_devices=True)
    assert again.core.restore(memory) == []
    again.add(REPLUGGED, enumerated=True)
    again.advance(0)
    assert again.answer(view(port_preference=None)) == [Connect(BY_ID, 115200, None)]


def test_a_connection_on_another_port_does_not_vouch_for_the_device() -> None:
    b = bench(only_known_devices=True)
    b.add()
    b.advance(1)
    b.answer(view("Operational", port="/dev/ttyUSB7"))
    assert "known_devices" not in b.core.memory()


def test_the_stuck_time_and_the_backoff_are_the_printers_settings() -> None:
    b = bench(stuck_after=3.0, retry_first=1.0, retry_cap=4.0)
    b.add()
    b.advance(1)
    b.answer(CLOSED)
    b.done()
    opened = b.now
    while not any(isinstance(r, Disconnect) for r in b.requests):
        b.advance(1)
        b.answer(view("Opening serial connection"))
    assert b.now - opened == pytest.approx(3.0, abs=0.51), "recovered after stuck_after"
    assert [retry_delay(n, 0, 1.0, 4.0) for n in range(1, 5)] == [1.0, 2.0, 4.0, 4.0]


def test_an_outage_is_said_once_even_when_the_device_comes_and_goes_meanwhile() -> None:
    b = bench()
    down = Unreachable("connection refused")
    b.add()
    b.advance(1)
    b.answer(down)
    b.add(DEVICE)  # udev announces it again
    b.advance(1)
    b.answer(down)
    b.remove()
    b.add(REPLUGGED)  # switched off and on during the outage
    b.advance(1)
    b.answer(down)
    warnings = [m for m in b.messages(logging.WARNING) if "cannot reach OctoPrint" in m]
    assert len(warnings) == 1, warnings
    assert b.state() == State.UNREACHABLE


def test_an_outage_that_changes_its_words_is_said_once_and_shown_as_it_is_now() -> None:
    # OctoPrint restarting refuses connections, then its placeholder server resets them.
    b = bench()
    b.add()
    b.advance(1)
    b.answer(Unreachable("connection refused"))
    b.advance(1)
    b.answer(Unreachable("cannot connect: Connection reset by peer"))
    assert [m for m in b.messages(logging.WARNING) if "cannot reach" in m] == [
        "mk3s: wait: cannot reach OctoPrint: connection refused; will keep trying"
    ]
    assert b.core.reason == "cannot reach OctoPrint: cannot connect: Connection reset by peer"
    # A key rejected is another outage, for a person: said.
    b.advance(2)
    b.answer(Refused(403, "API key rejected or lacking permission", key_rejected=True))
    assert any("OctoPrint refused: HTTP 403" in m for m in b.messages(logging.ERROR))
