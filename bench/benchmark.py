"""The measuring half of ``bench/run``: the real daemon, real libudev, real HTTP, real time.

Every figure comes from the real ``reconnectd`` process (started by
:class:`~tests.support.daemon_process.DaemonProcess` as the unit starts it: no ``-v``,
a 30 s watchdog) on simulated USB printers in umockdev testbeds
(:mod:`tests.support.testbed`), talking to loopback OctoPrints: the stand-in
:class:`~tests.support.fake_octoprint.FakeOctoPrint` where many are needed or
every request must be timed, a real OctoPrint 1.11.8 with a fake Marlin on the pty
where what a user sees is measured. ``bench/README.md`` says how each figure is taken.

The phases, in order (the idle window runs the real-OctoPrint phases meanwhile, on a
testbed of their own that the idle daemon never hears of):

1. start-up: the 4-printer daemon started again and again, process start -> READY=1;
2. idle: the 4-printer daemon left alone: RSS, CPU, requests; beside it the
   comparison poller against a stand-in, for its requests;
   meanwhile: replug -> Operational on the real OctoPrint, reconnectd's and then
   the poller's;
3. events: one printer power-cycled again and again, udev add -> connect POST;
   then add/remove events by the thousand, RSS before and after;
4. storm: 32 printers unplugged and replugged within 200 ms;
5. klipper: a real Klippy and Moonraker, the board switched off and on (bench/klipper.py).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import requests

from bench import report
from bench.klipper import measure_klipper
from tests.support.daemon_process import DaemonProcess
from tests.support.fake_marlin import FakeMarlin
from tests.support.fake_octoprint import OPERATIONAL, FakeOctoPrint, ports_under, printer_under
from tests.support.klipper_build import find_build
from tests.support.octoprint_instance import OctoPrintInstance, octoprint_bin
from tests.support.printers import SimulatedPrinters
from tests.support.testbed import (
    Plugged,
    Testbed,
    mount_tmpfs,
    open_testbed,
    unavailable_reason,
    unmount_tmpfs,
)

REPO = Path(__file__).resolve().parents[1]
POLLER = Path(__file__).with_name("poller.py")
UEVENT_CLOCK = Path(__file__).with_name("uevent_clock.py")

SETTLE = report.TARGET_SETTLE  # the printers of every figure whose target names it
EVENT_SETTLE = 0.1  # event -> POST is measured minus the settle: a short one saves time
WATCHDOG_USEC = 30_000_000  # WatchdogSec=30 in systemd/reconnectd.service
IDLE_PRINTERS = 4
STORM_PRINTERS = 32
STORM_WINDOW = 0.2
QUIET = 6.0  # no request for this long: past the daemon's longest confirmation look (5 s)
POLL = 0.002  # how often the bench looks at what its stand-ins received
STATE_POLL = 0.025  # how often the real OctoPrint's state is read during a replug
CYCLE_GAP = 0.02  # between a POST and the next unplug, and an unplug and the next plug
TIMEOUT = 30.0


class BenchError(RuntimeError):
    """A phase could not measure what it should (the daemon misbehaved, a tool is missing)."""


@dataclass(frozen=True)
class Plan:
    """How much of each measurement a run makes."""

    mode: str
    startup_runs: int
    idle_seconds: float
    event_cycles: int
    event_warmup: int
    rss_events: int
    rss_wait_every: int  # every Nth power cycle of the RSS run waits for its connect
    storms: int
    real_cycles: int
    poller_cycles: int
    off_seconds: tuple[float, float]  # how long a printer stays off in a replug cycle
    klipper_cycles: int
    klipper_idle_seconds: float


FULL = Plan(
    mode="full",
    startup_runs=20,
    idle_seconds=300.0,
    event_cycles=300,
    event_warmup=20,
    rss_events=10_000,
    rss_wait_every=10,
    storms=3,
    real_cycles=12,
    poller_cycles=10,
    off_seconds=(2.0, 10.0),
    klipper_cycles=6,
    klipper_idle_seconds=120.0,
)
QUICK = Plan(
    mode="quick",
    startup_runs=5,
    idle_seconds=60.0,
    event_cycles=200,
    event_warmup=10,
    rss_events=2_000,
    rss_wait_every=10,
    storms=1,
    real_cycles=3,
    poller_cycles=2,
    off_seconds=(2.0, 10.0),
    klipper_cycles=2,
    klipper_idle_seconds=20.0,
)
# CI's smoke run: every phase once, to show the script still works end to end. Its
# figures rest on too few samples to mean much; --quick and the full run are the ones
# to read.
SMOKE = Plan(
    mode="smoke",
    startup_runs=3,
    idle_seconds=10.0,
    event_cycles=30,
    event_warmup=5,
    rss_events=400,
    rss_wait_every=10,
    storms=1,
    real_cycles=1,
    poller_cycles=1,
    off_seconds=(2.0, 3.0),
    klipper_cycles=1,
    klipper_idle_seconds=5.0,
)
PHASES = ("startup", "idle", "real", "events", "storm", "klipper")


@dataclass
class Results:
    """What the phases found: headline figures, details, notes for the reader."""

    figures: dict[str, float | None] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def progress(text: str) -> None:
    """Given a line about what the bench is doing, show it on stderr (stdout is the report)."""
    print(f"bench: {text}", file=sys.stderr, flush=True)


# --- the process under measurement --------------------------------------------------


def process_rss_kb(pid: int) -> int:
    """Given a pid, return its resident set size in KB (VmRSS)."""
    return report.vmrss_kb(Path(f"/proc/{pid}/status").read_text())


def process_cpu_ns(pid: int) -> int:
    """Given a pid, return the CPU time its live threads have used, in ns (schedstat)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += report.schedstat_ns((task / "schedstat").read_text())
    return total


def process_cpu_ticks(pid: int) -> int:
    """Given a pid, return utime + stime of all its threads, in clock ticks."""
    return report.stat_cpu_ticks(Path(f"/proc/{pid}/stat").read_text())


@dataclass(frozen=True)
class Where:
    """Where a run keeps its files: logs and configs on disk, like /etc and /var/lib;
    the daemons' runtime directories on a tmpfs when there is one, like /run."""

    logs: Path
    runtime: Path
    bytecode: Path  # compiled modules, as an installed daemon has them (warm_bytecode)

    def sub(self, name: str) -> Where:
        return Where(self.logs / name, self.runtime / name, self.bytecode)


def bytecode_env(where: Where) -> dict[str, str]:
    """Given where compiled modules go, return the environment that uses them."""
    # An installed daemon starts from bytecode pip compiled at install. A machine
    # with $PYTHONDONTWRITEBYTECODE set (this one is) would make every start compile
    # reconnectd from source, ~40 ms that no installed service spends; the cache
    # lives outside the work tree so nothing is written beside the sources.
    return {"PYTHONDONTWRITEBYTECODE": "", "PYTHONPYCACHEPREFIX": str(where.bytecode)}


def warm_bytecode(where: Where) -> None:
    """Compile every reconnectd module and what it imports into ``where.bytecode``."""
    importer = (
        "import importlib, pkgutil, reconnectd\n"
        "for module in pkgutil.walk_packages(reconnectd.__path__, 'reconnectd.'):\n"
        "    if not module.name.endswith('.__main__'):  # that one runs the command\n"
        "        importlib.import_module(module.name)\n"
    )
    env = {**os.environ, **bytecode_env(where), "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", importer], env=env, check=True, cwd=REPO)


def bench_daemon(where: Where, config: str, env: dict[str, str]) -> DaemonProcess:
    """Given a config and a testbed's environment, return the daemon as systemd runs it."""
    env = {**env, **bytecode_env(where)}
    daemon = DaemonProcess(where.logs, config, env=env, watchdog_usec=WATCHDOG_USEC, verbose=False)
    # As installed: the key is in it (else the daemon warns at every start).
    daemon.config_path.chmod(0o600)
    # The status file is rewritten on every change of state: in /run, a tmpfs, as
    # RuntimeDirectory= gives it; on a disk each rewrite would wait for its fsync.
    daemon.runtime_dir = where.runtime / "run"
    daemon.runtime_dir.mkdir(parents=True, exist_ok=True)
    return daemon


def drain(daemon: DaemonProcess) -> None:
    """Read the daemon's sd_notify messages, as systemd would, so its socket never fills."""
    _ = daemon.notifications


def ready_arrival(daemon: DaemonProcess, timeout: float = TIMEOUT) -> float:
    """Given a daemon just started, wait for READY=1; return when it arrived (monotonic)."""
    message = daemon.wait_for_notification(lambda m: m.startswith("READY=1"), timeout)
    return next(at for text, at in daemon.timed_notifications() if text == message)


def wait_until(what: str, check: Callable[[], bool], timeout: float, daemon: DaemonProcess) -> None:
    """Poll ``check`` until it holds; raise BenchError naming ``what``, with the log tail."""
    deadline = time.monotonic() + timeout
    while not check():
        drain(daemon)
        if time.monotonic() > deadline:
            raise BenchError(
                f"{what}: not within {timeout:g} s\n--- reconnectd log (tail) ---\n"
                f"{daemon.log()[-4000:]}"
            )
        time.sleep(POLL * 5)


# --- when udev events were delivered ----------------------------------------------------


class UeventClock:
    """The kernel's delivery time of each tty event on a testbed (``bench/uevent_clock.py``).

    Each listener of its own in the testbed has the event stamped by the kernel as it
    is put on its socket. umockdev sends an event to its listeners one after the
    other, in the order its directory lists their sockets (a tmpfs lists the newest
    first): a listener started before the daemon and one started after it
    (:meth:`add_listener`) put one of them ahead of the daemon whichever way that order
    runs, so the earlier stamp is not later than the daemon's own delivery.
    """

    def __init__(self, testbed: Testbed) -> None:
        self._testbed = testbed
        self._processes: list[subprocess.Popen[bytes]] = []
        self._events: list[dict[tuple[str, str], list[float]]] = []
        self._changed = threading.Condition()
        self.add_listener()

    def add_listener(self) -> None:
        """Start one more listener; return once it listens."""
        index = len(self._processes)
        process = subprocess.Popen(
            [sys.executable, str(UEVENT_CLOCK), str(200 + 10 * index)],
            env=self._testbed.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        self._processes.append(process)
        events: dict[tuple[str, str], list[float]] = {}
        with self._changed:
            self._events.append(events)
        assert process.stdout is not None
        first = process.stdout.readline()
        if b"listening" not in first:
            self.close()
            raise BenchError(f"the uevent clock did not start: {first!r}")
        reader = threading.Thread(
            target=self._read, args=(process, events), name="uevent-clock", daemon=True
        )
        reader.start()

    def _read(
        self, process: subprocess.Popen[bytes], events: dict[tuple[str, str], list[float]]
    ) -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            event = json.loads(raw)
            stamp = event.get("delivered")
            if stamp is None:
                continue
            # CLOCK_REALTIME -> CLOCK_MONOTONIC, with the offset of now: the line is
            # read within milliseconds of the event, far too soon for the two to drift.
            at = float(stamp) - (time.time() - time.monotonic())
            with self._changed:
                events.setdefault((event["action"], event["devpath"]), []).append(at)
                self._changed.notify_all()

    def delivered(self, action: str, devpath: str, after: float, timeout: float = TIMEOUT) -> float:
        """Given an event, return when it was first delivered (monotonic), the first
        one since ``after``; raise BenchError if a listener has not seen it in time."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                stamps = [
                    min(
                        (at for at in events.get((action, devpath), []) if at >= after),
                        default=None,
                    )
                    for events in self._events
                ]
                if all(stamp is not None for stamp in stamps):
                    return min(stamp for stamp in stamps if stamp is not None)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BenchError(f"no {action} event for {devpath} within {timeout:g} s")
                self._changed.wait(left)

    def close(self) -> None:
        for process in self._processes:
            if process.stdin is not None:
                with contextlib.suppress(OSError):
                    process.stdin.close()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# --- simulated printers on stand-in OctoPrints ----------------------------------------


class StandInPrinters:
    """Prusa MK3 boards on one testbed, each printer on its own :class:`FakeOctoPrint`.

    No firmware runs: a stand-in needs none (it reads presence from the testbed).
    """

    def __init__(
        self,
        testbed: Testbed,
        count: int,
        *,
        usb_ports: Sequence[str],
        tag: str,
        handshake: float = 0.1,
    ) -> None:
        self.testbed = testbed
        self.names = [f"{tag}{i + 1:02d}" for i in range(count)]
        self.serials = [f"CZPXBENCH{tag.upper()}{i + 1:02d}" for i in range(count)]
        self.usb_ports = list(usb_ports)
        self.fakes: list[FakeOctoPrint] = []
        self.plugged: list[Plugged | None] = [None] * count
        root = testbed.root
        for _ in range(count):
            self.fakes.append(
                FakeOctoPrint(
                    ports_under(root),
                    printer_under(root),
                    opening=handshake / 5,
                    handshake=handshake,
                )
            )

    def config(self, settle: float) -> str:
        """Given a settle window, return a config naming every printer and its stand-in."""
        text = "[octoprint]\ntimeout = 5\n"
        for name, serial, fake in zip(self.names, self.serials, self.fakes):
            text += (
                f'\n[[printer]]\nname = "{name}"\nvendor_id = "2c99"\nproduct_id = "0002"\n'
                f'serial = "{serial}"\nsettle = {settle:g}\n'
                f'[printer.octoprint]\nurl = "{fake.url}"\napi_key = "{fake.api_key}"\n'
            )
        return text

    def plug(self, index: int) -> Plugged:
        plugged = self.testbed.plug(
            "prusa_mk3", serial=self.serials[index], usb_port=self.usb_ports[index]
        )
        self.plugged[index] = plugged
        return plugged

    def unplug(self, index: int) -> None:
        plugged = self.plugged[index]
        if plugged is not None:
            self.plugged[index] = None
            self.testbed.unplug(plugged)

    def requests(self) -> int:
        return sum(f.requests_received for f in self.fakes)

    def all_operational(self, daemon: DaemonProcess) -> bool:
        return all(
            f.state == OPERATIONAL and daemon.printer(n).get("state") == "operational"
            for n, f in zip(self.names, self.fakes)
        )

    def wait_quiet(self, daemon: DaemonProcess, quiet: float = QUIET) -> None:
        """Wait until no stand-in has received a request for ``quiet`` seconds."""
        deadline = time.monotonic() + quiet + TIMEOUT
        seen, since = self.requests(), time.monotonic()
        while time.monotonic() - since < quiet:
            if time.monotonic() > deadline:
                raise BenchError(f"the daemon never went quiet\n{daemon.log()[-3000:]}")
            time.sleep(0.1)
            drain(daemon)
            now = self.requests()
            if now != seen:
                seen, since = now, time.monotonic()

    def close(self) -> None:
        for index in range(len(self.plugged)):
            self.unplug(index)
        for fake in self.fakes:
            fake.close()


# --- the testbeds ------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs_dir(notes: list[str]) -> Iterator[str | None]:
    """Yield a directory on a tmpfs mounted for the run, or None where mounting is refused.

    umockdev builds its tree under $TMPDIR; on this machine's disk adding and removing
    a device takes several ms, on a tmpfs well under 1 ms: only there do 32 replugs fit
    in 200 ms (see ``tests.support.testbed.mount_tmpfs``). Needs root.
    """
    path = mount_tmpfs("rcd-bench-", "256m")
    if path is None:
        reason = "not root" if os.geteuid() != 0 else "mounting a tmpfs failed"
        notes.append(f"testbeds on disk ({reason}); the storm may exceed 200 ms")
        yield None
        return
    try:
        yield path
    finally:
        unmount_tmpfs(path)


# --- phase 1: start-up ------------------------------------------------------------------


def measure_startup(rig: StandInPrinters, where: Where, runs: int, results: Results) -> None:
    """Start the 4-printer daemon ``runs`` times; record process start -> READY=1."""
    progress(f"start-up: {runs} starts of the daemon with {len(rig.names)} printers")
    daemon = bench_daemon(where, rig.config(SETTLE), rig.testbed.env)
    times: list[float] = []
    for _ in range(runs):
        started = time.monotonic()
        daemon.start(wait_ready=False)
        times.append((ready_arrival(daemon) - started) * 1000.0)
        # Let it finish its start-up look before the next run, as a restart would.
        wait_until("printers Operational", lambda: rig.all_operational(daemon), TIMEOUT, daemon)
        daemon.stop()
    results.figures["startup_ready_ms_p50"] = round(report.percentile(times, 50), 1)
    results.details["startup_ready_ms"] = report.summary(times)


# --- phase 2: idle, and meanwhile the real OctoPrint -------------------------------------

# Where the daemon's memory goes: its imports, one after the other, in a fresh process.
_IMPORT_STEPS = """
import json, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
steps = [("interpreter", rss())]
for name in sys.argv[1:]:
    __import__(name)
    steps.append((name, rss()))
print(json.dumps(steps))
"""
DAEMON_IMPORTS = ("ssl", "requests", "pyudev", "reconnectd.cli")


def import_rss(python: str, modules: Sequence[str], where: Where) -> list[tuple[str, int]]:
    """Given an interpreter and modules, return its RSS (KB) bare and after each import."""
    done = subprocess.run(
        [python, "-c", _IMPORT_STEPS, *modules],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **bytecode_env(where), "PYTHONPATH": str(REPO)},
    )
    return [(str(name), int(kb)) for name, kb in json.loads(done.stdout)]


def rss_breakdown(where: Where) -> dict[str, Any]:
    """Return where the daemon's resident memory goes, import by import (KB), and the
    bare size of Debian's python3 (the one ``systemd/install`` builds its venv from)."""
    steps = import_rss(sys.executable, DAEMON_IMPORTS, where)
    breakdown: dict[str, Any] = {"interpreter": steps[0][1]}
    for (_, before), (name, after) in zip(steps, steps[1:]):
        breakdown[f"+{name}"] = after - before
    debian = "/usr/bin/python3"
    if Path(debian).exists() and os.path.realpath(debian) != os.path.realpath(sys.executable):
        breakdown["debian_python3_interpreter"] = import_rss(debian, (), where)[0][1]
    return breakdown


def poller_command(url: str, port: str, *, dev_root: str, initial_delay: float) -> list[str]:
    """Return the command line of the comparison poller (it stops by itself in 15 min)."""
    return [
        sys.executable,
        str(POLLER),
        "--url",
        url,
        "--port",
        port,
        "--baudrate",
        "115200",
        "--dev-root",
        dev_root,
        "--initial-delay",
        f"{initial_delay:g}",
        "--max-seconds",
        "900",
    ]


def start_poller(command: list[str], key: str, log_path: Path) -> subprocess.Popen[bytes]:
    """Start the comparison poller with its key in the environment; log to ``log_path``."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(
            command,
            env={**os.environ, "POLLER_API_KEY": key},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def measure_idle(
    rig: StandInPrinters,
    where: Where,
    plan: Plan,
    results: Results,
    meanwhile: Callable[[], None],
) -> None:
    """Leave the 4-printer daemon alone for ``plan.idle_seconds``; measure what it costs.

    The poller runs beside it against a stand-in of its own (a printer connected), so
    both are idle over the same window. ``meanwhile`` runs inside the window.
    """
    progress(f"idle: {plan.idle_seconds:g} s with {len(rig.names)} printers connected")
    poller_fake = FakeOctoPrint(lambda: ["/dev/ttyACM0"], lambda port: port)
    daemon = bench_daemon(where.sub("daemon"), rig.config(SETTLE), rig.testbed.env)
    poller: subprocess.Popen[bytes] | None = None
    try:
        with daemon:
            wait_until("printers Operational", lambda: rig.all_operational(daemon), TIMEOUT, daemon)
            rig.wait_quiet(daemon)
            pid = daemon.pid
            rss_start = process_rss_kb(pid)
            requests.post(
                f"{poller_fake.url}/api/connection",
                json={"command": "connect", "port": "/dev/ttyACM0", "baudrate": 115200},
                headers={"X-Api-Key": poller_fake.api_key},
                timeout=5,
            ).raise_for_status()
            poller = start_poller(
                poller_command(poller_fake.url, "/dev/ttyACM0", dev_root="", initial_delay=0),
                poller_fake.api_key,
                where.logs / "poller-idle.log",
            )
            time.sleep(1.0)  # its own start-up is not idling
            started = time.monotonic()
            cpu_ns, ticks = process_cpu_ns(pid), process_cpu_ticks(pid)
            poller_cpu_ns = process_cpu_ns(poller.pid)
            requests_before = rig.requests()
            poller_before = poller_fake.requests_received
            meanwhile()
            while time.monotonic() < started + plan.idle_seconds:
                time.sleep(min(1.0, max(0.0, started + plan.idle_seconds - time.monotonic())))
            window = time.monotonic() - started
            cpu_ns = process_cpu_ns(pid) - cpu_ns
            ticks = process_cpu_ticks(pid) - ticks
            poller_cpu_ns = process_cpu_ns(poller.pid) - poller_cpu_ns
            served = rig.requests() - requests_before
            poller_served = poller_fake.requests_received - poller_before
            rss_end = process_rss_kb(pid)
            drain(daemon)
            pings = sum(m.startswith("WATCHDOG=1") for m in daemon.notifications)
    finally:
        if poller is not None:
            stop_process(poller)
        poller_fake.close()
    minutes = window / 60.0
    tick_ms = 1000.0 / os.sysconf("SC_CLK_TCK")
    results.figures["idle_rss_mb"] = round(rss_start / 1024.0, 1)
    results.figures["idle_cpu_ms_per_min"] = round(cpu_ns / 1e6 / minutes, 2)
    results.figures["idle_requests_per_hour"] = report.per_hour(served, window)
    results.figures["poller_idle_requests_per_hour"] = report.per_hour(poller_served, window)
    results.details["idle"] = {
        "window_s": round(window, 1),
        "printers": len(rig.names),
        "rss_kb_start": rss_start,
        "rss_kb_end": rss_end,
        "cpu_ms": round(cpu_ns / 1e6, 2),
        "cpu_ms_per_min_from_stat_ticks": round(ticks * tick_ms / minutes, 1),
        "requests": served,
        "watchdog_pings": pings,
        "poller_requests": poller_served,
        "poller_cpu_ms_per_min": round(poller_cpu_ns / 1e6 / minutes, 2),
        "rss_kb_by_import": rss_breakdown(where),
    }


@dataclass
class RealRig:
    """A real OctoPrint on a testbed of its own, with one printer whose firmware answers."""

    testbed: Testbed
    octoprint: OctoPrintInstance
    printers: SimulatedPrinters
    serial: str = "CZPXBENCHREAL01"
    plugged: Plugged | None = None
    marlin: FakeMarlin | None = None

    def switch_on(self) -> Plugged:
        self.plugged, self.marlin = self.printers.switch_on(self.serial)
        return self.plugged

    def switch_off(self) -> None:
        if self.plugged is not None:
            self.printers.switch_off(self.plugged)
            self.plugged = self.marlin = None

    def state(self) -> str:
        return str(self.octoprint.connection()["current"]["state"])

    def wait_operational_after(self, since: float, timeout: float) -> float:
        """Read OctoPrint's state every 25 ms; return when it first answered Operational."""
        session = requests.Session()
        session.headers["X-Api-Key"] = self.octoprint.api_key
        deadline = since + timeout
        try:
            while time.monotonic() < deadline:
                answer = session.get(f"{self.octoprint.url}/api/connection", timeout=5)
                seen = time.monotonic()
                if answer.json()["current"]["state"] == OPERATIONAL:
                    return seen
                time.sleep(STATE_POLL)
        finally:
            session.close()
        raise BenchError(
            f"OctoPrint not Operational {timeout:g} s after the replug; "
            f"state {self.state()}\n{self.octoprint.log_tail(20)}"
        )

    def replug_cycles(self, offs: Sequence[float], timeout: float) -> list[float]:
        """Given how long the printer stays off each time, power-cycle it once per entry;
        return each replug -> Operational time (s)."""
        times: list[float] = []
        for off in offs:
            self.octoprint.wait_for_state(OPERATIONAL, timeout)
            time.sleep(1.0)  # whoever connected has seen it by now
            self.switch_off()
            self.octoprint.wait_for_state(lambda s: s != OPERATIONAL, 10)
            time.sleep(off)
            # From just before the plug: the event goes out a millisecond or so later,
            # which counts against whoever reconnects (a 25 ms read interval does too).
            replugged = time.monotonic()
            self.switch_on()
            times.append(self.wait_operational_after(replugged, timeout) - replugged)
        return times


def real_config(rig: RealRig) -> str:
    return (
        f'[octoprint]\nurl = "{rig.octoprint.url}"\napi_key = "{rig.octoprint.api_key}"\n'
        f'timeout = 5\n\n[[printer]]\nname = "real"\nvendor_id = "2c99"\nproduct_id = "0002"\n'
        f'serial = "{rig.serial}"\nsettle = {SETTLE:g}\n'
    )


def measure_real(rig: RealRig, where: Where, plan: Plan, results: Results) -> None:
    """Replug -> Operational on the real OctoPrint: reconnectd's, then the poller's."""
    rng = random.Random(5)  # the same "random" off times on every run
    offs = [
        rng.uniform(*plan.off_seconds) for _ in range(max(plan.real_cycles, plan.poller_cycles))
    ]
    progress(f"real OctoPrint: {plan.real_cycles} replugs with reconnectd (settle {SETTLE:g} s)")
    rig.switch_on()
    daemon = bench_daemon(where.sub("reconnectd"), real_config(rig), rig.testbed.env)
    with daemon:
        ours = rig.replug_cycles(offs[: plan.real_cycles], TIMEOUT)
        drain(daemon)
    progress(f"real OctoPrint: {plan.poller_cycles} replugs with the poller (5 s, 3 offline)")
    assert rig.plugged is not None and rig.plugged.by_id is not None
    poller = start_poller(
        poller_command(
            rig.octoprint.url, rig.plugged.by_id, dev_root=str(rig.testbed.root), initial_delay=10
        ),
        rig.octoprint.api_key,
        where.logs / "poller-real.log",
    )
    try:
        theirs = rig.replug_cycles(offs[: plan.poller_cycles], 90.0)
    finally:
        stop_process(poller)
    version = rig.octoprint._get("/api/version").get("server")
    results.figures["replug_to_operational_s_p50"] = round(report.percentile(ours, 50), 3)
    results.figures["poller_replug_to_operational_s_p50"] = round(report.percentile(theirs, 50), 3)
    results.details["replug_to_operational_s"] = report.summary(ours)
    results.details["poller_replug_to_operational_s"] = report.summary(theirs)
    results.details["replug_off_s"] = [round(o, 2) for o in offs]
    results.details["octoprint_version"] = version


# --- phase 3: events ------------------------------------------------------------------------


def measure_events(testbed: Testbed, where: Where, plan: Plan, results: Results) -> None:
    """One printer power-cycled: udev add -> connect POST; then thousands of events, RSS."""
    # A quick handshake: each cycle waits for it, and it is not part of what is measured.
    rig = StandInPrinters(testbed, 1, usb_ports=["1-3"], tag="ev", handshake=0.02)
    fake = rig.fakes[0]
    daemon = bench_daemon(where, rig.config(EVENT_SETTLE), testbed.env)
    clock = UeventClock(testbed)
    plug_to_delivered: list[float] = []

    def cycle(wait: bool) -> float | None:
        before = len(fake.posts)
        plugging = time.monotonic()
        plugged = rig.plug(0)
        latency = None
        if wait:
            sent = clock.delivered("add", plugged.devpath, plugging)
            deadline = time.monotonic() + TIMEOUT
            # Waited for, not polled: a poll loop here would contend with the
            # stand-in's threads and add to the very answers being timed.
            if not fake.wait_for_posts(before + 1, TIMEOUT):
                raise BenchError(f"no connect POST after a replug\n{daemon.log()[-3000:]}")
            post = fake.posts[before]
            if post.command != "connect" or post.status != 204 or post.ignored:
                raise BenchError(f"unexpected POST {post}")
            latency = (post.at - sent - EVENT_SETTLE) * 1000.0
            plug_to_delivered.append((sent - plugging) * 1000.0)
            # Operational before it goes off again: the stand-in then sees the printer
            # vanish, as OctoPrint would (it looks only when asked).
            while fake.state != OPERATIONAL:
                if time.monotonic() > deadline:
                    raise BenchError(f"the stand-in never became Operational: {fake.state}")
                time.sleep(POLL)
            time.sleep(CYCLE_GAP)
        rig.unplug(0)
        time.sleep(CYCLE_GAP if wait else 0.0)
        return latency

    try:
        with daemon:
            clock.add_listener()
            progress(f"events: {plan.event_cycles} power cycles, add -> connect POST")
            for _ in range(plan.event_warmup):
                cycle(True)
            latencies = [cycle(True) for _ in range(plan.event_cycles)]
            measured = [x for x in latencies if x is not None]
            drain(daemon)
            progress(f"events: {plan.rss_events} add/remove events, RSS before and after")
            time.sleep(1.0)
            rss_before = process_rss_kb(daemon.pid)
            cycles = plan.rss_events // 2
            started = time.monotonic()
            for index in range(cycles):
                cycle(index % plan.rss_wait_every == plan.rss_wait_every - 1)
                if index % 200 == 0:
                    drain(daemon)
            took = time.monotonic() - started
            wait_until(
                "printer absent",
                lambda: daemon.printer("ev01").get("state") == "absent",
                TIMEOUT,
                daemon,
            )
            time.sleep(1.0)
            rss_after = process_rss_kb(daemon.pid)
            connects = daemon.printer("ev01").get("connects")
            log = daemon.log()
    finally:
        clock.close()
        rig.close()
    if "Traceback" in log:
        raise BenchError(f"the daemon logged a traceback\n{log[-3000:]}")
    growth = (rss_after - rss_before) / (plan.rss_events / 1000.0)
    results.figures["event_to_post_ms_p50"] = round(report.percentile(measured, 50), 2)
    results.figures["event_to_post_ms_p99"] = round(report.percentile(measured, 99), 2)
    results.figures["rss_growth_kb_per_1k_events"] = round(growth, 1)
    results.details["event_to_post_ms"] = report.summary(measured)
    results.details["event_settle_s"] = EVENT_SETTLE
    results.details["plug_call_to_event_delivered_ms"] = report.summary(plug_to_delivered)
    results.details["rss_events"] = {
        "tty_events": cycles * 2,
        "power_cycles": cycles,
        "connects_during": cycles // plan.rss_wait_every,
        "seconds": round(took, 1),
        "rss_kb_before": rss_before,
        "rss_kb_after": rss_after,
        "daemon_connects_total": connects,
    }


# --- phase 4: the storm -------------------------------------------------------------------


def measure_storm(testbed: Testbed, where: Where, plan: Plan, results: Results) -> None:
    """32 printers behind one hub, switched off and on within 200 ms, ``plan.storms`` times."""
    progress(f"storm: {STORM_PRINTERS} printers off and on, {plan.storms} time(s)")
    ports = [f"1-2.{i + 1}" for i in range(STORM_PRINTERS)]
    rig = StandInPrinters(testbed, STORM_PRINTERS, usb_ports=ports, tag="st")
    for index in range(STORM_PRINTERS):
        rig.plug(index)
    daemon = bench_daemon(where, rig.config(SETTLE), testbed.env)
    storms: list[dict[str, Any]] = []
    try:
        with daemon:
            wait_until("all Operational", lambda: rig.all_operational(daemon), TIMEOUT, daemon)
            for _ in range(plan.storms):
                rig.wait_quiet(daemon, quiet=2.0)
                before = [len(f.connects) for f in rig.fakes]
                started = time.monotonic()
                for index in range(STORM_PRINTERS):
                    rig.unplug(index)
                added = []
                for index in range(STORM_PRINTERS):
                    added.append(time.monotonic())
                    rig.plug(index)
                window = time.monotonic() - started
                # From just before the last plug: its event goes out a little later.
                last = added[-1]

                wait_until(
                    "all Operational after the storm",
                    lambda before=before, added=added: all(  # type: ignore[misc]
                        _back(f, n, a) for f, n, a in zip(rig.fakes, before, added)
                    ),
                    TIMEOUT,
                    daemon,
                )
                slowest = max(f.operational_since or 0.0 for f in rig.fakes) - last
                time.sleep(2 * SETTLE)  # anything more would come by now
                drain(daemon)
                new = [f.connects[n:] for f, n in zip(rig.fakes, before)]
                storms.append(
                    {
                        "replug_window_ms": round(window * 1000.0, 1),
                        "all_operational_s": round(slowest, 3),
                        "connects": sum(len(c) for c in new),
                        "ignored_connects": sum(p.ignored for c in new for p in c),
                        "printers_with_one_connect": sum(len(c) == 1 for c in new),
                    }
                )
            log = daemon.log()
    finally:
        rig.close()
    if "Traceback" in log:
        raise BenchError(f"the daemon logged a traceback\n{log[-3000:]}")
    worst = max(storms, key=lambda s: s["all_operational_s"])
    off_count = max(storms, key=lambda s: abs(s["connects"] - STORM_PRINTERS))
    results.figures["storm_all_operational_s"] = worst["all_operational_s"]
    results.figures["storm_connects"] = off_count["connects"]
    results.details["storms"] = storms
    late = [s for s in storms if s["replug_window_ms"] > STORM_WINDOW * 1000]
    if late:
        results.notes.append(
            f"{len(late)} storm(s) took longer than {STORM_WINDOW * 1000:.0f} ms to replug "
            "(the testbed, not the daemon): see details.storms"
        )


def _back(fake: FakeOctoPrint, connects_before: int, replugged: float) -> bool:
    """Whether the stand-in got a new connect and is Operational since the replug."""
    since = fake.operational_since
    return len(fake.connects) > connects_before and since is not None and since >= replugged


# --- the machine ---------------------------------------------------------------------------


def describe_machine() -> dict[str, Any]:
    """Return what the figures were taken on: CPU, cores, arch, memory, kernel, Python, load."""
    cpu, listed = report.cpu_model(_read("/proc/cpuinfo"))
    memory_kb = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            memory_kb = int(line.split()[1])
    return {
        "cpu": cpu,
        "cpus": os.cpu_count() or listed,
        "arch": platform.machine(),
        "memory_gb": round(memory_kb / 1024 / 1024, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


# --- the run --------------------------------------------------------------------------------


def run(plan: Plan, phases: Sequence[str], workdir: Path) -> dict[str, Any]:
    """Given a plan and the phases to run, measure; return the report document."""
    results = Results()
    machine = describe_machine()
    reason = unavailable_reason()
    if reason is not None:
        raise BenchError(f"umockdev cannot run here: {reason} (tests/bootstrap installs it)")
    real_ok = Path(octoprint_bin()).exists()
    if not real_ok and "real" in phases:
        results.notes.append(
            f"no OctoPrint at {octoprint_bin()}: the real-OctoPrint figures are null"
        )
    with tmpfs_dir(results.notes) as tmpdir, contextlib.ExitStack() as stack:
        where = Where(
            workdir, Path(tmpdir) if tmpdir is not None else workdir, workdir / "bytecode"
        )
        warm_bytecode(where)
        main_bed = stack.enter_context(open_testbed(workdir / "testbed", tmpdir))
        idle_rig = StandInPrinters(
            main_bed,
            IDLE_PRINTERS,
            usb_ports=[f"1-1.{i + 1}" for i in range(IDLE_PRINTERS)],
            tag="id",
        )
        stack.callback(idle_rig.close)
        for index in range(IDLE_PRINTERS):
            idle_rig.plug(index)
        if "startup" in phases:
            measure_startup(idle_rig, where.sub("startup"), plan.startup_runs, results)

        def real_phase() -> None:
            if "real" not in phases or not real_ok:
                return
            bed = stack.enter_context(open_testbed(workdir / "testbed-real", tmpdir))
            instance = OctoPrintInstance(
                workdir / "octoprint", env=bed.env, additional_ports=["/dev/serial/by-id/*"]
            )
            with instance:
                rig = RealRig(bed, instance, SimulatedPrinters(bed))
                try:
                    measure_real(rig, where.sub("real"), plan, results)
                finally:
                    rig.printers.clear()

        if "idle" in phases:
            measure_idle(idle_rig, where.sub("idle"), plan, results, real_phase)
        else:
            real_phase()
        if "events" in phases:
            # A testbed of its own: after thousands of replugs, each new device name
            # costs the testbed owner a search through every name used before.
            events_bed = stack.enter_context(open_testbed(workdir / "testbed-events", tmpdir))
            measure_events(events_bed, where.sub("events"), plan, results)
        if "storm" in phases:
            measure_storm(main_bed, where.sub("storm"), plan, results)
        if "klipper" in phases:
            build = find_build()
            if isinstance(build, str):
                results.notes.append(f"no Klipper stack ({build}): the Klipper figures are null")
            else:
                progress(f"Klipper: {plan.klipper_cycles} replugs each, a burst, idle")
                klipper_bed = stack.enter_context(open_testbed(workdir / "testbed-klipper", tmpdir))
                klipper_where = where.sub("klipper")
                figures, details = measure_klipper(
                    klipper_bed,
                    build,
                    klipper_where.logs,
                    cycles=plan.klipper_cycles,
                    idle_seconds=plan.klipper_idle_seconds,
                    settle=SETTLE,
                    daemon_env=lambda: bytecode_env(klipper_where),
                )
                results.figures.update(figures)
                results.details.update(details)
    results.notes.append(
        "idle_requests_per_hour and poller_idle_requests_per_hour are extrapolated from the "
        f"requests counted over the idle window ({plan.idle_seconds:g} s or a little longer)"
    )
    return report.build_report(
        results.figures,
        mode=plan.mode,
        machine=machine,
        details=results.details,
        notes=results.notes,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Given the command line, run the benchmark and print its report; return the exit code.

    0 when the run finished, whatever the figures (CI's smoke run must not fail on a
    timing); with ``--check``, 1 when a target was missed. 2 when a phase broke.
    """
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Measure reconnectd on this machine (see bench/README.md)."
    )
    length = parser.add_mutually_exclusive_group()
    length.add_argument("--quick", action="store_true", help="a short run (about 3 minutes)")
    length.add_argument(
        "--smoke", action="store_true", help="the shortest run, every phase once (CI's)"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--only", default=",".join(PHASES), help=f"phases to run, of {', '.join(PHASES)}"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    parser.add_argument("--keep", action="store_true", help="keep the logs (printed at the end)")
    args = parser.parse_args(argv)
    phases = [p.strip() for p in args.only.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        parser.error(f"unknown phase(s) {', '.join(unknown)}; known: {', '.join(PHASES)}")
    plan = SMOKE if args.smoke else QUICK if args.quick else FULL
    workdir = Path(tempfile.mkdtemp(prefix="rcd-bench-logs-"))
    started = time.monotonic()
    try:
        document = run(plan, phases, workdir)
    except (BenchError, OSError, AssertionError, RuntimeError) as error:
        print(f"bench: failed: {error}\nbench: logs kept in {workdir}", file=sys.stderr)
        return 2
    document["details"]["bench_seconds"] = round(time.monotonic() - started, 1)
    if args.keep:
        progress(f"logs kept in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(report.text_table(document))
    if args.check and any(v is False for v in document["met"].values()):
        return 1
    return 0
