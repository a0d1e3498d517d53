"""What the daemon shows: the status file (``reconnectd status`` reads it) and STATUS=.

Both are written when something changed, except while a printer's request is on its
way (its answer changes them again within milliseconds): they wait for it at most
:data:`STATUS_MAY_LAG`. Written at once, they would hold up the very request the loop
just handed to a worker, by a millisecond on each step from a device's return to the
connect (bench/run). A status file that cannot be written is tried again on every
wake-up, and said once.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Protocol

from reconnectd.config import PrinterConfig
from reconnectd.core import PrinterCore, State
from reconnectd.jsonfiles import write_json_atomic
from reconnectd.status import iso_utc, summary_line

log = logging.getLogger(__name__)

STATUS_MAY_LAG = 0.25

Rows = list[dict[str, object]]


class StatusLine(Protocol):
    """Where STATUS= goes: ``systemd.Notifier``."""

    def status(self, text: str) -> None: ...


class StatusPublisher:
    """Writes the status file and sends STATUS= for the daemon."""

    def __init__(
        self,
        path: Path,
        notifier: StatusLine,
        *,
        dry_run: bool,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._notifier = notifier
        self._dry_run = dry_run
        self._clock = clock
        self._wall_clock = wall_clock
        self._started = iso_utc(wall_clock())
        self._written: tuple[Rows, str | None] | None = None
        self._failed = False
        self._waiting_since: float | None = None

    @property
    def deadline(self) -> float | None:
        """When a status held back for a request in flight is due, or None."""
        return None if self._waiting_since is None else self._waiting_since + STATUS_MAY_LAG

    def publish(self, rows: Callable[[], Rows], *, busy: bool, holds_unsaved: str | None) -> None:
        """Given how to make the printers' rows, whether a printer's request is in flight
        and why holds are not on disk (or None), write what changed."""
        if self._may_wait(busy):
            return
        printers = rows()
        if self._written != (printers, holds_unsaved):
            document = {
                "version": 1,
                "pid": os.getpid(),
                "started": self._started,
                "updated": iso_utc(self._wall_clock()),
                "dry_run": self._dry_run,
                "holds_unsaved": holds_unsaved,
                "printers": printers,
            }
            try:
                write_json_atomic(self.path, document)
            except OSError as error:
                # Tried again on every wake-up (the watchdog's at least), so the file
                # is back soon after the fault ends; said once, not per try.
                if not self._failed:
                    log.warning("cannot write the status file %s: %s", self.path, error)
                self._failed = True
            else:
                self._written = (printers, holds_unsaved)
                if self._failed:
                    log.info("the status file %s is written again", self.path)
                self._failed = False
        # On every wake-up: the notifier sends only a changed line, and one that did
        # not fit in systemd's full queue last time is sent again now.
        self._notifier.status(summary_line(printers))

    def _may_wait(self, busy: bool) -> bool:
        """Whether the status may wait for a printer's request in flight. Only those
        change it: the plugin check's answer does not, and none is in flight before
        READY=1 (a core asks only when its deadline runs)."""
        if not busy:
            self._waiting_since = None
            return False
        now = self._clock()
        if self._waiting_since is None:
            self._waiting_since = now
        if now < self._waiting_since + STATUS_MAY_LAG:
            return True
        # A slow request: show where things stand, then wait again.
        self._waiting_since = now
        return False


def printer_rows(
    printers: Mapping[str, tuple[PrinterConfig, PrinterCore]], now: float, wall: float
) -> Rows:
    """Given each printer's config and core, and the time, return the status rows."""
    rows: Rows = []
    for name, (config, core) in printers.items():
        kind = "moonraker" if config.moonraker is not None else "octoprint"
        state = core.state.value
        if core.state == State.HELD and core.holds:
            state = f"holding after {core.holds[0].kind.value}"
        elif core.state == State.UNREACHABLE:
            state = f"{kind} unreachable"
        at = None if core.decided_at is None else iso_utc(wall - (now - core.decided_at))
        rows.append(
            {
                "name": name,
                "state": state,
                "device": core.device.node if core.device else None,
                # The key names the host: "octoprint" (as always) or "moonraker".
                kind: config.host.shown_url,
                "decision": core.decision,
                "reason": core.reason,
                "at": at,
                "holds": [f"{h.kind.value}: {h.reason}" for h in core.holds],
                "attempts": core.attempts,
                "connects": core.total_connects,
            }
        )
    return rows
