"""A real OctoPrint server on loopback, in a throwaway basedir, for tests.

The basedir is written before the first start so that OctoPrint comes up headless:
no first-run wizard, nothing that reaches out to the internet, short serial timeouts
(a silent firmware is noticed in seconds, not minutes), ``serial.log`` on, an admin
user and a known application key. The machine's own serial ports are blacklisted so
that an AUTO connect can never poke at real hardware.

Any OctoPrint from 1.9 on: 2.0 keeps the serial settings under
``plugins.serial_connector`` and the connection preferences under
``printerConnection``, and names two connection states differently (see
:class:`OctoPrintInstance`). ``$OCTOPRINT_BIN`` is the one most tests use;
``$OCTOPRINT_BINS`` names the others the core scenarios run against.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Callable, Union

import requests

from tests.support.cache import cache_dir

CACHE = cache_dir()
DEFAULT_OCTOPRINT_BIN = CACHE / "octoprint-1.11.8/bin/octoprint"
# The versions besides 1.11.8 that tests/bootstrap installs, when $OCTOPRINT_BINS
# does not say where they are.
OTHER_VERSIONS = ("1.9.3", "1.10.3", "2.0.0rc7")

START_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0

# The plugins that phone home or scan the network; the tests run offline.
DISABLED_PLUGINS = (
    "announcements",
    "discovery",
    "errortracking",
    "health_check",
    "pluginmanager",
    "softwareupdate",
    "tracking",
    "pi_support",
    "backup",
    "achievements",
)

# The names OctoPrint's own /dev scan picks up (util/comm.py, regex_serial_devices).
_SERIAL_NAME = re.compile(r"^(?:ttyUSB|ttyACM|tty\.usb|cu\.|cuaU|ttyS|rfcomm)")

StateCheck = Union[str, Callable[[str], bool]]


def octoprint_bin() -> str:
    """Return the OctoPrint executable tests should use: ``$OCTOPRINT_BIN`` or the bootstrap's."""
    return os.environ.get("OCTOPRINT_BIN") or str(DEFAULT_OCTOPRINT_BIN)


def other_octoprint_bins() -> dict[str, str]:
    """Return the other OctoPrint versions to test against, version to executable.

    From ``$OCTOPRINT_BINS`` (``1.9.3=/path/bin/octoprint,...``, as tests/bootstrap
    prints it), else the bootstrap's cache paths for :data:`OTHER_VERSIONS`. An
    executable may be missing: the caller decides whether that skips or fails.
    """
    listed = os.environ.get("OCTOPRINT_BINS")
    if not listed:
        return {v: str(CACHE / f"octoprint-{v}/bin/octoprint") for v in OTHER_VERSIONS}
    bins: dict[str, str] = {}
    for entry in listed.split(","):
        version, _, path = entry.strip().partition("=")
        if version and path:
            bins[version] = path
    return bins


_versions: dict[str, str] = {}


def octoprint_version(binary: str) -> str:
    """Given an OctoPrint executable, return its version (``2.0.0rc7``); raise if it has none."""
    if binary not in _versions:
        done = subprocess.run(
            [binary, "--version"],
            capture_output=True,
            text=True,
            check=True,
            stdin=subprocess.DEVNULL,
            timeout=START_TIMEOUT,
        )
        # "octoprint, version 1.11.8"
        _versions[binary] = done.stdout.strip().rsplit(" ", 1)[-1]
    return _versions[binary]


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def real_serial_ports() -> list[str]:
    """Return this machine's serial nodes that OctoPrint would offer (and AUTO would probe)."""
    try:
        names = os.listdir("/dev")
    except OSError:
        return []
    return sorted(f"/dev/{name}" for name in names if _SERIAL_NAME.match(name))


class OctoPrintInstance:
    """One OctoPrint server process; a context manager that starts and stops it.

    ``closed_state`` and ``opening_state`` are this version's words, in
    ``/api/connection`` ``current.state``, for no connection and for opening the port.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        env: Mapping[str, str] | None = None,
        additional_ports: Sequence[str] = (),
        octoprint_bin: str | None = None,
        plugins: Mapping[str, str] | None = None,
    ) -> None:
        self.workdir = Path(workdir)
        self.basedir = self.workdir / "basedir"
        self.port = port if port is not None else free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.api_key = secrets.token_hex(16)
        self.password = secrets.token_hex(8)
        self.env = dict(env or {})
        self.additional_ports = list(additional_ports)
        # Single-file plugins for the basedir's plugins/ folder: file name to source.
        self.plugins = dict(plugins or {})
        self.octoprint_bin = octoprint_bin or _default_bin()
        self.console_log = self.workdir / "octoprint-console.log"
        self.octoprint_log = self.basedir / "logs" / "octoprint.log"
        self.serial_log = self.basedir / "logs" / "serial.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._session = requests.Session()
        self._session.headers["X-Api-Key"] = self.api_key
        # OctoPrint 1.9.3 drops every connection after answering without saying so;
        # a request sent on it in that instant is reset.
        self._session.headers["Connection"] = "close"

    def __enter__(self) -> OctoPrintInstance:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        self._session.close()

    def __repr__(self) -> str:
        return f"OctoPrintInstance({self.url}, basedir={str(self.basedir)!r})"

    @property
    def version(self) -> str:
        return octoprint_version(self.octoprint_bin)

    @property
    def is_2(self) -> bool:
        """Whether this is OctoPrint 2.0 or later (connectors, new settings, new states)."""
        return int(self.version.split(".")[0]) >= 2

    @property
    def closed_state(self) -> str:
        return "Offline" if self.is_2 else "Closed"

    @property
    def opening_state(self) -> str:
        return "Connecting" if self.is_2 else "Opening serial connection"

    # -- process ---------------------------------------------------------------

    def start(self) -> None:
        """Start OctoPrint and wait until its API answers; raise with its log if it does not."""
        if self._process is not None and self._process.poll() is None:
            return
        if not Path(self.octoprint_bin).exists():
            raise FileNotFoundError(f"no OctoPrint at {self.octoprint_bin}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not (self.basedir / "config.yaml").exists():
            self._write_basedir()
        env = {**os.environ, **self.env}
        # Without this, OctoPrint's console output could be colour-coded noise in the log.
        env["NO_COLOR"] = "1"
        with open(self.console_log, "ab") as console:
            self._process = subprocess.Popen(
                [
                    self.octoprint_bin,
                    "--basedir",
                    str(self.basedir),
                    "serve",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--iknowwhatimdoing",
                ],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                # Its own session: a Ctrl-C in the terminal running pytest is the test's.
                start_new_session=True,
            )
        try:
            self._wait_until_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_until_ready(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        last = "no answer yet"
        while time.monotonic() < deadline:
            code = self._process.poll()
            if code is not None:
                raise RuntimeError(
                    f"OctoPrint exited with status {code} while starting\n"
                    f"{self._logs_for_failure()}"
                )
            try:
                # /api/version, not /: a placeholder server answers / before the API is up.
                # A connection of its own, closed after each answer: one kept alive by
                # the session could belong to that placeholder, which resets it when
                # the real server takes over (seen with 1.9.3).
                answer = requests.get(
                    f"{self.url}/api/version",
                    headers={"X-Api-Key": self.api_key, "Connection": "close"},
                    timeout=2,
                )
            except requests.RequestException as exc:
                last = type(exc).__name__
            else:
                if answer.status_code == 200:
                    return
                last = f"HTTP {answer.status_code}"
            time.sleep(0.1)
        raise RuntimeError(
            f"OctoPrint not ready within {START_TIMEOUT:g} s (last: {last})\n"
            f"{self._logs_for_failure()}"
        )

    def stop(self) -> None:
        """Stop OctoPrint: SIGTERM, then SIGKILL if it does not exit in time."""
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(STOP_TIMEOUT)

    def restart(self) -> None:
        """Stop and start again, keeping the basedir (users, key, settings)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """Return the server's process id while it runs (to signal it), else None."""
        if self._process is None or self._process.poll() is not None:
            return None
        return self._process.pid

    def _write_basedir(self) -> None:
        self.basedir.mkdir(parents=True, exist_ok=True)
        serial: dict[str, Any] = {
            "log": True,
            # Autodetection (a connect without a baudrate, as reconnectd's by default)
            # tries 7 baudrates 3 times each: 42 s at the default 2 s, 10.5 s here.
            "timeout": {
                "connection": 2,
                "communication": 1,
                "temperature": 1,
                "detectionFirst": 0.5,
                "detectionConsecutive": 0.5,
            },
            "maxCommunicationTimeouts": {"idle": 1},
            "additionalPorts": self.additional_ports,
        }
        config: dict[str, Any] = {
            "server": {
                "firstRun": False,
                "onlineCheck": {"enabled": False},
                "pluginBlacklist": {"enabled": False},
                "pythonEolCheck": {"enabled": False},
            },
            "plugins": {"_disabled": list(DISABLED_PLUGINS)},
        }
        if self.is_2:
            # 2.0 (plugins/serial_connector): the serial settings belong to the
            # serial connector plugin, "blacklisted" became "blocklisted", and
            # autoconnect is the printer connection's.
            serial["blocklistedPorts"] = real_serial_ports()
            config["plugins"]["serial_connector"] = serial
            config["printerConnection"] = {"autoconnect": False}
        else:
            serial["blacklistedPorts"] = real_serial_ports()
            config["serial"] = {"autoconnect": False, **serial}
        # JSON is YAML: no YAML library needed in the test venv.
        (self.basedir / "config.yaml").write_text(json.dumps(config, indent=2) + "\n")
        if self.plugins:
            (self.basedir / "plugins").mkdir(exist_ok=True)
            for name, source in self.plugins.items():
                (self.basedir / "plugins" / name).write_text(source)
        subprocess.run(
            [
                self.octoprint_bin,
                "--basedir",
                str(self.basedir),
                "user",
                "add",
                "admin",
                "--password",
                self.password,
                "--admin",
            ],
            check=True,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, **self.env},
            timeout=START_TIMEOUT,
        )
        keys = self.basedir / "data" / "appkeys" / "keys.yaml"
        keys.parent.mkdir(parents=True, exist_ok=True)
        keys.write_text(json.dumps({"admin": [{"app_id": "tests", "api_key": self.api_key}]}))

    # -- logs ------------------------------------------------------------------

    def log_tail(self, n: int = 50) -> str:
        """Return the last ``n`` lines of octoprint.log (or of its console if there is none)."""
        for path in (self.octoprint_log, self.console_log):
            if path.exists():
                lines = path.read_text(errors="replace").splitlines()
                return "\n".join(lines[-n:])
        return "(no log yet)"

    def serial_log_tail(self, n: int = 30) -> str:
        """Return the last ``n`` lines of serial.log."""
        if not self.serial_log.exists():
            return "(no serial.log)"
        return "\n".join(self.serial_log.read_text(errors="replace").splitlines()[-n:])

    def _logs_for_failure(self) -> str:
        return (
            f"--- octoprint.log (tail) ---\n{self.log_tail(40)}\n"
            f"--- console (tail) ---\n{_tail(self.console_log, 20)}"
        )

    # -- API -------------------------------------------------------------------

    def _get(self, path: str) -> dict[str, Any]:
        answer = self._session.get(f"{self.url}{path}", timeout=HTTP_TIMEOUT)
        answer.raise_for_status()
        body: dict[str, Any] = answer.json()
        return body

    def _post_connection(self, body: dict[str, Any]) -> None:
        answer = self._session.post(f"{self.url}/api/connection", json=body, timeout=HTTP_TIMEOUT)
        if answer.status_code != 204:
            raise AssertionError(
                f"POST /api/connection {body} answered HTTP {answer.status_code}: {answer.text}"
            )

    def connection(self) -> dict[str, Any]:
        """Return the body of ``GET /api/connection``."""
        return self._get("/api/connection")

    def job(self) -> dict[str, Any]:
        """Return the body of ``GET /api/job`` (its ``state`` text and ``error``)."""
        return self._get("/api/job")

    def connect(self, port: str, baudrate: int = 115200) -> None:
        """Ask OctoPrint to connect; it answers at once and connects in the background."""
        self._post_connection({"command": "connect", "port": port, "baudrate": baudrate})

    def disconnect(self) -> None:
        """Ask OctoPrint to disconnect."""
        self._post_connection({"command": "disconnect"})

    def wait_for_state(self, predicate_or_state: StateCheck, timeout: float) -> dict[str, Any]:
        """Given a state text, or a predicate on the state text, poll ``/api/connection``.

        Return the whole body once ``current.state`` equals the text (or satisfies
        the predicate); raise AssertionError naming the last state and showing the
        tail of octoprint.log on timeout.
        """
        check: Callable[[str], bool]
        if isinstance(predicate_or_state, str):
            wanted = predicate_or_state

            def check(state: str) -> bool:
                return state == wanted

            what = repr(wanted)
        else:
            check = predicate_or_state
            what = getattr(predicate_or_state, "__name__", "predicate")
        deadline = time.monotonic() + timeout
        while True:
            body = self.connection()
            if check(body["current"]["state"]):
                return body
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"OctoPrint did not reach {what} within {timeout:g} s; "
                    f"last state {body['current']['state']!r} (port {body['current']['port']!r})"
                    f"\n--- octoprint.log (tail) ---\n{self.log_tail(30)}"
                )
            time.sleep(0.05)

    def reset(self) -> None:
        """Disconnect and wait until OctoPrint has no connection (``closed_state``)."""
        self.disconnect()
        self.wait_for_state(self.closed_state, 15)


def _default_bin() -> str:
    return octoprint_bin()


def _tail(path: Path, n: int) -> str:
    if not path.exists():
        return "(none)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
