"""Lost udev events, injected where pyudev would report them: a netlink overflow.

When more uevents arrive than a netlink socket's receive buffer holds, the kernel
drops them and the next receive fails with ENOBUFS; libudev passes that on, and
pyudev's ``Monitor.poll`` raises ``OSError(errno.ENOBUFS)``. umockdev cannot
produce this: its emulated netlink socket is an AF_UNIX datagram socket, where a
full queue makes the *sender* fail (the testbed owner aborts on EAGAIN) and the
receiver never sees an error, whatever its SO_RCVBUF (tried: 1,001 uevents queued
on a monitor shrunk to a 2,304-byte buffer, all delivered, no error).

So this wraps the real monitor. :class:`LossyMonitor` passes everything through
until it is armed with a count N; it then reads the next N tty uevents from the
real monitor and throws them away, as the kernel would, and the receive of the
Nth raises ENOBUFS. The code under test recovers against the real testbed: its
re-enumeration goes through real libudev.

Armed from outside the process by a control file named by
``$RECONNECTD_LOSE_EVENTS``: write N to it (atomically); the monitor reads and
deletes it on its next receive. Each thrown-away event is printed to stderr as
``lossy monitor: lost ACTION DEVPATH``, and the overflow as ``lossy monitor:
ENOBUFS after N lost``.

Run as a script, it installs the wrapper and runs reconnectd's command line:
``python tests/support/lossy_monitor.py -v run``.
"""

from __future__ import annotations

import errno
import os
import sys
from pathlib import Path
from typing import Any

import pyudev

CONTROL_ENV = "RECONNECTD_LOSE_EVENTS"
# Every LossyMonitor made in this process, oldest first.
MONITORS: list[LossyMonitor] = []


class LossyMonitor:
    """A real ``pyudev.Monitor`` that can be made to lose events and raise ENOBUFS."""

    def __init__(self, real: Any, control: Path | None) -> None:
        self._real = real
        self._control = control
        self._to_lose = 0
        self._lost = 0
        self._errno = errno.ENOBUFS

    def arm(self, count: int, error: int = errno.ENOBUFS) -> None:
        """Given N > 0, lose the next N events; the receive of the last raises ENOBUFS
        (or the errno ``error``)."""
        if count <= 0:
            raise ValueError(f"count must be positive, not {count}")
        self._to_lose, self._lost, self._errno = count, 0, error

    def poll(self, timeout: float | None = None) -> Any:
        """Given a timeout, return the next device event like pyudev; raise ENOBUFS when due."""
        self._read_control()
        while self._to_lose:
            device = self._real.poll(timeout)
            if device is None:
                return None
            self._to_lose -= 1
            self._lost += 1
            _say(f"lost {device.action} {device.device_path}")
            if not self._to_lose:
                _say(f"{errno.errorcode[self._errno]} after {self._lost} lost")
                raise OSError(self._errno, os.strerror(self._errno))
        return self._real.poll(timeout)

    def _read_control(self) -> None:
        if self._control is None:
            return
        try:
            text = self._control.read_text()
        except FileNotFoundError:
            return
        self._control.unlink()
        self.arm(int(text))
        _say(f"armed: the next {self._to_lose} events are lost")

    def __getattr__(self, name: str) -> Any:
        # filter_by, start, fileno...: the real monitor's, untouched.
        return getattr(self._real, name)


def _say(text: str) -> None:
    print(f"lossy monitor: {text}", file=sys.stderr, flush=True)


def install(control: Path | None) -> None:
    """Given a control file (or None), make every new netlink monitor a LossyMonitor."""
    original = pyudev.Monitor.from_netlink

    def from_netlink(context: Any, source: str = "udev") -> LossyMonitor:
        monitor = LossyMonitor(original(context, source), control)
        MONITORS.append(monitor)
        return monitor

    pyudev.Monitor.from_netlink = staticmethod(from_netlink)


def arm(control: Path, count: int) -> None:
    """Given the control file of a running LossyMonitor, arm it to lose ``count`` events."""
    partial = control.with_name(control.name + ".partial")
    partial.write_text(str(count))
    os.replace(partial, control)  # never read half-written


def main(argv: list[str]) -> int:
    """Given reconnectd's arguments, run it with lossy netlink monitors."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    control = os.environ.get(CONTROL_ENV)
    install(Path(control) if control else None)
    from reconnectd.cli import main as reconnectd_main

    return reconnectd_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
