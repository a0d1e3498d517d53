"""Telling systemd how the daemon is doing: the sd_notify(3) protocol.

The protocol is one datagram of ``KEY=value`` lines sent to the ``AF_UNIX`` socket
named by ``$NOTIFY_SOCKET``. The datagrams are sent here with a plain socket rather
than through the ``sdnotify`` package, because that package (0.3.2):

* encodes messages as Latin-1 and silently drops any that does not fit, so a
  ``STATUS=`` holding "…" or a printer named in Cyrillic would never arrive
  (systemd reads UTF-8);
* reads ``os.environ`` itself, so tests and callers cannot hand it an environment;
* connects once when created and swallows every error, so a failure is invisible.

It does handle abstract socket names (``@...``); so does this module.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
from collections.abc import Mapping

logger = logging.getLogger(__name__)


_NEWLINES = re.compile(r"\s*[\r\n]+\s*")


def _socket_address(value: str) -> str | None:
    """Given ``$NOTIFY_SOCKET``, return the address to send to; ``None`` if unusable.

    ``@name`` is an abstract socket, whose address starts with a NUL byte. Other
    forms (``vsock:`` from systemd 254 on) are not AF_UNIX and are not supported.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


class Notifier:
    """Sends sd_notify(3) messages to systemd; does nothing when not run by systemd.

    No method ever raises: a daemon must not fail because its supervisor went
    away. A failed send is logged once as a warning; the next success re-arms it.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET", "")
        self._address = _socket_address(raw) if raw else None
        if raw and self._address is None:
            logger.warning("NOTIFY_SOCKET=%r is not a unix socket; not notifying systemd", raw)
        self._watchdog_usec = env.get("WATCHDOG_USEC")
        self._watchdog_pid = env.get("WATCHDOG_PID")
        self._socket: socket.socket | None = None
        self._last_status: str | None = None
        self._failing = False

    @property
    def enabled(self) -> bool:
        """Return whether messages are sent at all (``$NOTIFY_SOCKET`` was usable)."""
        return self._address is not None

    def ready(self, status: str) -> None:
        """Given a status line, tell systemd that start-up (or a reload) is complete."""
        line = _one_line(status)
        if self._send(f"READY=1\nSTATUS={line}"):
            self._last_status = line

    def status(self, text: str) -> None:
        """Given a status text, show it in ``systemctl status`` as one line.

        Nothing is sent when the line is the one systemd already shows, so callers
        may call this on every change of state without flooding the socket.
        """
        line = _one_line(text)
        if line == self._last_status:
            return
        if self._send(f"STATUS={line}"):
            self._last_status = line

    def reloading(self) -> None:
        """Tell systemd a reload has started; ``ready()`` ends it.

        ``MONOTONIC_USEC`` lets systemd >= 253 (``Type=notify-reload``) match this
        message to the reload it asked for; older versions ignore the field.
        """
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={usec}")

    def stopping(self) -> None:
        """Tell systemd that the daemon is shutting down on purpose."""
        self._send("STOPPING=1")

    def watchdog_ping(self) -> None:
        """Tell systemd the main loop is alive; call it from the loop itself."""
        self._send("WATCHDOG=1")

    @property
    def watchdog_interval(self) -> float | None:
        """Return the seconds between watchdog pings; ``None`` if no watchdog is wanted.

        That is half of ``$WATCHDOG_USEC``, as sd_watchdog_enabled(3) advises. When
        ``$WATCHDOG_PID`` is set it names the process that must ping; another
        process (a child that inherited the environment) must not.
        """
        if self._watchdog_pid is not None:
            try:
                pid = int(self._watchdog_pid)
            except ValueError:
                return None
            if pid != os.getpid():
                return None
        if self._watchdog_usec is None:
            return None
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000

    def close(self) -> None:
        """Release the socket; a later message opens a new one."""
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, message: str) -> bool:
        """Given a message, send it as one datagram; return whether it was sent."""
        if self._address is None:
            return False
        try:
            if self._socket is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                # Never wait for systemd: the loop that sends is also the loop that
                # pings the watchdog and serves every printer. A message that does not
                # fit in a full queue fails at once (and a status is sent again).
                sock.setblocking(False)
                self._socket = sock
            # sendto() every time rather than connect() once: systemd may be
            # re-executed (daemon-reexec) and bind its socket anew.
            self._socket.sendto(message.encode("utf-8"), self._address)
        except OSError as exc:
            if not self._failing:
                logger.warning("cannot notify systemd (%s): %s", self._address_text(), exc)
                self._failing = True
            self.close()
            return False
        if self._failing:
            logger.info("notifying systemd works again")
            self._failing = False
        return True

    def _address_text(self) -> str:
        """Return the socket address as ``$NOTIFY_SOCKET`` spells it, for messages."""
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address


def _one_line(text: str) -> str:
    """Given any text, return it on one line: systemd shows only the first one."""
    return _NEWLINES.sub(" ", text).strip()
