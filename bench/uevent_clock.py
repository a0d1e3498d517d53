"""When a testbed's udev events were delivered, as the kernel stamped them.

Run in a testbed's environment (``Testbed.env``: the umockdev preload), this process
listens to the testbed's tty events exactly as reconnectd does (a pyudev monitor) and
prints one JSON line per event: its action, its devpath, and ``delivered``, the
moment the event was put on this listener's socket, as CLOCK_REALTIME seconds.

That moment comes from the kernel (``SO_TIMESTAMPNS`` on the monitor's socket, which
umockdev emulates with a unix datagram socket): it is when umockdev sent the event to
every listener, reconnectd included, and it does not move when this process, or the
testbed owner that sent it, is scheduled late. The reader converts it to
CLOCK_MONOTONIC with an offset taken as it reads the line.

Stops when its standard input closes (the benchmark ends or dies).
"""

from __future__ import annotations

import json
import os
import select
import socket
import struct
import sys

import pyudev

# Not in Python's socket module; the value is the same on every Linux architecture
# but a few old ones (alpha, mips, parisc, sparc), where the benchmark does not run.
SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("qq")
# prefix, magic, header size, properties offset, properties length
_HEADER = struct.Struct("8sIIII")


def delivered_at(ancillary: list[tuple[int, int, bytes]]) -> float | None:
    """Given a datagram's ancillary data, return its kernel timestamp, or None if absent."""
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            seconds, nanoseconds = _TIMESPEC.unpack(data[:16])
            return float(seconds) + float(nanoseconds) / 1e9
    return None


def udev_properties(message: bytes) -> dict[str, str]:
    """Given one message from a udev monitor socket, return its properties; {} if it is
    not a udev message.

    libudev's format: ``libudev\\0``, a header whose fields 4 and 5 (32-bit, host
    order) are the offset and length of the properties, then ``KEY=value\\0`` pairs.
    """
    if len(message) < _HEADER.size or not message.startswith(b"libudev\0"):
        return {}
    _, _, _, offset, length = _HEADER.unpack_from(message)
    properties: dict[str, str] = {}
    for item in message[offset : offset + length].split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            properties[key.decode(errors="replace")] = value.decode(errors="replace")
    return properties


def main() -> int:
    """Given a testbed environment, print each tty event until stdin closes; return 0."""
    # pyudev sets the socket up as reconnectd's is (under the preload: the testbed's
    # emulated netlink, filtered to tty). It cannot read from it once timestamps are
    # on: libudev drops any message whose first control message is not the sender's
    # credentials. So the messages are read and parsed here.
    # umockdev names a listener's emulated socket after the number of its fd
    # ("event8"), and a second listener with that number, in any process, takes the
    # name over from the first. reconnectd's monitor has a small number: this one
    # gets a large one of its own, from the command line.
    wanted = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    placeholders: list[int] = []
    while True:
        fd = os.open(__file__, os.O_RDONLY)  # not under /dev: the preload tracks those
        if fd >= wanted:
            os.close(fd)
            break
        placeholders.append(fd)
    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source="udev")
    monitor.filter_by("tty")
    monitor.start()
    for fd in placeholders:
        os.close(fd)
    raw = socket.socket(fileno=monitor.fileno())
    raw.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    print(json.dumps({"listening": True}), flush=True)
    while True:
        readable, _, _ = select.select([raw, sys.stdin], [], [])
        if sys.stdin in readable and not os.read(sys.stdin.fileno(), 1):
            break
        if raw not in readable:
            continue
        message, ancillary, _, _ = raw.recvmsg(65536, 1024)
        properties = udev_properties(message)
        if not properties:
            continue
        line = {
            "action": properties.get("ACTION"),
            "devpath": properties.get("DEVPATH"),
            "delivered": delivered_at(ancillary),
        }
        print(json.dumps(line), flush=True)
    raw.detach()
    return 0


if __name__ == "__main__":
    sys.exit(main())
