"""A USB cable between Klippy and a Linux-process MCU: a pty whose far end is relayed.

    python pty_relay.py LINK TARGET

Makes a new pty, points the symlink LINK at its slave (what Klipper's ``[mcu] serial``
names), and copies bytes between that pty and TARGET, the MCU's own pty link
(``klipper.elf -I TARGET``). SIGTERM removes LINK and exits: the node is gone, as when
a USB cable is pulled while the board keeps power. The MCU stays up and configured, so
Klippy's next FIRMWARE_RESTART meets a configured MCU ("Failed automated reset").

The MCU re-executes itself on ``config_reset`` (FIRMWARE_RESTART), closing its pty and
making a new one behind the same TARGET link; reading the old one then fails (EIO or
end of file), so the relay reopens TARGET until it can. What arrives while no MCU end
is open is dropped, as a board that is resetting drops it.

Standard library only: it runs under any Python the tests have.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import sys
import tty
from types import FrameType

CHUNK = 4096
REOPEN_INTERVAL = 0.01  # seconds between attempts to reopen the MCU's pty


class Stop(Exception):
    """SIGTERM or SIGINT arrived."""


def on_signal(signum: int, frame: FrameType | None) -> None:
    raise Stop


def log(message: str) -> None:
    print(f"pty_relay[{os.getpid()}]: {message}", file=sys.stderr, flush=True)


def open_target(target: str) -> int | None:
    """Given the MCU's pty link, return a raw, non-blocking fd on it, or None if absent."""
    try:
        fd = os.open(target, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        tty.setraw(fd)
    except OSError:
        os.close(fd)
        return None
    return fd


def forward(data: bytes, fd: int | None) -> None:
    """Given bytes and a non-blocking fd (or None), write what fits; drop the rest.

    A reader that stopped reading (Klippy after a shutdown, an MCU resetting) must not
    stall the relay: a real USB link loses such data too.
    """
    while data and fd is not None:
        try:
            written = os.write(fd, data)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EIO):
                raise
            return
        data = data[written:]


def relay(link: str, target: str) -> int:
    """Given the link to make and the MCU's pty link, relay until SIGTERM; return 0."""
    master, slave = os.openpty()
    # Raw before anyone opens it: a cooked pty would echo Klipper's binary protocol.
    tty.setraw(slave)
    os.set_blocking(master, False)
    # The relay keeps the slave open, so Klippy closing its end never hangs up the pty.
    temporary = f"{link}.{os.getpid()}"
    os.symlink(os.ttyname(slave), temporary)
    os.replace(temporary, link)  # appears at once, whole, as a device node does
    log(f"{link} -> {os.ttyname(slave)}, relaying to {target}")
    mcu: int | None = None
    try:
        while True:
            if mcu is None:
                mcu = open_target(target)
                if mcu is not None:
                    log(f"opened {target} -> {os.path.realpath(target)}")
            readable, _, _ = select.select(
                [master] if mcu is None else [master, mcu],
                [],
                [],
                REOPEN_INTERVAL if mcu is None else None,
            )
            if master in readable:
                try:
                    forward(os.read(master, CHUNK), mcu)
                except OSError as e:
                    if e.errno != errno.EAGAIN:
                        raise
            if mcu is not None and mcu in readable:
                try:
                    data = os.read(mcu, CHUNK)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        continue
                    data = b""  # EIO: the MCU closed its pty (re-exec or gone)
                if data:
                    forward(data, master)
                else:
                    log(f"{target} closed; reopening")
                    os.close(mcu)
                    mcu = None
    except Stop:
        pass
    finally:
        # Only our own link: a new relay may already have replaced it.
        try:
            if os.readlink(link) == os.ttyname(slave):
                os.unlink(link)
        except OSError:
            pass
        log("stopped")
    return 0


def main(argv: list[str]) -> int:
    """Given ``[prog, LINK, TARGET]``, relay between them until SIGTERM; return the exit code."""
    if len(argv) != 3:
        print(f"usage: {argv[0]} LINK TARGET", file=sys.stderr)
        return 64
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return relay(argv[1], argv[2])


if __name__ == "__main__":
    sys.exit(main(sys.argv))
