"""A real Klipper stack on loopback for tests: Linux-process MCUs, Klippy and Moonraker.

Built by tests/bootstrap (see :mod:`tests.support.klipper_build`); measured behaviour
and traps: ``shared/notes/klipper-facts.md``. Usage::

    with KlipperStack(tmp_path) as stack:    # ready when this returns
        stack.power_off()                      # the board is switched off
        stack.wait_for_state("shutdown", 10)   # "Lost communication with MCU 'mcu'"
        stack.power_on()                       # a fresh, unconfigured MCU
        stack.firmware_restart()
        stack.wait_for_state("ready", 10)

What each piece models:

- An MCU is ``klipper.elf -I LINK``: a process that makes a pty and points LINK at it.
  Switching the board off (:meth:`KlipperStack.power_off`) kills it *and* removes LINK.
  Killing alone would leave LINK dangling, and the kernel hands the lowest free pty
  number to the next pty anyone opens, which can bring a stale link back to life.
  Switching on starts a new process: an unconfigured MCU, as after a real power cycle.
- With ``relay=True`` each MCU sits behind a pty relay (:mod:`tests.support.pty_relay`),
  the USB cable: Klipper's ``[mcu] serial`` names the relay's link. Dropping the link
  (:meth:`KlipperStack.drop_link`) removes that node while the MCU stays up and
  configured, as a board with its own power supply whose USB link was lost.
- Moonraker's API key: with ``api_key=True`` Moonraker trusts no client, so every
  request without the right ``X-Api-Key`` gets 401. The key is Moonraker's own: a first
  start that trusts loopback and is not connected to Klippy is asked for it
  (``GET /access/api_key``, the documented way), then Moonraker is restarted without
  trusted clients. The key persists in Moonraker's database, so it survives
  :meth:`KlipperStack.restart_moonraker`. The first start costs about 1.1 s.

Sockets, links, configs and Moonraker's data live under a short directory
(``/tmp/rk-XXXXXXXX``): a unix socket path may not exceed 107 bytes, and pytest's
``tmp_path`` can. Logs go to ``workdir``, which outlives the stack for a post-mortem.
Every process is started in its own session with a parent-death signal, so even a
test process that dies leaves none behind; :meth:`KlipperStack.close` stops them all.

:class:`SimulatedKlipperBoard` adds the udev side: the board's USB device on a
umockdev testbed, switched together with its MCU::

    with Testbed(tmp_path / "bench") as testbed, KlipperStack(tmp_path / "k") as stack:
        board = SimulatedKlipperBoard(testbed, stack)  # plugged: 1d50:614e, ttyACM0
        ...  # reconnectd runs with testbed.env; Klipper's [mcu] serial: board.serial_path
        board.switch_off()                             # MCU gone, then udev "remove"
        board.switch_on()                              # MCU node back, then udev "add"
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Union

import requests

from tests.support.klipper_build import KlipperBuild, find_build
from tests.support.testbed import Plugged, Testbed

MAIN_MCU = "mcu"
START_TIMEOUT = 30.0  # from nothing to "ready": 1 to 2 s measured, more on a busy machine
STOP_TIMEOUT = 5.0
HTTP_TIMEOUT = 5.0
POLL = 0.05
RELAY_SCRIPT = Path(__file__).with_name("pty_relay.py")
PR_SET_PDEATHSIG = 1
LOOPBACK = "127.0.0.1"
RUN_PREFIX = "rk-"
OWNER_FILE = "owner.pid"

Objects = Union[Sequence[str], Mapping[str, Optional[Sequence[str]]]]


class KlipperStackError(RuntimeError):
    """A process of the stack died, refused to start, or a state never came."""


@dataclass
class _Mcu:
    """One MCU: the process's own pty link, and the path Klipper's config names."""

    name: str
    link: Path  # klipper.elf -I LINK
    serial: Path  # [mcu] serial: the relay's link, or ``link`` itself
    log: Path
    process: subprocess.Popen[bytes] | None = None
    relay: subprocess.Popen[bytes] | None = None

    @property
    def section(self) -> str:
        return "mcu" if self.name == MAIN_MCU else f"mcu {self.name}"


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: a test process killed outright must
    # not leave MCUs, Klippy or Moonraker running (they would hold ports and ptys).
    # The signal follows the *thread* that started the child: start stacks from a
    # thread that outlives them (pytest's own).
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _sweep_abandoned_run_dirs() -> None:
    # A test process killed outright takes its stack's processes with it (the
    # parent-death signal) but cannot remove its run directory: the next stack does,
    # for every one whose owner is gone. Directories of live owners are left alone.
    for run_dir in Path("/tmp").glob(f"{RUN_PREFIX}*"):
        try:
            owner = int((run_dir / OWNER_FILE).read_text())
        except (OSError, ValueError):
            continue  # not one of ours, or still being made
        try:
            os.kill(owner, 0)
        except ProcessLookupError:
            shutil.rmtree(run_dir, ignore_errors=True)
        except PermissionError:
            pass  # alive, someone else's


def free_port() -> int:
    """Return a TCP port on loopback that nothing listens on at this moment."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def first_line(message: str) -> str:
    """Given a Klippy state_message, return its first non-empty line.

    Every shutdown or error message carries the same multi-line tail; the first line
    is the cause ("Lost communication with MCU 'mcu'").
    """
    return next((line for line in message.splitlines() if line.strip()), "")


class KlipperStack:
    """A running Klipper stack; use as a context manager. Ready when constructed.

    ``mcus`` names the MCUs: ``"mcu"`` is ``[mcu]``, any other name ``[mcu NAME]``.
    ``api_key=True`` makes Moonraker require a key (:attr:`api_key`); otherwise it
    trusts loopback. ``relay=True`` puts each MCU behind a pty relay (a USB link that
    can drop while the board keeps power). ``port`` defaults to a free one.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        mcus: Sequence[str] = (MAIN_MCU,),
        api_key: bool = False,
        relay: bool = False,
        port: int | None = None,
        build: KlipperBuild | None = None,
        extra_config: str = "",
        start_timeout: float = START_TIMEOUT,
    ) -> None:
        if MAIN_MCU not in mcus or len(set(mcus)) != len(mcus):
            raise ValueError(f"mcus must name {MAIN_MCU!r} once, and each MCU once: {mcus!r}")
        if build is None:
            found = find_build()
            if isinstance(found, str):
                raise KlipperStackError(found)
            build = found
        self.build = build
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.relay = relay
        self.requires_key = api_key
        self.port = port or free_port()
        self.url = f"http://{LOOPBACK}:{self.port}"
        self.api_key: str | None = None
        _sweep_abandoned_run_dirs()
        self.run_dir = Path(tempfile.mkdtemp(prefix=RUN_PREFIX, dir="/tmp"))
        (self.run_dir / OWNER_FILE).write_text(str(os.getpid()))
        self.data_dir = self.run_dir / "data"
        self.gcodes_dir = self.data_dir / "gcodes"
        self.printer_cfg = self.data_dir / "config/printer.cfg"
        self.moonraker_conf = self.run_dir / "moonraker.conf"
        self.klippy_socket = self.run_dir / "klippy.sock"
        self.klippy_log = self.workdir / "klippy.log"
        self.moonraker_log = self.workdir / "moonraker.log"
        self._mcus: dict[str, _Mcu] = {}
        for name in mcus:
            link = self.run_dir / (f"{name}-board" if relay else name)
            self._mcus[name] = _Mcu(
                name=name,
                link=link,
                serial=self.run_dir / name if relay else link,
                log=self.workdir / f"mcu-{name}.log",
            )
        self._klippy: subprocess.Popen[bytes] | None = None
        self._moonraker: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        self._closed = False
        try:
            self._start(extra_config, start_timeout)
        except BaseException:
            self.close()
            raise

    # -- the context manager -----------------------------------------------------

    def __enter__(self) -> KlipperStack:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what tests read ---------------------------------------------------------

    @property
    def mcu_names(self) -> list[str]:
        """Return the names of the MCUs, ``"mcu"`` first."""
        return list(self._mcus)

    def serial_path(self, mcu: str = MAIN_MCU) -> Path:
        """Given an MCU's name, return the path its ``[mcu] serial`` names."""
        return self._mcu(mcu).serial

    @property
    def serial_paths(self) -> dict[str, Path]:
        """Return every MCU's ``serial`` path, by MCU name."""
        return {name: m.serial for name, m in self._mcus.items()}

    def mcu_pid(self, mcu: str = MAIN_MCU) -> int | None:
        """Given an MCU's name, return its process id, or None while it is off."""
        process = self._mcu(mcu).process
        return None if process is None or process.poll() is not None else process.pid

    def is_on(self, mcu: str = MAIN_MCU) -> bool:
        """Given an MCU's name, return whether its board is switched on."""
        return self.mcu_pid(mcu) is not None

    @property
    def headers(self) -> dict[str, str]:
        """Return the headers a client needs: ``X-Api-Key`` when a key is required."""
        return {"X-Api-Key": self.api_key} if self.api_key else {}

    # -- the board ---------------------------------------------------------------

    def power_off(self, mcu: str = MAIN_MCU) -> None:
        """Given an MCU's name, switch its board off: the USB link (relay) and the MCU
        process die and their links are removed, so the node Klipper names vanishes."""
        m = self._mcu(mcu)
        self._stop_relay(m)
        if m.process is not None:
            _kill(m.process, signal.SIGKILL)
            m.process = None
        with contextlib.suppress(FileNotFoundError):
            m.link.unlink()

    def power_on(self, mcu: str = MAIN_MCU, *, timeout: float = 5.0) -> None:
        """Given an MCU's name, switch its board on: a fresh MCU process (and relay);
        return once the path Klipper names exists. Raise if the board is already on."""
        m = self._mcu(mcu)
        if m.process is not None and m.process.poll() is None:
            raise KlipperStackError(f"MCU {mcu!r} is already on")
        with contextlib.suppress(FileNotFoundError):
            m.link.unlink()  # a dangling link from a crash would look present at once
        m.process = self._spawn([str(self.build.mcu_elf), "-I", str(m.link)], m.log)
        self._wait_for_path(m.link, timeout, f"MCU {mcu!r}", m.process, m.log)
        if self.relay:
            self._start_relay(m, timeout)

    def drop_link(self, mcu: str = MAIN_MCU) -> None:
        """Given an MCU's name, drop its USB link while the board keeps power: the
        relay dies and its node vanishes; the MCU stays up and configured."""
        m = self._mcu(mcu)
        if not self.relay:
            raise KlipperStackError("drop_link needs KlipperStack(relay=True)")
        self._stop_relay(m)

    def restore_link(self, mcu: str = MAIN_MCU, *, timeout: float = 5.0) -> None:
        """Given an MCU's name, bring its USB link back: a new relay and node."""
        m = self._mcu(mcu)
        if not self.relay:
            raise KlipperStackError("restore_link needs KlipperStack(relay=True)")
        if m.relay is not None and m.relay.poll() is None:
            raise KlipperStackError(f"the link of MCU {mcu!r} is already up")
        self._start_relay(m, timeout)

    # -- Moonraker ---------------------------------------------------------------

    def stop_moonraker(self) -> None:
        """Stop Moonraker (SIGTERM, as systemd does); Klippy and the MCUs keep running."""
        if self._moonraker is not None:
            _kill(self._moonraker, signal.SIGTERM)
            self._moonraker = None

    def start_moonraker(self, *, wait: bool = True, timeout: float = START_TIMEOUT) -> None:
        """Start Moonraker; with ``wait``, return once ``/printer/info`` answers 200."""
        if self._moonraker is not None and self._moonraker.poll() is None:
            raise KlipperStackError("Moonraker is already running")
        self._moonraker = self._spawn(
            [
                str(self.build.moonraker_python),
                str(self.build.moonraker_dir / "moonraker/moonraker.py"),
                "-d",
                str(self.data_dir),
                "-c",
                str(self.moonraker_conf),
                "-l",
                str(self.moonraker_log),
            ],
            self.workdir / "moonraker.out",
        )
        if wait:
            self._wait_for_info(timeout)

    def restart_moonraker(self, *, wait: bool = True, timeout: float = START_TIMEOUT) -> None:
        """Stop and start Moonraker; with ``wait``, return once Klippy is reachable again."""
        self.stop_moonraker()
        self.start_moonraker(wait=wait, timeout=timeout)

    # -- requests ----------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Given a method and a path (``/printer/info``), return Moonraker's response,
        with the key when one is required; raise requests' errors when unreachable."""
        headers = {**self.headers, **kwargs.pop("headers", {})}
        kwargs.setdefault("timeout", HTTP_TIMEOUT)
        return self._session.request(method, self.url + path, headers=headers, **kwargs)

    def result(self, method: str, path: str, **kwargs: Any) -> Any:
        """Given a request, return its ``result``; raise KlipperStackError unless 200."""
        response = self.request(method, path, **kwargs)
        if response.status_code != 200:
            raise KlipperStackError(
                f"{method} {path}: {response.status_code} {_error_message(response)}"
            )
        return response.json()["result"]

    def info(self) -> dict[str, Any]:
        """Return ``GET /printer/info``'s result (``state``, ``state_message``, ...)."""
        result: dict[str, Any] = self.result("GET", "/printer/info")
        return result

    def query(self, objects: Objects) -> dict[str, Any]:
        """Given printer objects (names, or names to fields or None for all), return
        their status, e.g. ``query({"webhooks": None, "print_stats": ["state"]})``."""
        wanted = objects if isinstance(objects, Mapping) else {name: None for name in objects}
        params = {name: ",".join(fields) if fields else "" for name, fields in wanted.items()}
        status: dict[str, Any] = self.result("GET", "/printer/objects/query", params=params)[
            "status"
        ]
        return status

    def firmware_restart(self) -> None:
        """Send ``POST /printer/firmware_restart`` (acknowledged at once, not done)."""
        self.result("POST", "/printer/firmware_restart")

    def host_restart(self) -> None:
        """Send ``POST /printer/restart``: Klippy restarts, the MCUs are not reset."""
        self.result("POST", "/printer/restart")

    def emergency_stop(self) -> None:
        """Send ``POST /printer/emergency_stop``: Klippy shuts down "due to webhooks request"."""
        self.result("POST", "/printer/emergency_stop")

    def gcode(self, script: str) -> None:
        """Given G-code, run it through ``POST /printer/gcode/script``."""
        self.result("POST", "/printer/gcode/script", json={"script": script})

    def m112(self) -> None:
        """Send M112: Klippy shuts down "due to M112 command"."""
        self.gcode("M112")

    def start_print(self, seconds: float, *, name: str = "reconnectd-test.gcode") -> str:
        """Given a duration, upload a G-code file that prints for about that long, start
        it, and return its name once ``print_stats`` reads ``printing``.

        ``kinematics: none`` moves nothing: each ``G4 P500`` dwell is half a second of print.
        """
        dwells = max(1, round(seconds * 2))
        text = "G28\n" + "G1 X0 F600\nG4 P500\n" * dwells
        uploaded = self.request(
            "POST",
            "/server/files/upload",
            files={"file": (name, text.encode(), "application/octet-stream")},
            data={"root": "gcodes"},
        )
        if uploaded.status_code != 201:
            raise KlipperStackError(f"upload {name}: {uploaded.status_code} {uploaded.text[:200]}")
        self.result("POST", "/printer/print/start", params={"filename": name})
        deadline = time.monotonic() + 10
        while True:
            state = self.query({"print_stats": ["state"]})["print_stats"]["state"]
            if state == "printing":
                return name
            if time.monotonic() > deadline:
                raise KlipperStackError(f"print {name} did not start: print_stats {state!r}")
            time.sleep(POLL)

    def wait_for_state(
        self,
        state: str | Collection[str],
        timeout: float,
        *,
        message: str | None = None,
    ) -> dict[str, Any]:
        """Given Klippy state(s) and a timeout, return ``/printer/info``'s result once
        its state is one of them (and, with ``message``, the first line of its
        state_message starts with that); raise KlipperStackError with the last answer
        seen if that does not happen in time. 503s and refusals on the way are waited out.
        """
        wanted = {state} if isinstance(state, str) else set(state)
        deadline = time.monotonic() + timeout
        last = "no answer yet"
        while True:
            self._check_alive()
            try:
                response = self.request("GET", "/printer/info", timeout=min(HTTP_TIMEOUT, timeout))
            except requests.RequestException as e:
                last = f"unreachable ({type(e).__name__})"
            else:
                if response.status_code == 200:
                    result: dict[str, Any] = response.json()["result"]
                    first = first_line(result["state_message"])
                    last = f"{result['state']}: {first}"
                    if result["state"] in wanted and (message is None or first.startswith(message)):
                        return result
                else:
                    last = f"{response.status_code} {_error_message(response)}"
            if time.monotonic() >= deadline:
                want = "/".join(sorted(wanted)) + (f" ({message})" if message else "")
                raise KlipperStackError(
                    f"Klippy not {want} within {timeout:g} s; last: {last}\n{self.log_tails()}"
                )
            time.sleep(POLL)

    def log_tails(self, lines: int = 15) -> str:
        """Return the last lines of Klippy's and Moonraker's logs, for error messages."""
        parts = []
        for path in (self.klippy_log, self.moonraker_log):
            try:
                tail = path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                tail = ["(no log)"]
            parts.append(f"--- {path}\n" + "\n".join(tail))
        return "\n".join(parts)

    # -- the end -----------------------------------------------------------------

    def close(self) -> None:
        """Stop every process of the stack and remove its sockets, links and data;
        the logs in ``workdir`` stay. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        self.stop_moonraker()
        if self._klippy is not None:
            _kill(self._klippy, signal.SIGTERM)
            self._klippy = None
        for m in self._mcus.values():
            self.power_off(m.name)
        self._session.close()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    # -- inside ------------------------------------------------------------------

    def _start(self, extra_config: str, timeout: float) -> None:
        self.gcodes_dir.mkdir(parents=True)
        self.printer_cfg.parent.mkdir(parents=True)
        self.printer_cfg.write_text(self._printer_cfg(extra_config))
        for m in self._mcus.values():
            self.power_on(m.name)
        self._klippy = self._spawn(
            [
                str(self.build.klippy_python),
                str(self.build.klipper_dir / "klippy/klippy.py"),
                str(self.printer_cfg),
                "-a",
                str(self.klippy_socket),
                "-l",
                str(self.klippy_log),
            ],
            self.workdir / "klippy.out",
        )
        if self.requires_key:
            self.api_key = self._first_start_for_key(timeout)
        self.moonraker_conf.write_text(self._moonraker_conf(trusted=not self.requires_key))
        self.start_moonraker(wait=False)
        # A config Klippy rejects is an error at once: say so rather than wait it out.
        info = self.wait_for_state(("ready", "error", "shutdown"), timeout)
        if info["state"] != "ready":
            raise KlipperStackError(
                f"Klippy started {info['state']}: {first_line(info['state_message'])}\n"
                f"{self.log_tails()}"
            )

    def _printer_cfg(self, extra: str) -> str:
        sections = []
        for m in self._mcus.values():
            # restart_method: command, or Klippy tries an Arduino-style DTR reset on
            # the pty and Moonraker hangs (facts page).
            sections.append(f"[{m.section}]\nserial: {m.serial}\nrestart_method: command\n")
        sections.append(
            # Both limits are required even with no kinematics.
            "[printer]\nkinematics: none\nmax_velocity: 100\nmax_accel: 100\n"
        )
        # Moonraker's gcodes root is Klipper's virtual SD card: uploads can be printed.
        sections.append(f"[virtual_sdcard]\npath: {self.gcodes_dir}\n")
        sections.append("[pause_resume]\n")
        sections.append("[display_status]\n")
        if extra:
            sections.append(extra.strip() + "\n")
        return "\n".join(sections)

    def _moonraker_conf(self, *, trusted: bool, klippy_socket: Path | None = None) -> str:
        text = (
            f"[server]\nhost: {LOOPBACK}\nport: {self.port}\n"
            f"klippy_uds_address: {klippy_socket or self.klippy_socket}\n\n"
            # No systemd or D-Bus here; Moonraker must not try to manage services.
            "[machine]\nprovider: none\nvalidate_service: False\nvalidate_config: False\n\n"
        )
        if trusted:
            text += "[authorization]\ntrusted_clients:\n    127.0.0.0/8\n"
        else:
            # The section is there (the API key works) but trusts nobody.
            text += "[authorization]\n"
        return text

    def _first_start_for_key(self, timeout: float) -> str:
        # A first Moonraker that trusts loopback creates the key in its database and
        # hands it out. It points at a Klippy socket that does not exist, so the real
        # Klippy only ever meets the Moonraker the test talks to.
        self.moonraker_conf.write_text(
            self._moonraker_conf(trusted=True, klippy_socket=self.run_dir / "nobody.sock")
        )
        self.start_moonraker(wait=False)
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._check_alive()
                try:
                    response = self._session.get(self.url + "/access/api_key", timeout=HTTP_TIMEOUT)
                except requests.RequestException:
                    response = None
                if response is not None and response.status_code == 200:
                    return str(response.json()["result"])
                if time.monotonic() > deadline:
                    raise KlipperStackError(
                        f"Moonraker gave no API key within {timeout:g} s\n{self.log_tails()}"
                    )
                time.sleep(POLL)
        finally:
            self.stop_moonraker()

    def _start_relay(self, m: _Mcu, timeout: float) -> None:
        with contextlib.suppress(FileNotFoundError):
            m.serial.unlink()
        log = self.workdir / f"relay-{m.name}.log"
        m.relay = self._spawn([sys.executable, str(RELAY_SCRIPT), str(m.serial), str(m.link)], log)
        self._wait_for_path(m.serial, timeout, f"relay of {m.name!r}", m.relay, log)

    def _stop_relay(self, m: _Mcu) -> None:
        if m.relay is not None:
            # SIGTERM: the relay removes its own link on the way out, like a node.
            _kill(m.relay, signal.SIGTERM)
            m.relay = None
        if self.relay:
            with contextlib.suppress(FileNotFoundError):
                m.serial.unlink()

    def _spawn(self, argv: list[str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.run_dir,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _wait_for_path(
        self,
        path: Path,
        timeout: float,
        what: str,
        process: subprocess.Popen[bytes],
        log: Path,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():  # follows the link: a valid pty, not a stale one
            if process.poll() is not None:
                raise KlipperStackError(
                    f"{what} exited with {process.returncode}; log {log}:\n{_tail(log)}"
                )
            if time.monotonic() > deadline:
                raise KlipperStackError(f"{what}: no {path} within {timeout:g} s")
            time.sleep(0.01)

    def _wait_for_info(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive()
            with contextlib.suppress(requests.RequestException):
                if self.request("GET", "/printer/info").status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise KlipperStackError(
                    f"Moonraker did not reach Klippy within {timeout:g} s\n{self.log_tails()}"
                )
            time.sleep(POLL)

    def _check_alive(self) -> None:
        for what, process in (("Klippy", self._klippy), ("Moonraker", self._moonraker)):
            if process is not None and process.poll() is not None:
                raise KlipperStackError(
                    f"{what} exited with {process.returncode}\n{self.log_tails()}"
                )

    def _mcu(self, name: str) -> _Mcu:
        try:
            return self._mcus[name]
        except KeyError:
            raise KeyError(f"no MCU {name!r}; this stack has {list(self._mcus)}") from None


def _kill(process: subprocess.Popen[bytes], sig: int) -> None:
    """Given a process started in its own session, signal its group and reap it."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text[:200]


# -- the udev side ------------------------------------------------------------------


class SimulatedKlipperBoard:
    """One Klipper board as both sides see it, switched on and off as one.

    The udev side is a ``klipper`` device on a umockdev testbed (1d50:614e, ttyACM,
    ``/dev/serial/by-id/usb-Klipper_stm32f446xx_<serial>-if00``): what reconnectd
    matches and watches. Klippy's side is the stack's MCU behind ``[mcu] serial``.

    On real hardware these are one thing: the by-id link is udev's name for the tty
    the board's USB device creates, and Klipper's ``[mcu] serial`` normally names that
    very link. Here Klippy runs outside the testbed (it cannot open the testbed's
    ptys' far end as an MCU), so ``[mcu] serial`` names the MCU's own pty link,
    :attr:`serial_path`, and this class keeps the two in step, in the kernel's order:
    switching off, the MCU's line dies first (Klippy sees the hang-up) and then udev
    hears ``remove``; switching on, the MCU's node exists before udev announces
    ``add``, as a node exists before udev's rules run. So when reconnectd hears the
    device come back, the path Klipper names exists, and not before it left.

    The two paths differ (by-id inside the testbed, the MCU link outside): a check
    that compares Klipper's ``serial`` with the matched device's by-id link sees a
    mismatch here, unless told this board's pair (:attr:`by_id`, :attr:`serial_path`).
    """

    def __init__(
        self,
        testbed: Testbed,
        stack: KlipperStack,
        mcu: str = MAIN_MCU,
        *,
        serial: str | None = None,
        usb_port: str | None = None,
    ) -> None:
        self.testbed = testbed
        self.stack = stack
        self.mcu = mcu
        # One hub port per board: "1-1" for the main MCU, "1-2"... for the others.
        self.usb_port = usb_port or f"1-{stack.mcu_names.index(mcu) + 1}"
        # Each board its own serial (a chip's unique id is 24 hex digits).
        self.serial = serial or (
            None if mcu == MAIN_MCU else hashlib.sha256(mcu.encode()).hexdigest()[:24].upper()
        )
        self._tty: str | None = None
        self.plugged: Plugged | None = None
        if stack.is_on(mcu):
            self._plug()

    @property
    def serial_path(self) -> Path:
        """Return the path Klipper's ``[mcu] serial`` names for this board."""
        return self.stack.serial_path(self.mcu)

    @property
    def by_id(self) -> str | None:
        """Return the board's ``/dev/serial/by-id`` link in the testbed, None while off."""
        return None if self.plugged is None else self.plugged.by_id

    @property
    def is_on(self) -> bool:
        """Return whether the board is switched on (its USB device is present)."""
        return self.plugged is not None

    def switch_off(self) -> None:
        """Switch the board off: Klippy loses its MCU, then udev hears ``remove``."""
        self.stack.power_off(self.mcu)
        self._unplug()

    def switch_on(self) -> None:
        """Switch the board on: a fresh MCU whose node exists, then udev's ``add``."""
        self.stack.power_on(self.mcu)
        self._plug()

    def pull_cable(self) -> None:
        """Pull the USB cable of a board with its own power (needs ``relay=True``): the
        link and the device vanish, the MCU stays up and configured."""
        self.stack.drop_link(self.mcu)
        self._unplug()

    def plug_cable(self) -> None:
        """Plug the cable back: the link returns, then udev's ``add``."""
        self.stack.restore_link(self.mcu)
        self._plug()

    def close(self) -> None:
        """Unplug the USB device if it is plugged (the stack is the caller's to close)."""
        self._unplug()

    def _plug(self) -> None:
        if self.plugged is not None:
            raise KlipperStackError(f"board {self.mcu!r} is already plugged")
        # The kernel gives the node its old name back once nothing holds it.
        self.plugged = self.testbed.plug(
            "klipper", serial=self.serial, usb_port=self.usb_port, tty=self._tty
        )
        self._tty = self.plugged.tty

    def _unplug(self) -> None:
        if self.plugged is not None:
            self.testbed.unplug(self.plugged)
            self.plugged = None


@contextlib.contextmanager
def klipper_board(
    testbed: Testbed, stack: KlipperStack, mcu: str = MAIN_MCU, **kwargs: Any
) -> Iterator[SimulatedKlipperBoard]:
    """Given a testbed and a stack, yield a :class:`SimulatedKlipperBoard`, unplugged at the end."""
    board = SimulatedKlipperBoard(testbed, stack, mcu, **kwargs)
    try:
        yield board
    finally:
        board.close()
