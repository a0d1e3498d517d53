"""Run :mod:`reconnectd.udev` inside a testbed's environment, driven by a test.

The test process cannot be under the umockdev preload itself, so the code under
test runs here, in a child started with ``Testbed.env``. Run as a script, this
module reads JSON commands on stdin and writes one JSON line per answer, plus a
line ``{"events": [...]}`` whenever the watcher's fd turns readable and
``drain()`` returns something. :class:`UdevProbe` is the test's end.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import queue
import select
import selectors
import struct
import subprocess
import sys
import termios
import threading
import time
import tty
from pathlib import Path
from typing import IO, Any, Callable

import pyudev

from reconnectd.devices import Device, DeviceAdded, DeviceEvent, DeviceRemoved
from reconnectd.udev import UdevWatcher, device_from_udev, list_serial_devices
from tests.support import lossy_monitor

REPO = Path(__file__).resolve().parents[2]

TIMEOUT = 10.0


def device_to_json(device: Device) -> dict[str, Any]:
    """Given a Device, return it as JSON-ready data."""
    data = dataclasses.asdict(device)
    data["links"] = list(device.links)
    return data


def device_from_json(data: dict[str, Any]) -> Device:
    """Given data from :func:`device_to_json`, return the Device."""
    return Device(**{**data, "links": tuple(data["links"])})


def event_to_json(event: DeviceEvent) -> dict[str, Any]:
    """Given a DeviceEvent, return it as JSON-ready data."""
    if isinstance(event, DeviceAdded):
        return {"added": device_to_json(event.device)}
    return {"removed": event.devpath}


def event_from_json(data: dict[str, Any]) -> DeviceEvent:
    """Given data from :func:`event_to_json`, return the DeviceEvent."""
    if "added" in data:
        return DeviceAdded(device_from_json(data["added"]))
    return DeviceRemoved(str(data["removed"]))


# --- the probe process -------------------------------------------------------


class _Lines:
    """Lines from a raw fd, so that select() and buffering agree."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._buffer = b""

    def read_available(self) -> list[bytes] | None:
        chunk = os.read(self.fd, 65536)
        if not chunk:
            return None
        self._buffer += chunk
        *lines, self._buffer = self._buffer.split(b"\n")
        return lines

    def read_line(self) -> bytes | None:
        while b"\n" not in self._buffer:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line


class _PausingWatcher(UdevWatcher):
    """A watcher that stops between starting its monitor and enumerating."""

    def __init__(self, pause: Callable[[], None]) -> None:
        super().__init__()
        self._pause = pause

    def _enumerate(self) -> list[Device]:
        self._pause()
        return super()._enumerate()


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _ioctl_int(fd: int, request: int, value: int = 0) -> int:
    (result,) = struct.unpack("i", fcntl.ioctl(fd, request, struct.pack("i", value)))
    return int(result)


def _busy_on(fd: int, busy_now: threading.Event, stop: threading.Event) -> None:
    """Given an fd, ask TIOCINQ and read on it until told to stop; say when busy."""
    while not stop.is_set():
        with contextlib.suppress(OSError):  # BlockingIOError, then EBADF once closed
            _ioctl_int(fd, termios.TIOCINQ)
            os.read(fd, 64)
        busy_now.set()


def _close_while_busy(path: str, rounds: int) -> None:
    """Given a tty, open it ``rounds`` times and close it while a thread ioctls and reads on it.

    What OctoPrint does when a user disconnects a printing printer: its reader thread is
    inside ``TIOCINQ`` or ``read`` when the port is closed. Each close waits until the
    thread has made its first call, so every round really races; the calls after the
    close fail (EBADF, as on a real kernel), which is what the thread is there to survive.
    """
    for _ in range(rounds):
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        busy_now = threading.Event()
        stop = threading.Event()

        worker = threading.Thread(target=_busy_on, args=(fd, busy_now, stop))
        worker.start()
        busy_now.wait(TIMEOUT)
        time.sleep(0.001)
        os.close(fd)
        stop.set()
        worker.join()


def _serve() -> int:
    # The watcher's log lines go to the probe's log, where tests read them.
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stdin = _Lines(sys.stdin.fileno())
    selector = selectors.DefaultSelector()
    selector.register(stdin.fd, selectors.EVENT_READ, "stdin")
    watcher: UdevWatcher | None = None
    context = pyudev.Context()

    def pause() -> None:
        _emit({"reply": "monitoring"})
        stdin.read_line()

    def handle(command: dict[str, Any]) -> Any:
        nonlocal watcher
        op = command["op"]
        if op in ("start", "start_paused", "start_lossy"):
            if op == "start_lossy":
                lossy_monitor.install(None)
            watcher = _PausingWatcher(pause) if op == "start_paused" else UdevWatcher()
            present = watcher.start()
            selector.register(watcher.fileno(), selectors.EVENT_READ, "udev")
            return [device_to_json(d) for d in present]
        if op == "list":
            return [device_to_json(d) for d in list_serial_devices()]
        if op == "lose":
            # The monitor of a watcher started with "start_lossy": lose the next
            # `count` events, then raise ENOBUFS (or `errno`).
            lossy_monitor.MONITORS[-1].arm(
                int(command["count"]), int(command.get("errno", errno.ENOBUFS))
            )
            return None
        if op == "from_syspath":
            device = device_from_udev(pyudev.Devices.from_sys_path(context, command["syspath"]))
            return None if device is None else device_to_json(device)
        if op == "open":
            fd = os.open(command["path"], os.O_RDWR | os.O_NOCTTY)
            tty.setraw(fd)
            return fd
        if op == "write":
            return os.write(command["fd"], command["data"].encode("latin-1"))
        if op == "read":
            readable, _, _ = select.select([command["fd"]], [], [], command["timeout"])
            if not readable:
                return {"timeout": True}
            try:
                return {"data": os.read(command["fd"], 4096).decode("latin-1")}
            except OSError as e:
                return {"errno": e.errno}
        if op == "modem":
            fd = command["fd"]
            before = _ioctl_int(fd, termios.TIOCMGET)
            _ioctl_int(fd, termios.TIOCMBIS, termios.TIOCM_DTR | termios.TIOCM_RTS)
            raised = _ioctl_int(fd, termios.TIOCMGET)
            _ioctl_int(fd, termios.TIOCMBIC, termios.TIOCM_DTR)
            lowered = _ioctl_int(fd, termios.TIOCMGET)
            return {"before": before, "raised": raised, "lowered": lowered}
        if op == "inq":
            return _ioctl_int(command["fd"], termios.TIOCINQ)
        if op == "close_while_busy":
            return _close_while_busy(command["path"], command["rounds"])
        if op == "close":
            os.close(command["fd"])
            return None
        raise ValueError(f"unknown op {op!r}")

    while True:
        for key, _ in selector.select():
            if key.data == "udev":
                assert watcher is not None
                events = watcher.drain()
                if events:
                    _emit({"events": [event_to_json(e) for e in events]})
                continue
            lines = stdin.read_available()
            if lines is None:
                if watcher is not None:
                    watcher.close()
                return 0
            for line in lines:
                command = json.loads(line)
                if command["op"] == "exit":
                    return 0
                try:
                    _emit({"reply": handle(command)})
                except Exception as e:  # reported to the test, which decides
                    _emit({"error": f"{type(e).__name__}: {e}"})


# --- the test's end ----------------------------------------------------------


def _with_repo(pythonpath: str | None) -> str:
    """Given $PYTHONPATH (or None), return it with this checkout first."""
    return os.pathsep.join([str(REPO), *([pythonpath] if pythonpath else [])])


class ProbeError(RuntimeError):
    """The probe failed a command, died, or stayed silent past its deadline."""


class UdevProbe:
    """A running probe: send commands, collect the udev events it reports."""

    def __init__(self, env: dict[str, str], log_path: Path, *, timeout: float = TIMEOUT) -> None:
        self.timeout = timeout
        self.log_path = log_path
        self.events: list[DeviceEvent] = []
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in close()
        self._process = subprocess.Popen(
            [sys.executable, str(Path(__file__))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            # The probe imports its helpers from tests.support, as the test does.
            env={**env, "PYTHONPATH": _with_repo(env.get("PYTHONPATH"))},
        )
        self._lines: queue.Queue[bytes] = queue.Queue()
        assert self._process.stdout is not None
        self._reader = threading.Thread(
            target=self._read, args=(self._process.stdout,), daemon=True
        )
        self._reader.start()

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            self._lines.put(line)
        self._lines.put(b"")

    def send(self, op: str, **arguments: Any) -> None:
        """Given an op and its arguments, send them without waiting for the reply."""
        assert self._process.stdin is not None
        try:
            self._process.stdin.write((json.dumps({"op": op, **arguments}) + "\n").encode())
            self._process.stdin.flush()
        except OSError as e:
            raise self._failure(f"cannot send {op} ({e})") from e

    def call(self, op: str, **arguments: Any) -> Any:
        """Given an op and its arguments, return the probe's reply; raise ProbeError on error."""
        self.send(op, **arguments)
        return self.reply(op)

    def reply(self, what: str) -> Any:
        """Given what is awaited, return the next reply; raise ProbeError on error or silence."""
        deadline = time.monotonic() + self.timeout
        while True:
            message = self._next(deadline, what)
            if "reply" in message:
                return message["reply"]
            if "error" in message:
                raise ProbeError(f"{what}: {message['error']}")

    def wait_events(
        self, done: Callable[[list[DeviceEvent]], bool], what: str
    ) -> list[DeviceEvent]:
        """Given a condition on all events so far, wait until it holds; return the events."""
        deadline = time.monotonic() + self.timeout
        while not done(self.events):
            self._next(deadline, what)
        return self.events

    def wait_logged(self, text: str, count: int) -> None:
        """Given a text, wait until the probe's stderr log holds it ``count`` times."""
        deadline = time.monotonic() + self.timeout
        while self.log_path.read_text(errors="replace").count(text) < count:
            if time.monotonic() > deadline:
                raise self._failure(f"{text!r} not logged {count} times within {self.timeout:g} s")
            time.sleep(0.02)  # another process's file: no clock to advance

    def _next(self, deadline: float, what: str) -> dict[str, Any]:
        left = deadline - time.monotonic()
        try:
            line = self._lines.get(timeout=max(left, 0.0))
        except queue.Empty:
            raise self._failure(
                f"nothing within {self.timeout:g} s while waiting for {what}"
            ) from None
        if not line:
            raise self._failure(f"probe exited while waiting for {what}")
        message: dict[str, Any] = json.loads(line)
        if "events" in message:
            self.events.extend(event_from_json(e) for e in message["events"])
        return message

    def _failure(self, what: str) -> ProbeError:
        self._log.flush()
        tail = self.log_path.read_text(errors="replace")[-2000:]
        return ProbeError(f"{what}; probe stderr ({self.log_path}):\n{tail}")

    def close(self) -> None:
        """Given a probe, stop it and release its pipes."""
        if self._process.poll() is None:
            with contextlib.suppress(ProbeError):
                self.send("exit")
        try:
            self._process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


if __name__ == "__main__":
    sys.exit(_serve())
