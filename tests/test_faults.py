"""Fault injection: the real reconnectd process under the faults of issue 5, one test each.

Every test runs the real daemon (``tests/support/daemon_process.py``) on a umockdev
testbed (real libudev) with each printer on its own :class:`FakeOctoPrint` (checked
against the real OctoPrint in ``test_fake_octoprint.py``), injects one fault, and
asserts four things: the daemon stays up (or exits as documented), no hold is lost
(printer ``b`` is held after a manual Disconnect before every fault and must still be
held after it), no connect is sent that the rules forbid (the fakes count every POST),
and it recovers when the fault ends (printer ``a``, switched off and on during the
fault, is connected once, and only then).

Each test also fills its row of the fault table (docs/faults.md) with what this run saw.
``RECONNECTD_FAULT_REPORT=PATH pytest tests/test_faults.py`` writes that table to
PATH as Markdown. The module runs in CI with the rest of the suite (``bash tests/run``),
in about a minute; ``RECONNECTD_FAULTS_FULL=1`` makes the long form (outages until the
retry backoff reaches its cap, a storm of 10,000 uevents in ten seconds: ~7 minutes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import requests

from tests.support import lossy_monitor
from tests.support.daemon_process import DaemonProcess
from tests.support.fake_octoprint import (
    FAULT_500,
    FAULT_HTML,
    FAULT_REFUSE,
    FAULT_SLOW,
    OPERATIONAL,
    FakeOctoPrint,
    Post,
    ports_under,
    printer_under,
)
from tests.support.printers import SimulatedPrinters
from tests.support.real import missing
from tests.support.testbed import Plugged, Testbed, unavailable_reason

pytestmark = [pytest.mark.faults, pytest.mark.umockdev]

REPORT_ENV = "RECONNECTD_FAULT_REPORT"
# The long form: outages that last until the retry backoff nears its cap, a storm ten
# times as long. CI runs the quick form.
FULL = os.environ.get("RECONNECTD_FAULTS_FULL") == "1"
# Reads of a's OctoPrint that fail before the fault ends: after a came back, after the
# reload, then at least one retry after the backoff (1 s, 2 s, 4 s ...).
FAILED_READS = 7 if FULL else 3
STORM_SECONDS = 10 if FULL else 1  # 1,000 uevents per second
SETTLE = 0.3
TIMEOUT = 1.0  # the daemon's per-request timeout ([octoprint] timeout)
SLOW_BY = 3 * TIMEOUT  # how late the slow OctoPrint answers
# Only how long a failure takes to be reported; the rules set the pace. The long form
# waits out a retry backoff at its cap (30 s) and a refused key's (60 s).
WAIT = 90.0 if FULL else 20.0
QUIET = 1.0  # watched after the last expected connect for one that should not come
POLL = 0.02
HELD = "holding after manual disconnect"
MANUAL_HOLD = "manual disconnect: disconnected in OctoPrint"
REPO = Path(__file__).resolve().parents[1]


# --- the fault table -------------------------------------------------------------


@dataclass
class Row:
    """One row of the fault table: what is injected, and what this run saw."""

    fault: str
    injected: str
    did: list[str] = field(default_factory=list)
    result: str = "not run"

    def saw(self, text: str) -> None:
        self.did.append(text)


ROWS: dict[str, Row] = {
    FAULT_REFUSE: Row(
        "OctoPrint refuses connections",
        "the fake closes its listening socket and every open connection "
        "(`set_fault('refuse')`), then listens on the same port again",
    ),
    FAULT_500: Row(
        "OctoPrint answers 500",
        "the fake answers every request with status 500 and an HTML error page",
    ),
    FAULT_HTML: Row(
        "OctoPrint answers HTML instead of JSON",
        "the fake answers every request with 200 and an HTML sign-in page (a proxy in front)",
    ),
    FAULT_SLOW: Row(
        "OctoPrint answers slower than the request timeout",
        f"the fake holds every request {SLOW_BY:g} s; the daemon's `timeout` is {TIMEOUT:g} s",
    ),
    "403": Row(
        "OctoPrint answers 403 (key revoked)",
        "the fake's key is replaced: the daemon's key gets 403 (GET) / 400 CSRF (POST), as "
        "from the real one; the fault ends when the new key is in the key file and SIGHUP",
    ),
    "enobufs": Row(
        "netlink overflow (ENOBUFS)",
        "**injected at the pyudev seam because umockdev cannot overflow** (its netlink is a "
        "unix datagram socket: a full queue fails the sender, never the receiver): "
        "`tests/support/lossy_monitor.py` wraps the real monitor in the daemon, throws "
        "4 real uevents away and raises `OSError(ENOBUFS)`; re-enumeration is real libudev",
    ),
    "sighup": Row(
        "SIGHUP with a broken config",
        "the config file gets a wrong type and an unknown key, then SIGHUP; later the "
        "fixed file and SIGHUP again",
    ),
    "kill9": Row(
        "`kill -9` and restart in a settle window",
        "`a` (held) switched off and on with `settle = 3`; SIGKILL while it settles; "
        "the daemon started again on the same state directory",
    ),
    "status-dir": Row(
        "status file directory not writable",
        "a read-only tmpfs mounted on `$RUNTIME_DIRECTORY` (root ignores chmod); "
        "later remounted read-write",
    ),
    "storm": Row(
        "event storm: 1,000 uevents in one second",
        f"`a` switched off and on, then {1000 * STORM_SECONDS:,} uevents paced at 1 ms: "
        "`a` remove/add, `b` "
        "change, a GPS receiver change; `WATCHDOG_USEC=2000000`",
    ),
}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_table(rows: list[Row]) -> str:
    """Given the rows, return the fault table in Markdown."""
    lines = [
        "| fault | injected, and how | what the daemon did (this run) | result |",
        "|---|---|---|---|",
    ]
    for row in rows:
        did = "; ".join(row.did) or "-"
        lines.append(
            f"| {_cell(row.fault)} | {_cell(row.injected)} | {_cell(did)} | {row.result} |"
        )
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module", autouse=True)
def fault_report() -> Iterator[None]:
    """Write the table to $RECONNECTD_FAULT_REPORT once the module has run."""
    yield
    target = os.environ.get(REPORT_ENV)
    if target:
        Path(target).write_text(render_table(list(ROWS.values())))


def start_row(key: str) -> Row:
    row = ROWS[key]
    row.did.clear()
    row.result = "**FAIL**"  # until the test's last assertion passed
    return row


# --- the rig: a testbed, printers on fake OctoPrints, the daemon -----------------------


@dataclass
class Printer:
    """One printer: its name, serial, hub port, OctoPrint and (while on) its device."""

    name: str
    serial: str
    usb_port: str
    fake: FakeOctoPrint
    key_file: Path
    plugged: Plugged | None = None

    @property
    def by_id(self) -> str:
        assert self.plugged is not None and self.plugged.by_id is not None
        return self.plugged.by_id

    def connects(self) -> list[Post]:
        """Every connect POST the fake received, whatever it answered."""
        return [post for post in self.fake.posts if post.command == "connect"]


@dataclass
class Rig:
    testbed: Testbed
    simulated: SimulatedPrinters
    workdir: Path
    printers: dict[str, Printer]

    def switch_on(self, printer: Printer) -> None:
        """The printer's USB device appears (a new node each time, as the kernel does)."""
        printer.plugged, _ = self.simulated.switch_on(
            printer.serial, usb_port=printer.usb_port, firmware=False
        )

    def switch_off(self, printer: Printer) -> None:
        assert printer.plugged is not None
        self.simulated.switch_off(printer.plugged)
        printer.plugged = None

    def power_cycle(self, printer: Printer) -> None:
        self.switch_off(printer)
        self.switch_on(printer)

    def config(self, *, settle: float = SETTLE) -> str:
        text = f"[octoprint]\ntimeout = {TIMEOUT:g}\n"
        for printer in self.printers.values():
            text += (
                f'\n[[printer]]\nname = "{printer.name}"\nvendor_id = "2c99"\n'
                f'product_id = "0002"\nserial = "{printer.serial}"\nsettle = {settle:g}\n'
                f'[printer.octoprint]\nurl = "{printer.fake.url}"\n'
                f'api_key_file = "{printer.key_file}"\n'
            )
        return text

    def daemon(
        self,
        *,
        settle: float = SETTLE,
        env: dict[str, str] | None = None,
        command: list[str] | None = None,
        watchdog_usec: int | None = None,
    ) -> DaemonProcess:
        return DaemonProcess(
            self.workdir / "daemon",
            self.config(settle=settle),
            env={**self.testbed.env, **(env or {})},
            command=command,
            watchdog_usec=watchdog_usec,
        )


@pytest.fixture
def make_rig(tmp_path: Path) -> Iterator[Callable[..., Rig]]:
    """Yield a function that builds the rig for printers named ``names``."""
    reason = unavailable_reason()
    if reason is not None:
        missing(f"umockdev testbed unavailable: {reason}")
    with contextlib.ExitStack() as stack:

        def make(*names: str) -> Rig:
            testbed = stack.enter_context(Testbed(tmp_path / "testbed"))
            simulated = SimulatedPrinters(testbed)
            stack.callback(simulated.clear)
            printers = {}
            for index, name in enumerate(names, start=1):
                fake = stack.enter_context(
                    FakeOctoPrint(ports_under(testbed.root), printer_under(testbed.root))
                )
                key_file = tmp_path / f"{name}.key"
                key_file.write_text(fake.api_key + "\n")
                key_file.chmod(0o600)
                printers[name] = Printer(name, f"FAULT{index:04d}", f"1-{index}", fake, key_file)
            return Rig(testbed, simulated, tmp_path, printers)

        yield make


# --- waiting and looking ---------------------------------------------------------------


def wait_for(what: str, check: Callable[[], bool], daemon: DaemonProcess) -> None:
    """Poll ``check`` (other processes' effects: no clock to advance) until it holds."""
    deadline = time.monotonic() + WAIT
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what}: not within {WAIT:g} s; status {daemon.status()}\n"
                f"--- reconnectd log (tail) ---\n{daemon.log()[-6000:]}"
            )
        time.sleep(POLL)


def state_of(daemon: DaemonProcess, printer: Printer) -> object:
    return daemon.printer(printer.name).get("state")


def stored_holds(daemon: DaemonProcess, printer: Printer) -> list[str]:
    """The kinds of the printer's holds in the state file (what survives a restart)."""
    printers = daemon.held_state()["printers"]
    assert isinstance(printers, dict)
    return [str(hold["kind"]) for hold in printers[printer.name]["holds"]]


def log_lines(daemon: DaemonProcess, text: str) -> list[str]:
    return [line for line in daemon.log().splitlines() if text in line]


def connect_all(rig: Rig, daemon: DaemonProcess) -> None:
    """Wait until every printer that is on was connected once and reconnectd saw it."""
    on = [p for p in rig.printers.values() if p.plugged is not None]
    wait_for(
        "every printer connected at start",
        lambda: all(
            state_of(daemon, p) == "operational" and p.fake.state == OPERATIONAL for p in on
        ),
        daemon,
    )
    for printer in on:
        assert [c.port for c in printer.connects()] == [printer.by_id], printer.name


def disconnect_manually(daemon: DaemonProcess, printer: Printer) -> None:
    """The user clicks Disconnect for ``printer``; a reload makes reconnectd look."""
    answer = requests.post(
        f"{printer.fake.url}/api/connection",
        json={"command": "disconnect"},
        headers={"X-Api-Key": printer.fake.api_key},
        timeout=5,
    )
    assert answer.status_code == 204
    daemon.signal(signal.SIGHUP)
    wait_for(f"{printer.name} held", lambda: state_of(daemon, printer) == HELD, daemon)
    assert stored_holds(daemon, printer) == ["manual"]


def assert_still_held(daemon: DaemonProcess, printer: Printer, connects: int = 1) -> None:
    """The hold is in the status and in the state file, and no connect was sent for it."""
    row = daemon.printer(printer.name)
    assert row["holds"] == [MANUAL_HOLD], row
    assert stored_holds(daemon, printer) == ["manual"]
    assert len(printer.connects()) == connects, printer.fake.posts


def quiet_period(daemon: DaemonProcess) -> None:
    """Let a connect that should not come have the time to come."""
    time.sleep(QUIET)
    assert daemon.running(), daemon.log()[-3000:]


def stop_cleanly(daemon: DaemonProcess) -> None:
    assert daemon.stop() == 0
    assert "Traceback" not in daemon.log()


# --- OctoPrint faults ------------------------------------------------------------------


def unreachable_for(fault: str, url: str) -> str:
    """Why the HTTP client finds OctoPrint unreachable under the fault (not for 403)."""
    what = {
        FAULT_REFUSE: "connection refused",
        FAULT_500: "HTTP 500",
        FAULT_HTML: "answer is not JSON (text/html)",
        FAULT_SLOW: f"no answer within {TIMEOUT:g} s",
    }[fault]
    return f"{what} (GET {url}/api/connection)"


def reason_for(fault: str, url: str) -> str:
    """The reason reconnectd gives for the fault, as its status and log show it."""
    if fault == "403":
        return "OctoPrint refused: HTTP 403: API key rejected or lacking permission"
    return f"cannot reach OctoPrint: {unreachable_for(fault, url)}"


def assert_fault_in_force(fault: str, fake: FakeOctoPrint, old_key: str) -> None:
    """Check from outside that the fake now misbehaves as the fault says."""
    url = f"{fake.url}/api/connection"
    headers = {"X-Api-Key": old_key}
    if fault == FAULT_REFUSE:
        with pytest.raises(requests.ConnectionError, match="Connection refused"):
            requests.get(url, headers=headers, timeout=5)
    elif fault == FAULT_SLOW:
        with pytest.raises(requests.Timeout):
            requests.get(url, headers=headers, timeout=TIMEOUT)
    else:
        answer = requests.get(url, headers=headers, timeout=5)
        expected = {FAULT_500: 500, FAULT_HTML: 200, "403": 403}[fault]
        assert answer.status_code == expected
        if fault != "403":
            assert answer.headers["Content-Type"].startswith("text/html")


def failed_reads(fault: str, daemon: DaemonProcess, printer: Printer) -> int:
    """How many reads of the printer's OctoPrint failed (for 403: of either printer's)."""
    if fault == "403":
        # The client's line names no URL; no 403 came before the key was revoked.
        return len(log_lines(daemon, "DEBUG: GET /api/connection: HTTP 403"))
    return len(log_lines(daemon, f"unreachable: {unreachable_for(fault, printer.fake.url)}"))


@pytest.mark.parametrize("fault", [FAULT_REFUSE, FAULT_500, FAULT_HTML, FAULT_SLOW, "403"])
def test_octoprint_fault_loses_no_hold_sends_no_connect_and_recovers(
    fault: str, make_rig: Callable[..., Rig]
) -> None:
    row = start_row(fault)
    rig = make_rig("a", "b")
    a, b = rig.printers["a"], rig.printers["b"]
    rig.switch_on(a)
    rig.switch_on(b)
    with rig.daemon() as daemon:
        connect_all(rig, daemon)
        disconnect_manually(daemon, b)

        # The fault begins; a is switched off and on meanwhile, and a reload makes
        # reconnectd look at b's OctoPrint too.
        old_keys = {p.name: p.fake.api_key for p in (a, b)}
        posts = {p.name: len(p.fake.posts) for p in (a, b)}
        for printer in (a, b):
            if fault == "403":
                printer.fake.api_key = f"new-key-for-{printer.name}"
            else:
                printer.fake.set_fault(fault, slow_by=SLOW_BY)
            assert_fault_in_force(fault, printer.fake, old_keys[printer.name])
        began = time.monotonic()
        rig.power_cycle(a)
        outage_state = "key rejected" if fault == "403" else "octoprint unreachable"
        wait_for(f"a {outage_state}", lambda: state_of(daemon, a) == outage_state, daemon)
        daemon.signal(signal.SIGHUP)
        wait_for(f"b {outage_state}", lambda: state_of(daemon, b) == outage_state, daemon)
        # A refused key is looked at again only after 60 s: the quick form does not wait
        # for it (reads: a's after it came back, a's and b's after the reload).
        needed = (5 if FULL else 3) if fault == "403" else FAILED_READS
        wait_for(
            f"{needed} failed reads of a's OctoPrint",
            lambda: failed_reads(fault, daemon, a) >= needed,
            daemon,
        )
        reads = failed_reads(fault, daemon, a)
        during = time.monotonic() - began

        assert daemon.running()
        reason = reason_for(fault, a.fake.url)
        assert daemon.printer("a")["reason"] == f"{reason}; will keep trying"
        assert len(log_lines(daemon, f"a: wait: {reason}")) == 1, "logged once, not per retry"
        assert_still_held(daemon, b)
        for printer in (a, b):
            assert len(printer.fake.posts) == posts[printer.name], "no POST during the fault"
        what = "reads refused (`a`, `b`)" if fault == "403" else "failed reads of `a`'s OctoPrint"
        row.saw(
            f"stayed up; {reads} {what} in {during:.1f} s, logged once: "
            f"`a: wait: {reason_for(fault, 'URL')}`; 0 POSTs to either OctoPrint; "
            f"`b` still held (status and state file)"
        )

        # The fault ends.
        if fault == "403":
            for printer in (a, b):
                printer.key_file.write_text(printer.fake.api_key + "\n")
            daemon.signal(signal.SIGHUP)
        else:
            for printer in (a, b):
                printer.fake.set_fault(None)
        ended = time.monotonic()
        wait_for("a connected again", lambda: len(a.connects()) == 2, daemon)
        wait_for("a Operational", lambda: state_of(daemon, a) == "operational", daemon)
        wait_for("b looked at and held", lambda: state_of(daemon, b) == HELD, daemon)
        quiet_period(daemon)

        back = a.connects()[1]
        assert (back.port, back.status) == (a.by_id, 204)
        assert daemon.printer("a")["reason"] == "OctoPrint is Operational"
        assert_still_held(daemon, b)
        how = "the new key and SIGHUP" if fault == "403" else "the fault ended"
        row.saw(
            f"`a` connected once, {back.at - ended:.1f} s after {how}, to its new by-id link; "
            "`b` still held, never connected"
        )
        stop_cleanly(daemon)
    row.result = "pass"


# --- udev: a netlink overflow ----------------------------------------------------------


def test_netlink_overflow_is_noticed_and_recovered_by_re_enumerating(
    make_rig: Callable[..., Rig],
) -> None:
    row = start_row("enobufs")
    rig = make_rig("a", "b", "c")
    a, b, c = rig.printers["a"], rig.printers["b"], rig.printers["c"]
    for printer in (a, b, c):
        rig.switch_on(printer)
    control = rig.workdir / "lose-events"
    daemon = rig.daemon(
        env={lossy_monitor.CONTROL_ENV: str(control)},
        command=[sys.executable, str(Path(lossy_monitor.__file__))],
    )
    with daemon:
        connect_all(rig, daemon)
        disconnect_manually(daemon, a)
        disconnect_manually(daemon, b)
        old_a, old_c = a.plugged, c.plugged
        assert old_a is not None and old_c is not None

        # Four uevents are lost: a off, a on, c off, and a change for b sent once c's
        # sysfs is gone (udevd broadcasts an event only after the kernel's change; the
        # testbed sends a remove before it deletes the device). Receiving it fails.
        lossy_monitor.arm(control, 4)
        rig.power_cycle(a)
        rig.switch_off(c)
        assert b.plugged is not None
        rig.testbed.send_uevent(b.plugged, "change")
        wait_for("the overflow noticed", lambda: "ENOBUFS after 4 lost" in daemon.log(), daemon)
        wait_for("a connected again", lambda: len(a.connects()) == 2, daemon)
        wait_for("a Operational", lambda: state_of(daemon, a) == "operational", daemon)
        wait_for("c gone", lambda: state_of(daemon, c) == "absent", daemon)
        quiet_period(daemon)

        lost = [line.split("lost ", 1)[1] for line in log_lines(daemon, "lossy monitor: lost ")]
        assert a.plugged is not None
        assert lost == [
            f"remove {old_a.devpath}",
            f"add {a.plugged.devpath}",
            f"remove {old_c.devpath}",
            f"change {b.plugged.devpath}",
        ]
        warning = (
            "WARNING: udev events were lost (the event socket's receive buffer overflowed); "
            "re-read the present devices: 2 gone, 1 new"
        )
        assert len(log_lines(daemon, warning)) == 1
        assert log_lines(daemon, "INFO: a: holds released: the device vanished")
        assert a.connects()[1].port == a.by_id
        assert daemon.printer("a")["device"] == a.plugged.node
        assert_still_held(daemon, b)
        assert len(c.connects()) == 1 and c.fake.state != OPERATIONAL
        row.saw(
            "4 uevents thrown away, then ENOBUFS; logged one warning (`udev events were lost "
            "...; re-read the present devices: 2 gone, 1 new`); `a` (held, off and on unseen) "
            "released and connected once to its new node; `c` (off unseen) absent, not "
            "connected; `b` still held"
        )

        # It carries on: the next event is heard as usual.
        rig.switch_on(c)
        wait_for("c connected", lambda: len(c.connects()) == 2, daemon)
        wait_for("c Operational", lambda: state_of(daemon, c) == "operational", daemon)
        assert len(log_lines(daemon, "udev events were lost")) == 1
        row.saw("then `c` switched on: heard and connected as usual")
        stop_cleanly(daemon)
    row.result = "pass"


# --- configuration, signals, restarts --------------------------------------------------


def test_sighup_with_a_broken_config_keeps_the_old_one(make_rig: Callable[..., Rig]) -> None:
    row = start_row("sighup")
    rig = make_rig("a", "b")
    a, b = rig.printers["a"], rig.printers["b"]
    rig.switch_on(a)
    rig.switch_on(b)
    with rig.daemon() as daemon:
        connect_all(rig, daemon)
        disconnect_manually(daemon, b)
        good = daemon.config_path.read_text()

        broken = good.replace(f"settle = {SETTLE:g}", 'settle = "soon"', 1)
        daemon.config_path.write_text(broken + "colour = 3\n")
        seen = len(daemon.notifications)
        daemon.signal(signal.SIGHUP)
        wait_for(
            "the reload refused",
            lambda: bool(log_lines(daemon, "the new config is invalid; keeping the old one")),
            daemon,
        )
        errors = [line.split(" ERROR: ", 1)[1] for line in log_lines(daemon, " ERROR: reload: ")]
        path = daemon.config_path
        assert len(errors) == 3, errors
        assert errors[0] == (
            f'reload: {path}: printer[0].settle: expected a number of seconds, got "soon"'
        )
        assert errors[1].startswith(
            f'reload: {path}: printer[1].octoprint.colour: unknown key "colour"'
        )
        assert errors[2] == "reload: the new config is invalid; keeping the old one"
        assert not any(m.startswith("RELOADING=1") for m in daemon.notifications[seen:])

        # The old config goes on working: a switched off and on is connected, b held.
        rig.power_cycle(a)
        wait_for("a connected again", lambda: len(a.connects()) == 2, daemon)
        wait_for("a Operational", lambda: state_of(daemon, a) == "operational", daemon)
        quiet_period(daemon)
        assert daemon.running()
        assert_still_held(daemon, b)
        row.saw(
            f"stayed up; logged {len(errors)} errors naming file and key, then `reload: the "
            "new config is invalid; keeping the old one`; no RELOADING=1; `a` switched off and "
            "on: connected once; `b` still held"
        )

        # The fault ends: a fixed file is loaded on the next SIGHUP.
        daemon.config_path.write_text(good.replace(f"settle = {SETTLE:g}", "settle = 0.2", 1))
        daemon.signal(signal.SIGHUP)
        daemon.wait_for_notification(lambda m: m.startswith("RELOADING=1"))
        daemon.wait_for_notification(lambda m: m.startswith("READY=1"))
        wait_for("b looked at and held", lambda: state_of(daemon, b) == HELD, daemon)
        quiet_period(daemon)
        assert_still_held(daemon, b)
        assert len(a.connects()) == 2
        row.saw("fixed file + SIGHUP: RELOADING=1, READY=1, `b` still held, nothing sent")
        stop_cleanly(daemon)
    row.result = "pass"


def test_kill_9_in_a_settle_window_then_restart_decides_the_same(
    make_rig: Callable[..., Rig],
) -> None:
    row = start_row("kill9")
    rig = make_rig("a", "b")
    a, b = rig.printers["a"], rig.printers["b"]
    rig.switch_on(a)
    rig.switch_on(b)
    settle = 3.0
    first = rig.daemon(settle=settle)
    with first:
        connect_all(rig, first)
        disconnect_manually(first, a)
        disconnect_manually(first, b)

        # a is switched off and on (its hold ends); killed while a settles.
        rig.power_cycle(a)
        plugged_at = time.monotonic()
        wait_for("a settling", lambda: state_of(first, a) == "settling", first)
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert first.wait_exit() == -signal.SIGKILL
        assert killed_at - plugged_at < settle, "killed inside the settle window"
        assert len(a.connects()) == 1 and len(b.connects()) == 1, "nothing sent before the kill"
        stored = {p.name: stored_holds(first, p) for p in (a, b)}
        assert stored["b"] == ["manual"]

    second = rig.daemon(settle=settle)  # the same directories: systemd's restart
    with second:
        wait_for("a connected again", lambda: len(a.connects()) == 2, second)
        wait_for("a Operational", lambda: state_of(second, a) == "operational", second)
        wait_for("b held", lambda: state_of(second, b) == HELD, second)
        quiet_period(second)
        assert a.connects()[1].port == a.by_id
        assert_still_held(second, b)
        decision = log_lines(second, "INFO: a: connect: ")[-1].split("INFO: a: connect: ")[1]
        row.saw(
            f"SIGKILL {killed_at - plugged_at:.1f} s into a {settle:g} s window, nothing sent "
            f"(state file: a {', '.join(stored['a']) or 'no hold'}, b {', '.join(stored['b'])}); "
            f"restarted: `a` connected once (`{decision.split(':')[0]}`) to its new by-id "
            "link, `b` held by the stored hold, not connected"
        )
        stop_cleanly(second)
    row.result = "pass"


# --- the status file's directory is read-only -----------------------------------------


@contextlib.contextmanager
def read_only_tmpfs(path: Path) -> Iterator[Callable[[], None]]:
    """Mount a read-only tmpfs on ``path``; yield a function that makes it writable."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        missing("root, to mount a read-only tmpfs (as root, chmod does not stop a write)")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m,mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs: {done.stderr.strip()}")

    def make_writable() -> None:
        subprocess.run(["mount", "-o", "remount,rw", str(path)], check=True)

    try:
        yield make_writable
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True, check=False)


def reconnectd_status(daemon: DaemonProcess) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RUNTIME_DIRECTORY": str(daemon.runtime_dir), "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "reconnectd", "status", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_status_directory_not_writable(make_rig: Callable[..., Rig]) -> None:
    row = start_row("status-dir")
    rig = make_rig("a", "b")
    a, b = rig.printers["a"], rig.printers["b"]
    rig.switch_on(a)
    rig.switch_on(b)
    # Pinged every 0.5 s, as systemd's WatchdogSec=30 pings every 15 s: the loop
    # wakes up with nothing else to do, and writes the status file again then.
    daemon = rig.daemon(watchdog_usec=1_000_000)
    status_file = daemon.runtime_dir / "status.json"
    with read_only_tmpfs(daemon.runtime_dir) as make_writable, daemon:
        wait_for(
            "both Operational",
            lambda: _last_status(daemon) == "STATUS=a: operational · b: operational",
            daemon,
        )
        assert len(a.connects()) == len(b.connects()) == 1
        requests.post(
            f"{b.fake.url}/api/connection",
            json={"command": "disconnect"},
            headers={"X-Api-Key": b.fake.api_key},
            timeout=5,
        )
        daemon.signal(signal.SIGHUP)
        wait_for("b held", lambda: f"b: {HELD}" in _last_status(daemon), daemon)
        rig.power_cycle(a)
        wait_for("a connected again", lambda: len(a.connects()) == 2, daemon)
        wait_for(
            "a Operational again",
            lambda: len(log_lines(daemon, "INFO: a: connected: OctoPrint is Operational")) == 2,
            daemon,
        )
        quiet_period(daemon)

        assert not status_file.exists()
        failures = log_lines(daemon, "cannot write the status file")
        assert len(failures) == 1, "logged once"
        assert (
            f"WARNING: cannot write the status file {status_file}: "
            f"[Errno 30] Read-only file system: '{daemon.runtime_dir}/" in failures[0]
        )
        assert stored_holds(daemon, b) == ["manual"]
        assert len(b.connects()) == 1
        down = reconnectd_status(daemon)
        assert down.returncode == 3
        assert f"reconnectd is not running (no status file at {status_file})" in down.stderr
        row.saw(
            "stayed up and kept deciding: `a` switched off and on, connected once; `b` held "
            "(state file, `STATUS=`); logged once: `cannot write the status file ...: [Errno 30] "
            "Read-only file system`; `reconnectd status` exits 3 meanwhile"
        )

        make_writable()
        ended = time.monotonic()
        wait_for("the status file written again", status_file.exists, daemon)
        took = time.monotonic() - ended
        up = reconnectd_status(daemon)
        assert up.returncode == 0, up.stderr
        assert '"state": "operational"' in up.stdout and f'"state": "{HELD}"' in up.stdout
        assert len(log_lines(daemon, f"the status file {status_file} is written again")) == 1
        assert_still_held(daemon, b)
        assert len(a.connects()) == 2
        row.saw(
            f"remounted read-write: status file back {took:.1f} s later (next wake-up), "
            "`is written again` logged; `status --json` shows `a` operational, `b` held"
        )
        stop_cleanly(daemon)
    row.result = "pass"


def _last_status(daemon: DaemonProcess) -> str:
    lines = [m for m in daemon.notifications if m.startswith("STATUS=")]
    return lines[-1] if lines else ""


# --- an event storm --------------------------------------------------------------------


class NotifyReader:
    """Reads the daemon's sd_notify messages as they arrive, in a thread of its own."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self._daemon = daemon
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="notify-reader", daemon=True)

    def __enter__(self) -> NotifyReader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.is_set():
            _ = self._daemon.notifications  # a blocking receive: stamped as they come
            time.sleep(0.005)

    def pings(self, since: float) -> list[float]:
        """When each WATCHDOG=1 since ``since`` (monotonic) was read."""
        return [
            at
            for message, at in self._daemon.timed_notifications()
            if message == "WATCHDOG=1" and at >= since
        ]


def test_event_storm_gives_at_most_one_connect_and_the_loop_stays_responsive(
    make_rig: Callable[..., Rig],
) -> None:
    row = start_row("storm")
    rig = make_rig("a", "b")
    a, b = rig.printers["a"], rig.printers["b"]
    rig.switch_on(a)
    rig.switch_on(b)
    gps = rig.simulated.plug_other("gps", usb_port="1-9")
    watchdog = 2.0
    daemon = rig.daemon(watchdog_usec=int(watchdog * 1e6))
    with daemon:
        connect_all(rig, daemon)
        disconnect_manually(daemon, b)

        with NotifyReader(daemon) as reader:
            began = time.monotonic()
            rig.power_cycle(a)
            assert a.plugged is not None and b.plugged is not None
            storm = [
                (b.plugged, "change"),
                (gps, "change"),
                (a.plugged, "remove"),
                (a.plugged, "add"),
            ] * (250 * STORM_SECONDS)
            started = time.monotonic()
            for index, (plugged, action) in enumerate(storm):
                rig.testbed.send_uevent(plugged, action)
                ahead = started + (index + 1) * 0.001 - time.monotonic()
                if ahead > 0:
                    time.sleep(ahead)
            took = time.monotonic() - started
            wait_for("a connected again", lambda: len(a.connects()) == 2, daemon)
            wait_for("a Operational", lambda: state_of(daemon, a) == "operational", daemon)
            wait_for("b looked at and held", lambda: state_of(daemon, b) == HELD, daemon)
            quiet_period(daemon)
            ended = time.monotonic()
            pings = reader.pings(began)

        assert len(storm) == 1000 * STORM_SECONDS
        assert daemon.running()
        assert a.connects()[1].port == a.by_id
        assert a.connects()[1].at >= started + took, "connected only after the storm"
        assert_still_held(daemon, b)
        # systemd's rule: no ping for WATCHDOG_USEC and the service is killed.
        gaps = [later - earlier for earlier, later in zip([began, *pings], [*pings, ended])]
        assert max(gaps) < watchdog, gaps
        row.saw(
            f"{len(storm)} uevents sent in {took:.2f} s; `a` connected once, "
            f"{a.connects()[1].at - (started + took):.1f} s after the last; `b` "
            f"({len(storm) // 4} changes) "
            f"still held, not connected; {len(pings)} watchdog pings meanwhile, longest gap "
            f"{max(gaps):.2f} s (limit {watchdog:g} s)"
        )
        stop_cleanly(daemon)
    row.result = "pass"
