"""systemd's end of sd_notify(3): a real datagram socket that a test reads."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path


class NotifySocket:
    """Binds ``path`` like systemd's notify socket and collects what arrives."""

    def __init__(self, path: Path) -> None:
        if path.exists():
            path.unlink()
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.05)
        self.messages: list[str] = []
        # When each message was read (time.monotonic()), index for index: a reader
        # blocked in receive() reads a datagram the moment it arrives.
        self.arrivals: list[float] = []
        self._closed = False

    def receive(self) -> list[str]:
        """Collect every datagram waiting now; return all received so far."""
        while not self._closed:
            try:
                data = self._sock.recv(65536)
                self.arrivals.append(time.monotonic())
                self.messages.append(data.decode())
            except (TimeoutError, socket.timeout):
                break
        return self.messages

    def wait_for(
        self,
        predicate: Callable[[str], bool],
        timeout: float = 10.0,
        *,
        alive: Callable[[], bool] = lambda: True,
        context: Callable[[], str] = lambda: "",
    ) -> str:
        """Return the first new message matching ``predicate``; raise AssertionError after
        ``timeout`` or once ``alive()`` turns false, with ``context()`` in the message."""
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            messages = self.receive()
            for message in messages[seen:]:
                if predicate(message):
                    return message
            seen = len(messages)
            if not alive():
                break
        raise AssertionError(
            f"no matching sd_notify message within {timeout} s; got {self.messages}{context()}"
        )

    def close(self) -> None:
        """Collect what is left and close; the messages stay readable."""
        self.receive()
        self._closed = True
        self._sock.close()
        if self.path.exists():
            self.path.unlink()
