"""The real main loop, in this process: real signals, a real sd_notify socket, real
worker threads and real files. Only the two ends are stand-ins here: a pipe-backed
device source (umockdev tests cover udev) and an in-memory OctoPrint that keeps
OctoPrint's rules (end-to-end tests cover the real one).

The daemon must run in the main thread (signals are delivered there), so a driver
thread plays the scenario and ends it with SIGTERM, as systemd would.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reconnectd.config import Config, ConfigError, OctoPrintConfig, PrinterConfig, zero_config
from reconnectd.daemon import Daemon
from reconnectd.devices import Device, DeviceAdded, DeviceEvent, DeviceRemoved
from reconnectd.host import Accepted, CommandResult, ReadResult, Refused
from reconnectd.octoprint_state import octoprint_view
from reconnectd.systemd import Notifier
from tests.support.notify_socket import NotifySocket

BY_ID = "/dev/serial/by-id/usb-Prusa_MK3_CZPX1-if00"


def device(n: int, usb_port: str = "1-1") -> Device:
    """The printer (one ids and serial) as node ttyACM<n> on a USB port of the hub."""
    return Device(
        devpath=f"/devices/usb1/{usb_port}/{usb_port}:1.0/tty/ttyACM{n}",
        node=f"/dev/ttyACM{n}",
        links=(BY_ID,),
        vendor_id="2c99",
        product_id="0002",
        serial="CZPX1",
        instance=f"inst-{usb_port}-{n}",
    )


class PipeSource:
    """A device source whose fd really becomes readable, like pyudev's monitor."""

    def __init__(self, present: list[Device]) -> None:
        self._present = present
        self._reader, self._writer = os.pipe()
        os.set_blocking(self._reader, False)
        self._queue: list[DeviceEvent] = []
        self._lock = threading.Lock()
        self.started = threading.Event()

    def start(self) -> list[Device]:
        self.started.set()
        return list(self._present)

    def fileno(self) -> int:
        return self._reader

    def emit(self, event: DeviceEvent) -> None:
        with self._lock:
            self._queue.append(event)
        os.write(self._writer, b"x")

    def drain(self) -> list[DeviceEvent]:
        with contextlib.suppress(BlockingIOError):
            os.read(self._reader, 4096)
        with self._lock:
            events, self._queue = self._queue, []
        return events

    def close(self) -> None:
        os.close(self._reader)
        os.close(self._writer)


@dataclass
class FakeOctoPrint:
    """OctoPrint's connection rules, in memory: connect is ignored while any
    connection exists; an unlisted port is a 400; Disconnect leaves no error."""

    ports: tuple[str, ...] = ("/dev/ttyACM0", BY_ID)
    state: str = "Closed"
    error: str | None = None
    connects: list[str] = field(default_factory=list)
    disconnects: int = 0
    preference: str | None = None  # OctoPrint's saved port (options.portPreference)
    port: str | None = None  # the connection's port (current.port), while there is one
    reads: list[bool] = field(default_factory=list)  # each read's ``detail``
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Cleared: every read waits until it is set, as against a hung OctoPrint.
    answering: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.answering.set()

    def read(self, *, detail: bool = True) -> ReadResult:
        with self.lock:
            self.reads.append(detail)
        self.answering.wait()
        with self.lock:
            return octoprint_view(
                state=self.state,
                port=None if self.state == "Closed" else self.port,
                error=self.error if detail else None,
                ports=self.ports,
                baudrate_preference=115200,
                port_preference=self.preference,
            )

    def connect(self, port: str, baudrate: int | None, profile: str | None) -> CommandResult:
        with self.lock:
            if port not in self.ports:
                return Refused(400, "port is invalid")
            self.connects.append(port)
            if self.state == "Closed":
                self.state, self.error, self.port = "Operational", None, port
            return Accepted()

    url = "http://127.0.0.1:9"

    def act(self, port: str | None, baudrate: int | None, profile: str | None) -> CommandResult:
        assert port is not None, "OctoPrint is always given a port"
        return self.connect(port, baudrate, profile)

    def recover(self) -> CommandResult:
        return self.disconnect()

    def disconnect(self) -> CommandResult:
        with self.lock:
            self.disconnects += 1
            self.state, self.error = "Closed", None
            return Accepted()

    def reconnect_plugins(self) -> list[tuple[str, str]] | Refused:
        self.answering.wait()
        return []  # the real check runs against a real OctoPrint in test_octoprint_versions.py

    def set(self, state: str, error: str | None = None) -> None:
        with self.lock:
            self.state, self.error = state, error

    def close(self) -> None:
        pass


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)  # polling a real process's effect; no clock to advance here


def config(settle: float = 0.05) -> Config:
    octoprint = OctoPrintConfig(url="http://127.0.0.1:9", api_key="SECRETKEY123")
    printer = PrinterConfig(
        name="mk3s", octoprint=octoprint, vendor_id="2c99", product_id="0002", settle=settle
    )
    return Config(
        source=Path("/etc/reconnectd/reconnectd.toml"), octoprint=octoprint, printers=(printer,)
    )


@dataclass
class Run:
    source: PipeSource
    octoprint: FakeOctoPrint
    notify: NotifySocket
    env: dict[str, str]
    status_file: Path
    state_file: Path
    exit_code: list[int] = field(default_factory=list)

    def status(self) -> dict[str, object]:
        document = json.loads(self.status_file.read_text())
        assert isinstance(document, dict)
        return document

    def printer_status(self) -> dict[str, object]:
        """The first printer's row; empty until the daemon has written the file."""
        if not self.status_file.exists():
            return {}
        printers = self.status()["printers"]
        assert isinstance(printers, list)
        first = printers[0]
        assert isinstance(first, dict)
        return first


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[dict[str, str]]:
    (tmp_path / "run").mkdir()
    (tmp_path / "state").mkdir()
    yield {
        "NOTIFY_SOCKET": str(tmp_path / "notify"),
        "RUNTIME_DIRECTORY": str(tmp_path / "run"),
        "STATE_DIRECTORY": str(tmp_path / "state"),
    }


def run_daemon(
    tmp_path: Path,
    env: dict[str, str],
    scenario: Callable[[Run], None],
    *,
    present: list[Device] | None = None,
    octoprint: FakeOctoPrint | None = None,
    reload_config: Callable[[], Config] | None = None,
    first_config: Config | None = None,
) -> Run:
    """Run the daemon in this (main) thread while `scenario` plays in another."""
    notify = NotifySocket(Path(env["NOTIFY_SOCKET"]))
    run = Run(
        source=PipeSource(present or []),
        octoprint=octoprint or FakeOctoPrint(),
        notify=notify,
        env=env,
        status_file=Path(env["RUNTIME_DIRECTORY"]) / "status.json",
        state_file=Path(env["STATE_DIRECTORY"]) / "state.json",
    )
    failure: list[BaseException] = []

    def drive() -> None:
        try:
            assert run.source.started.wait(10)
            scenario(run)
        except BaseException as error:  # reported in the main thread below
            failure.append(error)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    daemon = Daemon(
        first_config or config(),
        source=run.source,
        api_factory=lambda _: run.octoprint,
        notifier=Notifier(env),
        reload_config=reload_config,
        environ=env,
    )
    driver = threading.Thread(target=drive, name="scenario")
    driver.start()
    run.exit_code.append(daemon.run())
    driver.join(10)
    notify.close()
    if failure:
        raise failure[0]
    return run


def test_ready_after_start_then_power_cycle_connects_once_and_stops_cleanly(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    def scenario(run: Run) -> None:
        ready = run.notify.wait_for(lambda m: m.startswith("READY=1"))
        assert "STATUS=mk3s: absent" in ready
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the connect")
        run.notify.wait_for(lambda m: m == "STATUS=mk3s: operational")
        wait_until(lambda: run.printer_status().get("state") == "operational", "status file")

    run = run_daemon(tmp_path, runtime, scenario)
    assert run.exit_code == [0]
    assert run.octoprint.connects == [BY_ID]
    # The look before the connect skips /api/job; the one confirming it does not.
    assert run.octoprint.reads[:2] == [False, True]
    assert run.notify.messages[-1] == "STOPPING=1"
    status = run.printer_status()
    assert status["device"] == "/dev/ttyACM0"
    assert status["decision"] == "connected"
    assert run.status()["pid"] == os.getpid()


def test_status_is_written_while_a_read_hangs(tmp_path: Path, runtime: dict[str, str]) -> None:
    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        run.octoprint.answering.clear()
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.octoprint.reads == [False], "the read")
        # Written STATUS_MAY_LAG after the read began, not when it ends (never, here).
        wait_until(lambda: run.printer_status().get("state") == "checking", "status file")
        still_hung = not run.octoprint.answering.is_set()
        run.octoprint.answering.set()
        wait_until(lambda: run.printer_status().get("state") == "operational", "status file")
        assert still_hung, "the status was written while the read hung"
        run.notify.wait_for(lambda m: m == "STATUS=mk3s: operational")

    run = run_daemon(tmp_path, runtime, scenario)
    assert run.octoprint.connects == [BY_ID]
    assert "STATUS=mk3s: checking" in run.notify.messages


def test_status_file_is_there_at_ready_while_the_plugin_check_hangs(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    octoprint = FakeOctoPrint()
    octoprint.answering.clear()  # the plugin check, asked at start, gets no answer

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        state = run.printer_status().get("state")
        octoprint.answering.set()
        assert state == "absent", "no status file when READY=1 was sent"

    run_daemon(tmp_path, runtime, scenario, octoprint=octoprint)


def test_burst_of_events_gives_one_connect(tmp_path: Path, runtime: dict[str, str]) -> None:
    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        for n in range(10):
            run.source.emit(DeviceAdded(device(n)))
            run.source.emit(DeviceRemoved(device(n).devpath))
        run.source.emit(DeviceAdded(device(10)))
        wait_until(lambda: run.octoprint.connects != [], "a connect")
        # a quiet period several times the settle window: no second connect
        time.sleep(0.3)

    run = run_daemon(tmp_path, runtime, scenario, first_config=config(settle=0.1))
    assert run.octoprint.connects == [BY_ID]


def test_start_with_device_present_connects_and_sigterm_exits_zero(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    def scenario(run: Run) -> None:
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the start-up connect")

    run = run_daemon(tmp_path, runtime, scenario, present=[device(0)])
    assert run.exit_code == [0]


def test_sighup_with_a_broken_config_keeps_the_old_one(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    calls: list[str] = []

    def broken() -> Config:
        calls.append("reload")
        raise ConfigError(["/etc/reconnectd/reconnectd.toml: printer[0].vendor_id: bad"])

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: calls == ["reload"], "the reload attempt")
        # The old config still works: a power cycle is still served.
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the connect")

    run = run_daemon(tmp_path, runtime, scenario, reload_config=broken)
    assert not any(m.startswith("RELOADING=1") for m in run.notify.messages)
    assert run.exit_code == [0]


def test_sighup_with_a_good_config_reloads_and_keeps_holds(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    octoprint = FakeOctoPrint()
    renamed = config()
    changed = Config(
        source=renamed.source,
        octoprint=renamed.octoprint,
        printers=(
            PrinterConfig(
                name="mk3s",
                octoprint=renamed.octoprint,
                vendor_id="2c99",
                settle=0.05,
                baudrate=250000,
            ),
        ),
    )

    def scenario(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")
        octoprint.disconnect()  # the user clicks Disconnect
        os.kill(os.getpid(), signal.SIGHUP)
        run.notify.wait_for(lambda m: m.startswith("RELOADING=1"))
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        run.notify.wait_for(lambda m: m.startswith("STATUS=mk3s: holding after manual disconnect"))
        wait_until(
            lambda: run.printer_status().get("state") == "holding after manual disconnect",
            "the hold in the status file",
        )

    run = run_daemon(
        tmp_path, runtime, scenario, octoprint=octoprint, reload_config=lambda: changed
    )
    assert octoprint.connects == [BY_ID], "the user's Disconnect must be respected"
    state = json.loads(run.state_file.read_text())
    assert state["printers"]["mk3s"]["holds"][0]["kind"] == "manual"


def test_holds_survive_a_restart(tmp_path: Path, runtime: dict[str, str]) -> None:
    octoprint = FakeOctoPrint()

    def first(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")
        octoprint.set("Closed", "Printer halted. kill() called!")
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: "holding" in str(run.printer_status().get("state")), "the hold")

    run_daemon(tmp_path, runtime, first, octoprint=octoprint, reload_config=config)

    def second(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        wait_until(lambda: "holding" in str(run.printer_status().get("state")), "the hold")

    run = run_daemon(tmp_path, runtime, second, octoprint=octoprint, present=[device(0)])
    assert octoprint.connects == [BY_ID], "no reconnect after a firmware error, even after restart"
    assert "firmware error" in str(run.printer_status()["holds"])


def test_a_start_leaves_an_unchanged_state_file_alone(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    state = Path(runtime["STATE_DIRECTORY"]) / "state.json"
    remembered: dict[str, object] = {"holds": [], "connected_instance": None, "last_instance": None}
    state.write_text(json.dumps({"version": 1, "printers": {"mk3s": remembered}}))
    before = state.stat().st_ino

    def started(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))

    run_daemon(tmp_path, runtime, started)
    assert state.stat().st_ino == before, "rewritten though nothing changed"
    # A printer no longer configured is forgotten: that is a change.
    state.write_text(json.dumps({"version": 1, "printers": {"mk3s": remembered, "gone": {}}}))
    run_daemon(tmp_path, runtime, started)
    assert json.loads(state.read_text()) == {"version": 1, "printers": {"mk3s": remembered}}


def test_watchdog_is_pinged_from_the_loop(tmp_path: Path, runtime: dict[str, str]) -> None:
    runtime["WATCHDOG_USEC"] = "200000"  # a ping every 0.1 s
    runtime["WATCHDOG_PID"] = str(os.getpid())

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        for _ in range(3):
            run.notify.wait_for(lambda m: m == "WATCHDOG=1", timeout=2.0)
            run.notify.messages.clear()

    run_daemon(tmp_path, runtime, scenario)


def test_api_key_never_reaches_status_or_state_files(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    def scenario(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the connect")

    run = run_daemon(tmp_path, runtime, scenario)
    for path in (run.status_file, run.state_file):
        assert "SECRETKEY123" not in path.read_text()
    assert not any("SECRETKEY123" in m for m in run.notify.messages)


def test_unwritable_status_directory_is_logged_once_and_the_daemon_goes_on(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    runtime["RUNTIME_DIRECTORY"] = str(blocker / "run")  # a file in the way

    def scenario(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the connect")

    run_daemon(tmp_path, runtime, scenario)
    warnings = [r for r in caplog.records if "cannot write the status file" in r.getMessage()]
    assert len(warnings) == 1


def test_reload_adding_a_printer_adopts_the_present_device(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    octoprint_config = config().octoprint
    other = PrinterConfig(name="ender", octoprint=octoprint_config, vendor_id="1a86")
    before = Config(source=config().source, octoprint=octoprint_config, printers=(other,))
    after = config()  # only mk3s now: ender removed, mk3s added
    caplog.set_level(logging.INFO, logger="reconnectd")

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        assert run.octoprint.connects == [], "the Prusa matches no printer yet"
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the adopted device connected")

    run = run_daemon(
        tmp_path,
        runtime,
        scenario,
        present=[device(0)],
        first_config=before,
        reload_config=lambda: after,
    )
    rows = run.status()["printers"]
    assert isinstance(rows, list) and [row["name"] for row in rows] == ["mk3s"]
    assert any("ender: removed from the config" in r.getMessage() for r in caplog.records)
    assert any("looks like a printer" in r.getMessage() for r in caplog.records)


class DeafSource(PipeSource):
    """A device source whose netlink socket cannot be opened (no permission)."""

    def start(self) -> list[Device]:
        self.started.set()
        raise PermissionError(1, "Operation not permitted")


def test_udev_unavailable_is_one_clear_error_and_exit_69(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    source = DeafSource([])
    daemon = Daemon(
        config(),
        source=source,
        api_factory=lambda _: FakeOctoPrint(),
        notifier=Notifier(runtime),
        environ=runtime,
    )
    assert daemon.run() == 69
    errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert errors == ["cannot listen to udev for device events: [Errno 1] Operation not permitted"]


def test_static_node_in_a_container_runs_on_polling_only(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """LXC: a mknod node, no udevd, no netlink; presence comes from sysfs alone."""
    from tests.test_static_nodes import MAJOR, MINOR, plug, unplug

    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    caplog.set_level(logging.INFO, logger="reconnectd")
    node = tmp_path / "ttyACM0"
    os.mknod(node, 0o660 | 0o020000, os.makedev(MAJOR, MINOR))
    sys_root = tmp_path / "sys"
    (sys_root / "dev" / "char").mkdir(parents=True)
    octoprint = FakeOctoPrint(ports=(str(node),))
    settings = config()
    static = PrinterConfig(
        name="lxc", octoprint=settings.octoprint, port=str(node), poll=0.2, settle=0.05
    )
    daemon = Daemon(
        Config(source=settings.source, octoprint=settings.octoprint, printers=(static,)),
        source=DeafSource([]),
        api_factory=lambda _: octoprint,
        notifier=Notifier(runtime),
        environ=runtime,
        sys_root=str(sys_root),
    )
    status = Path(runtime["RUNTIME_DIRECTORY"]) / "status.json"

    def row() -> dict[str, object]:
        if not status.exists():
            return {}
        rows = json.loads(status.read_text())["printers"]
        assert isinstance(rows, list)
        first = rows[0]
        assert isinstance(first, dict)
        return first

    def scenario() -> None:
        wait_until(lambda: row().get("state") == "absent", "the daemon up")
        time.sleep(0.6)  # three poll periods with nothing behind the node
        assert octoprint.connects == [], "never connect to a node with no device behind it"
        plug(sys_root, devnum=5)
        wait_until(lambda: octoprint.connects == [str(node)], "the connect once it appears")
        wait_until(lambda: row().get("state") == "operational", "operational")
        octoprint.set("Closed", VANISHED_TEXT)
        unplug(sys_root)
        wait_until(lambda: row().get("state") == "absent", "absent once it vanished")
        plug(sys_root, devnum=6)
        wait_until(lambda: len(octoprint.connects) == 2, "the connect once it is back")

    failure: list[BaseException] = []

    def drive() -> None:
        try:
            scenario()
        except BaseException as error:
            failure.append(error)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    driver = threading.Thread(target=drive)
    driver.start()
    assert daemon.run() == 0
    driver.join(10)
    if failure:
        raise failure[0]
    messages = [r.getMessage() for r in caplog.records]
    assert any("running on polling only" in m for m in messages)
    assert octoprint.connects == [str(node), str(node)]


VANISHED_TEXT = "SerialException: device reports readiness to read but returned no data"


def test_two_entries_claiming_one_device_are_warned_about_by_name(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    octoprint_config = config().octoprint
    loose = PrinterConfig(name="any-prusa", octoprint=octoprint_config, vendor_id="2c99")
    exact = PrinterConfig(
        name="mk3s", octoprint=octoprint_config, vendor_id="2c99", serial="CZPX1", settle=0.05
    )
    both = Config(source=config().source, octoprint=octoprint_config, printers=(loose, exact))

    def scenario(run: Run) -> None:
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the connect")

    run_daemon(tmp_path, runtime, scenario, present=[device(0)], first_config=both)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(
        "/dev/ttyACM0 matches several printers: any-prusa, mk3s; it goes to any-prusa" in w
        for w in warnings
    ), warnings


def test_status_file_is_written_again_once_its_directory_can_be(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconnectd")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    status_dir = blocker / "run"
    runtime["RUNTIME_DIRECTORY"] = str(status_dir)  # a file in the way
    # Pinged every 0.1 s: the loop wakes up with nothing else happening.
    runtime["WATCHDOG_USEC"] = "200000"
    runtime["WATCHDOG_PID"] = str(os.getpid())

    def scenario(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the connect")
        run.notify.wait_for(lambda m: m == "STATUS=mk3s: operational")
        # The fault ends; nothing changes in the printer's state after it.
        blocker.unlink()
        wait_until(lambda: (status_dir / "status.json").exists(), "the status file")

    run = run_daemon(tmp_path, runtime, scenario)
    document = json.loads((status_dir / "status.json").read_text())
    assert document["printers"][0]["state"] == "operational"
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "status file" in m] == [
        f"cannot write the status file {status_dir / 'status.json'}: "
        f"[Errno 20] Not a directory: '{status_dir}'",
        f"the status file {status_dir / 'status.json'} is written again",
    ]
    assert run.exit_code == [0]


# --- holes found by trying to break it (issue "Safe at every edge") ----------------


def test_a_hold_whose_write_failed_is_stored_once_the_disk_allows_and_survives_a_restart(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="reconnectd")
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    state_dir = blocker / "state"
    runtime["STATE_DIRECTORY"] = str(state_dir)  # a file in the way: every write fails
    runtime["WATCHDOG_USEC"] = "200000"  # the loop wakes every 0.1 s with nothing to do
    runtime["WATCHDOG_PID"] = str(os.getpid())
    octoprint = FakeOctoPrint()

    def first(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")
        octoprint.disconnect()  # the user clicks Disconnect
        os.kill(os.getpid(), signal.SIGHUP)  # anything that makes it look
        wait_until(lambda: "holding" in str(run.printer_status().get("state")), "the hold")
        unsaved = run.status().get("holds_unsaved")
        assert isinstance(unsaved, str) and f"cannot store holds in {state_dir}" in unsaved
        time.sleep(0.3)  # several wake-ups with the fault still there: said once
        blocker.unlink()  # the fault ends; nothing changes in the printer's state after it
        wait_until(lambda: (state_dir / "state.json").exists(), "the state file")
        wait_until(lambda: run.status().get("holds_unsaved") is None, "the status to say so")

    run_daemon(tmp_path, runtime, first, octoprint=octoprint, reload_config=config)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot store holds" in m]) == 1, messages
    assert f"holds are stored in {state_dir / 'state.json'} again" in messages

    def second(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        wait_until(lambda: "holding" in str(run.printer_status().get("state")), "the hold")

    run_daemon(tmp_path, runtime, second, octoprint=octoprint, present=[device(0)])
    assert octoprint.connects == [BY_ID], "the user's Disconnect was forgotten by the restart"


def test_sighups_inside_the_settle_window_leave_one_connect_after_it(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    settle = 0.6
    connected_at: list[float] = []

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        run.source.emit(DeviceAdded(device(0)))
        added = time.monotonic()
        for _ in range(3):  # `systemctl reload`, for any reason, even an unchanged config
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGHUP)
            run.notify.wait_for(lambda m: m.startswith("READY=1"))
            run.notify.messages.clear()
        wait_until(lambda: run.octoprint.connects != [], "the connect")
        connected_at.append(time.monotonic() - added)
        time.sleep(2 * settle)  # the burst is long over: nothing more may come

    run = run_daemon(
        tmp_path,
        runtime,
        scenario,
        first_config=config(settle=settle),
        reload_config=lambda: config(settle=settle),
    )
    assert run.octoprint.connects == [BY_ID]
    assert connected_at[0] >= settle, "connected before the settle window ended"


def test_a_reload_that_changes_the_printer_inside_the_settle_window_waits_for_it(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    settle = 0.6
    changed = config(settle=settle)
    changed = Config(
        source=changed.source,
        octoprint=changed.octoprint,
        printers=(PrinterConfig(**{**changed.printers[0].__dict__, "baudrate": 250000}),),
    )
    connected_at: list[float] = []

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        run.source.emit(DeviceAdded(device(0)))
        added = time.monotonic()
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: run.octoprint.connects != [], "the connect")
        connected_at.append(time.monotonic() - added)
        time.sleep(2 * settle)

    run = run_daemon(
        tmp_path,
        runtime,
        scenario,
        first_config=config(settle=settle),
        reload_config=lambda: changed,
    )
    assert run.octoprint.connects == [BY_ID]
    assert connected_at[0] >= settle, "the rebuilt printer connected before the burst settled"


def moved(n: int) -> Device:
    """The same printer (ids, serial) on another USB port: another sysfs path."""
    return device(n, usb_port="1-2")


def test_a_late_remove_of_the_old_node_hands_the_printer_to_the_new_one(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    octoprint = FakeOctoPrint()

    def scenario(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")
        # The cable moves to another port: OctoPrint loses the old node, the new node's
        # add arrives, and the old node's remove only after it.
        octoprint.set("Closed", "SerialException: device reports readiness to read but ...")
        run.source.emit(DeviceAdded(moved(1)))
        run.source.emit(DeviceRemoved(device(0).devpath))
        wait_until(lambda: len(octoprint.connects) == 2, "the connect to the new node")
        wait_until(lambda: run.printer_status().get("device") == "/dev/ttyACM1", "the new node")
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")
        time.sleep(0.3)  # several settle windows: no second connect for this move

    run_daemon(tmp_path, runtime, scenario, octoprint=octoprint)
    assert octoprint.connects == [BY_ID, BY_ID], "exactly one connect for the move"


def test_a_remove_of_a_node_the_printer_does_not_own_changes_nothing(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    octoprint = FakeOctoPrint()

    def scenario(run: Run) -> None:
        run.source.emit(DeviceAdded(device(0)))
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")
        run.source.emit(DeviceRemoved(moved(5).devpath))  # some other node, never ours
        time.sleep(0.2)
        assert run.printer_status().get("device") == "/dev/ttyACM0"
        assert run.printer_status().get("state") == "operational"

    run_daemon(tmp_path, runtime, scenario, octoprint=octoprint)
    assert octoprint.connects == [BY_ID]


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b'{"version": 1, "printers": {"mk3s": ' + b"9" * 100_000 + b"}}", "not JSON"),
        (b"\xff\xfe garbage", "not valid UTF-8"),
        (b'{"version": 1, "printers": []}', '"printers" is a list'),
        (b'{"version": 7, "printers": {}}', "version is 7"),
    ],
)
def test_a_damaged_state_file_is_moved_aside_and_the_daemon_starts(
    tmp_path: Path,
    runtime: dict[str, str],
    caplog: pytest.LogCaptureFixture,
    content: bytes,
    problem: str,
) -> None:
    state = Path(runtime["STATE_DIRECTORY"]) / "state.json"
    state.write_bytes(content)

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        wait_until(lambda: run.octoprint.connects == [BY_ID], "the start-up connect")

    run = run_daemon(tmp_path, runtime, scenario, present=[device(0)])
    assert run.exit_code == [0]
    aside = list(state.parent.glob("state.json.corrupt-*"))
    assert len(aside) == 1 and aside[0].read_bytes() == content, "kept for a person to look at"
    warnings = [r.getMessage() for r in caplog.records if "ignoring stored holds" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert problem in warnings[0] and "starting with no holds" in warnings[0], warnings
    assert json.loads(state.read_text())["version"] == 1, "a good file written in its place"


def test_a_reload_changing_the_printer_before_its_first_look_keeps_the_return_in_mind(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    # Found by the model of the rules: a rebuilt core took the return for a start, and
    # the firmware error OctoPrint still showed from before the power cycle for a new one.
    octoprint = FakeOctoPrint()
    octoprint.set("Closed", "Thermal Runaway, system stopped! Printer halted. kill() called!")
    settle = 0.4
    changed = config(settle=settle)
    changed = Config(
        source=changed.source,
        octoprint=changed.octoprint,
        printers=(PrinterConfig(**{**changed.printers[0].__dict__, "baudrate": 250000}),),
    )

    def scenario(run: Run) -> None:
        run.notify.wait_for(lambda m: m.startswith("READY=1"))
        run.source.emit(DeviceAdded(device(1)))  # switched off and on to clear the error
        time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGHUP)
        wait_until(lambda: octoprint.connects != [], "the connect")
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")

    run = run_daemon(
        tmp_path,
        runtime,
        scenario,
        octoprint=octoprint,
        first_config=config(settle=settle),
        reload_config=lambda: changed,
    )
    assert octoprint.connects == [BY_ID]
    assert run.printer_status()["holds"] == []


def ch340(usb_port: str, n: int) -> Device:
    """A CH340 board (no serial number): an Ender's, or a Zigbee stick's."""
    return Device(
        devpath=f"/devices/usb1/{usb_port}/{usb_port}:1.0/ttyUSB{n}/tty/ttyUSB{n}",
        node=f"/dev/ttyUSB{n}",
        links=(f"/dev/serial/by-path/pci-0000:00:14.0-usb-0:{usb_port[2:]}:1.0-port0",),
        vendor_id="1a86",
        product_id="7523",
        usb_path=f"pci-0000:00:14.0-usb-0:{usb_port[2:]}:1.0",
        instance=f"ch340-{n}",
    )


def zero(settle: float = 0.05) -> Config:
    octoprint = OctoPrintConfig(url="http://127.0.0.1:9", api_key="SECRETKEY123")
    (printer,) = zero_config(octoprint)
    return Config(
        source=None,
        octoprint=octoprint,
        printers=(PrinterConfig(**{**printer.__dict__, "settle": settle}),),
    )


STICK, ENDER = ch340("1-3", 0), ch340("1-1", 1)
BOTH_PORTS = (STICK.node, ENDER.node)


def test_zero_config_connects_the_board_octoprint_points_at_not_the_stick(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    octoprint = FakeOctoPrint(ports=BOTH_PORTS, preference=ENDER.node)

    def scenario(run: Run) -> None:
        wait_until(lambda: octoprint.connects != [], "the connect")
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")
        time.sleep(0.2)

    run = run_daemon(
        tmp_path,
        runtime,
        scenario,
        octoprint=octoprint,
        present=[STICK, ENDER],
        first_config=zero(),
    )
    assert octoprint.connects == [ENDER.node], "the Zigbee stick must be left alone"
    assert run.printer_status()["device"] == ENDER.node


def test_zero_config_leaves_an_unknown_board_alone_and_says_which_stanza_to_paste(
    tmp_path: Path, runtime: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    octoprint = FakeOctoPrint(ports=BOTH_PORTS, preference="AUTO")

    def scenario(run: Run) -> None:
        # The printer is still off: the stick is the only candidate.
        wait_until(lambda: run.printer_status().get("state") == "not known as a printer", "left")
        reason = str(run.printer_status()["reason"])
        assert "reconnectd devices" in reason and STICK.node in reason
        # The printer is switched on, and OctoPrint points at it.
        octoprint.preference = ENDER.node
        run.source.emit(DeviceAdded(ENDER))
        wait_until(lambda: octoprint.connects != [], "the connect")
        wait_until(lambda: run.printer_status().get("device") == ENDER.node, "the printer")

    run_daemon(
        tmp_path, runtime, scenario, octoprint=octoprint, present=[STICK], first_config=zero()
    )
    assert octoprint.connects == [ENDER.node]
    warnings = [
        r.getMessage()
        for r in caplog.records
        if "not known" in r.getMessage() or "may be a printer" in r.getMessage()
    ]
    assert len(warnings) == 1 and "paste the [[printer]] stanza" in warnings[0], warnings


def test_zero_config_remembers_a_board_it_saw_running_as_a_printer(
    tmp_path: Path, runtime: dict[str, str]
) -> None:
    octoprint = FakeOctoPrint(ports=BOTH_PORTS, preference=ENDER.node)

    def first(run: Run) -> None:
        run.source.emit(DeviceAdded(ENDER))
        wait_until(lambda: run.printer_status().get("state") == "operational", "Operational")

    run_daemon(tmp_path, runtime, first, octoprint=octoprint, first_config=zero())
    stored = json.loads((Path(runtime["STATE_DIRECTORY"]) / "state.json").read_text())
    assert stored["printers"]["printer"]["known_devices"] == [
        "1a86:7523@pci-0000:00:14.0-usb-0:1:1.0"
    ]
    # The saved port changes (the user connected something else once); the board is
    # switched off and on while reconnectd is stopped.
    octoprint.preference, octoprint.state = "AUTO", "Closed"
    replugged = Device(**{**ENDER.__dict__, "instance": "ch340-again"})

    def second(run: Run) -> None:
        wait_until(lambda: len(octoprint.connects) == 2, "the connect after the restart")

    run_daemon(
        tmp_path,
        runtime,
        second,
        octoprint=octoprint,
        present=[STICK, replugged],
        first_config=zero(),
    )
    assert octoprint.connects == [ENDER.node, ENDER.node]
