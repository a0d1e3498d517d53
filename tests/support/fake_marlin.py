"""Marlin firmware played on the master end of a pty, for a real OctoPrint to talk to.

The host (OctoPrint) opens the slave end as it would open ``/dev/ttyUSB0``. Opening
and closing are seen here through the pty itself: while no one holds the slave, the
master polls as hung up (``POLLHUP``) and reads fail with ``EIO``.

Not simulated: DTR resets, temperatures that change, SD cards, motion (M114 reports
the head where it always is).
"""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import re
import select
import termios
import threading
import time
import tty
from pathlib import Path
from typing import Callable

KILL_TEXT = "Printer halted. kill() called!"

FIRMWARE_REPLY = (
    "FIRMWARE_NAME:Marlin 2.1.2.1 (Github) SOURCE_CODE_URL:github.com/MarlinFirmware/Marlin"
    " PROTOCOL_VERSION:1.0 MACHINE_TYPE:reconnectd fake EXTRUDER_COUNT:1"
    " UUID:cede2a2f-41a2-4748-9b12-c55c62f367ff",
    # No autoreport and no busy protocol: OctoPrint then polls M105 and keeps its
    # plain communication timeout, which keeps the timings in tests predictable.
    "Cap:SERIAL_XON_XOFF:0",
    "Cap:EEPROM:1",
    "Cap:AUTOREPORT_TEMP:0",
    "Cap:BUSY_PROTOCOL:0",
    "Cap:EMERGENCY_PARSER:1",
    "ok",
)
TEMPERATURE_REPLY = "ok T:20.0 /0.0 B:20.0 /0.0"
# Marlin's answer to M114, then "ok". OctoPrint asks for it when a print pauses and
# waits up to 10 s (positionLogWait) for a line it can parse.
POSITION_REPLY = "X:10.00 Y:20.00 Z:0.30 E:0.00 Count X:800 Y:1600 Z:120"

_NUMBERED = re.compile(r"^N(-?\d+)\s*(.*?)(?:\*(\d+))?$")
_M110_N = re.compile(r"\bN(-?\d+)")

# While the host has the port closed the master polls as hung up at once, every time:
# this is how often the thread looks again, instead of spinning.
_CLOSED_POLL_INTERVAL = 0.02
_OPEN_POLL_INTERVAL = 0.5


def checksum(text: str) -> int:
    """Given the part of a line before ``*``, return Marlin's checksum (XOR of the bytes)."""
    value = 0
    for byte in text.encode("ascii", "replace"):
        value ^= byte
    return value


def open_pty_port(link: Path) -> int:
    """Given a path for the printer's port, make a pty whose slave it links to; return the master.

    The slave end is set raw (so nothing written before the host configures it is
    echoed back as if the host had sent it) and then closed, so that the master
    sees the host's opens and closes as hang-up changes.
    """
    master, slave = os.openpty()
    try:
        tty.setraw(slave, termios.TCSANOW)
        slave_path = os.ttyname(slave)
    finally:
        os.close(slave)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(slave_path)
    return master


class FakeMarlin:
    """A thread answering like Marlin on ``master_fd``, which it owns and closes.

    Counters (read them from the test thread; they only grow): ``lines_received``,
    ``opens`` (times the host opened the port), ``hellos`` (``M110`` seen: one or
    more per connection attempt), ``firmware_queries`` (``M115``), ``resends``.
    """

    def __init__(self, master_fd: int) -> None:
        self._fd: int | None = master_fd
        self._wake_read, self._wake_write = os.pipe()
        self._actions: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._received: list[str] = []
        self._stopping = False
        self._silent = False
        self._host_open = False
        self._greeted = False  # "start" sent on the current connection
        self._last_line_number = 0
        self._buffer = b""
        self.lines_received = 0
        self.opens = 0
        self.hellos = 0
        self.firmware_queries = 0
        self.resends = 0
        self.vanished = False
        self._thread = threading.Thread(target=self._run, name="fake-marlin", daemon=True)
        self._thread.start()

    def __enter__(self) -> FakeMarlin:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- controls (any thread) -------------------------------------------------

    @property
    def received(self) -> list[str]:
        """Return a copy of every line received so far, without line endings."""
        with self._lock:
            return list(self._received)

    @property
    def host_open(self) -> bool:
        """Return whether the host holds the port open right now."""
        return self._host_open

    def go_silent(self) -> None:
        """Stop answering (a printer switched off behind a USB chip that stays powered)."""
        self._do(lambda: setattr(self, "_silent", True))

    def respond(self) -> None:
        """Answer again after :meth:`go_silent`."""
        self._do(lambda: setattr(self, "_silent", False))

    def fatal_error(self, text: str = KILL_TEXT) -> None:
        """Send ``Error:`` + each line of ``text``, then go silent, as Marlin does after kill().

        Thermal runaway is ``"Thermal Runaway, system stopped! Heater_ID: bed\\n" + KILL_TEXT``.
        """

        def act() -> None:
            for line in text.splitlines():
                self._send(f"Error:{line}")
            self._silent = True

        self._do(act)

    def vanish(self) -> None:
        """Close the master end: the host's next read or write fails, as on a USB unplug."""
        done = threading.Event()

        def act() -> None:
            self._close_fd()
            self.vanished = True
            done.set()

        self._do(act)
        if not done.wait(5):
            raise AssertionError("fake Marlin thread did not close its pty")

    def stop(self) -> None:
        """Stop the thread and close the pty master (if it has not vanished already)."""
        self._stopping = True
        self._wake()
        self._thread.join(5)
        if self._thread.is_alive():
            raise AssertionError("fake Marlin thread did not stop")
        self._close_fd()
        for fd in (self._wake_read, self._wake_write):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_read = self._wake_write = -1

    def wait_for(self, predicate: Callable[[FakeMarlin], bool], timeout: float) -> None:
        """Given a predicate on this fake, wait until it holds; raise AssertionError if not."""
        deadline = time.monotonic() + timeout
        while not predicate(self):
            if time.monotonic() >= deadline:
                raise AssertionError(
                    f"fake Marlin: condition not met within {timeout:g} s; "
                    f"opens={self.opens} hellos={self.hellos} lines={self.lines_received} "
                    f"last lines={self.received[-5:]}"
                )
            time.sleep(0.02)

    def _do(self, action: Callable[[], None]) -> None:
        self._actions.put(action)
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_write, b"x")

    # -- the thread --------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping:
            self._run_actions()
            if self._fd is None or self._stopping:
                # Vanished: nothing left to serve; wait only for stop().
                self._wait_wake(None)
                continue
            if not self._host_open:
                self._check_opened()
                if not self._host_open:
                    self._wait_wake(_CLOSED_POLL_INTERVAL)
                    continue
            readable = self._wait_readable(_OPEN_POLL_INTERVAL)
            if readable:
                self._read()

    def _run_actions(self) -> None:
        while True:
            try:
                action = self._actions.get_nowait()
            except queue.Empty:
                return
            action()

    def _wait_wake(self, timeout: float | None) -> None:
        ready, _, _ = select.select([self._wake_read], [], [], timeout)
        if ready:
            os.read(self._wake_read, 4096)

    def _wait_readable(self, timeout: float) -> bool:
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        poller.register(self._wake_read, select.POLLIN)
        readable = False
        for fd, events in poller.poll(timeout * 1000):
            if fd == self._wake_read:
                os.read(self._wake_read, 4096)
            elif events & select.POLLIN:
                readable = True
            elif events & (select.POLLHUP | select.POLLERR):
                self._host_closed()
        return readable

    def _check_opened(self) -> None:
        assert self._fd is not None
        poller = select.poll()
        poller.register(self._fd, select.POLLIN)
        events = poller.poll(0)
        flags = events[0][1] if events else 0
        if flags & select.POLLHUP:
            if flags & select.POLLIN:
                # Sent by the host just before it closed: no one is left to answer.
                self._discard()
            return
        self._host_open = True
        self._greeted = False
        self._buffer = b""
        self.opens += 1

    def _discard(self) -> None:
        assert self._fd is not None
        try:
            os.read(self._fd, 4096)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise

    def _host_closed(self) -> None:
        self._host_open = False
        self._buffer = b""

    def _read(self) -> None:
        assert self._fd is not None
        try:
            data = os.read(self._fd, 4096)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._host_closed()
            return
        if not data:
            self._host_closed()
            return
        self._buffer += data
        while b"\n" in self._buffer:
            raw, self._buffer = self._buffer.split(b"\n", 1)
            line = raw.decode("ascii", "replace").strip()
            if line:
                self._handle(line)

    def _handle(self, line: str) -> None:
        with self._lock:
            self._received.append(line)
        self.lines_received += 1
        command = self._check_line_number(line)
        if command is None:
            return
        word = command.split(" ", 1)[0].upper()
        if word == "M110":
            self.hellos += 1
            found = _M110_N.search(command)
            if found and not line.startswith("N"):
                self._last_line_number = int(found.group(1))
        elif word == "M115":
            self.firmware_queries += 1
        if self._silent:
            return
        if not self._greeted:
            # Marlin says "start" once it has booted; this one boots on the first line.
            self._greeted = True
            self._send("start")
        if word == "M105":
            self._send(TEMPERATURE_REPLY)
        elif word == "M114":
            self._send(POSITION_REPLY)
            self._send("ok")
        elif word == "M115":
            for reply in FIRMWARE_REPLY:
                self._send(reply)
        else:
            self._send("ok")

    def _check_line_number(self, line: str) -> str | None:
        """Given a received line, return its command, or None after asking for a resend."""
        numbered = _NUMBERED.match(line)
        if numbered is None:
            return line
        number = int(numbered.group(1))
        command = numbered.group(2).strip()
        sent_sum = numbered.group(3)
        expected = self._last_line_number + 1
        if sent_sum is None:
            error = f"No Checksum with line number, Last Line: {self._last_line_number}"
        elif int(sent_sum) != checksum(line.rsplit("*", 1)[0]):
            error = f"checksum mismatch, Last Line: {self._last_line_number}"
        elif number != expected and not command.upper().startswith("M110"):
            error = f"Line Number is not Last Line Number+1, Last Line: {self._last_line_number}"
        else:
            self._last_line_number = number
            return command
        self.resends += 1
        if not self._silent:
            self._send(f"Error:{error}")
            self._send(f"Resend: {expected}")
            self._send("ok")
        return None

    def _send(self, line: str) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, line.encode("ascii") + b"\n")
        except OSError as exc:
            if exc.errno not in (errno.EIO, errno.EAGAIN):
                raise

    def _close_fd(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
