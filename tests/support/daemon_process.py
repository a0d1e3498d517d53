"""The real ``reconnectd`` process, started the way systemd starts it.

It gets a config file, ``NOTIFY_SOCKET`` bound here to a real datagram socket,
``RUNTIME_DIRECTORY`` and ``STATE_DIRECTORY`` in a temp dir, and whatever extra
environment the test gives (a umockdev testbed's). Its stderr goes to a file the
test can read and assert on.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, TypeVar

from tests.support.notify_socket import NotifySocket

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


class DaemonProcess:
    """One run of ``python -m reconnectd run``; a context manager that stops it."""

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        *,
        env: Mapping[str, str] | None = None,
        args: tuple[str, ...] = (),
        watchdog_usec: int | None = None,
        command: Sequence[str] | None = None,
        user: tuple[int, int] | None = None,
        verbose: bool = True,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = workdir / "reconnectd.toml"
        self.config_path.write_text(config_text)
        # As a careful admin keeps it: it may hold an inline key.
        self.config_path.chmod(0o600)
        self.runtime_dir = workdir / "run"
        self.state_dir = workdir / "state"
        self.runtime_dir.mkdir(exist_ok=True)
        self.state_dir.mkdir(exist_ok=True)
        self.log_path = workdir / "reconnectd.log"
        self.notify_path = workdir / "notify.sock"
        self._extra_env = dict(env or {})
        self._args = args
        self._watchdog_usec = watchdog_usec
        # An installed ``reconnectd`` instead of this checkout's code, and the
        # (uid, gid) to run it as: systemd's User=/Group= for the unprivileged service.
        self._command = list(command) if command is not None else None
        self._user = user
        # Debug lines by default (tests read them); without, as the unit runs it.
        self._verbose = verbose
        if user is not None:
            for path in (workdir, self.config_path, self.runtime_dir, self.state_dir):
                os.chown(path, *user)
        self._notify: NotifySocket | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None

    # --- life cycle ---------------------------------------------------------

    def start(self, *, wait_ready: bool = True) -> DaemonProcess:
        """Start the process; with ``wait_ready``, return once it sent READY=1."""
        self._notify = NotifySocket(self.notify_path)
        if self._user is not None:
            # systemd's notify socket accepts datagrams from any user of the host.
            os.chmod(self.notify_path, 0o666)
        env = dict(os.environ)
        env.update(self._extra_env)
        env.update(
            {
                "RECONNECTD_CONFIG": str(self.config_path),
                "NOTIFY_SOCKET": str(self.notify_path),
                "RUNTIME_DIRECTORY": str(self.runtime_dir),
                "STATE_DIRECTORY": str(self.state_dir),
                "PYTHONPATH": str(REPO),
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.pop("JOURNAL_STREAM", None)
        if self._watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(self._watchdog_usec)
        if self._command is not None:
            env.pop("PYTHONPATH")
        self._log_file = self.log_path.open("ab")
        command = self._command or [sys.executable, "-m", "reconnectd"]
        self._process = subprocess.Popen(
            [*command, *(["-v"] if self._verbose else []), "run", *self._args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=self._log_file,
            cwd=self.workdir,
            user=None if self._user is None else self._user[0],
            group=None if self._user is None else self._user[1],
            extra_groups=None if self._user is None else [],
        )
        if wait_ready:
            self.wait_for_notification(lambda m: m.startswith("READY=1"), timeout=20)
        return self

    def signal(self, signum: int) -> None:
        assert self._process is not None
        self._process.send_signal(signum)

    def stop(self, timeout: float = 10.0) -> int:
        """Send SIGTERM, as systemd does, and return the exit code."""
        if self._process is None:
            raise RuntimeError("not started")
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
        try:
            code = self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise AssertionError(f"reconnectd did not stop on SIGTERM\n{self.log()}") from None
        self._close_files()
        return code

    def wait_exit(self, timeout: float = 10.0) -> int:
        assert self._process is not None
        code = self._process.wait(timeout)
        self._close_files()
        return code

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _close_files(self) -> None:
        if self._notify is not None:
            self._notify.close()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        if self.running():
            self.stop()
        else:
            self._close_files()

    # --- what it says -------------------------------------------------------

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def wait_for_log(self, text: str, count: int, timeout: float = 30.0) -> str:
        """Given a text, wait until the log holds it ``count`` times; return the log."""

        def enough() -> str | None:
            log = self.log()
            return log if log.count(text) >= count else None

        log = self._poll(enough, timeout)
        if log is None:
            raise AssertionError(
                f"{text!r} not logged {count} times within {timeout} s\n"
                f"--- reconnectd log ---\n{self.log()}"
            )
        return log

    def _poll(self, found: Callable[[], T | None], timeout: float) -> T | None:
        """Given a look at the daemon's files, repeat it until it finds something; return
        that, or None once the timeout passed or the daemon exited."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = found()
            if result is not None:
                return result
            if not self.running():
                break
            time.sleep(0.05)  # polling another process's file: no clock to advance
        return None

    @property
    def notifications(self) -> list[str]:
        """Every sd_notify message received from the current (or last) run."""
        return [] if self._notify is None else self._notify.receive()

    def timed_notifications(self) -> list[tuple[str, float]]:
        """Every sd_notify message so far, with when it was read (``time.monotonic()``)."""
        if self._notify is None:
            return []
        self._notify.receive()
        return list(zip(self._notify.messages, self._notify.arrivals))

    def wait_for_notification(self, predicate: Callable[[str], bool], timeout: float = 10.0) -> str:
        assert self._notify is not None, "not started"
        return self._notify.wait_for(
            predicate,
            timeout,
            alive=self.running,
            context=lambda: f"\n--- reconnectd log ---\n{self.log()}",
        )

    def status(self) -> dict[str, object]:
        """The status file, or {} before the daemon wrote it."""
        path = self.runtime_dir / "status.json"
        try:
            document = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        assert isinstance(document, dict)
        return document

    def printer(self, name: str) -> dict[str, object]:
        """One printer's row of the status file, or {} before it is there."""
        printers = self.status().get("printers", [])
        assert isinstance(printers, list)
        for row in printers:
            if isinstance(row, dict) and row.get("name") == name:
                return row
        return {}

    def wait_for_printer(
        self,
        name: str,
        predicate: Callable[[dict[str, object]], bool],
        what: str,
        timeout: float = 30.0,
    ) -> dict[str, object]:
        def matching_row() -> dict[str, object] | None:
            row = self.printer(name)
            return row if row and predicate(row) else None

        row = self._poll(matching_row, timeout)
        if row is None:
            raise AssertionError(
                f"{name}: {what} not reached within {timeout} s; last status {self.printer(name)}\n"
                f"--- reconnectd log ---\n{self.log()}"
            )
        return row

    def held_state(self) -> dict[str, object]:
        path = self.state_dir / "state.json"
        document = json.loads(path.read_text())
        assert isinstance(document, dict)
        return document
