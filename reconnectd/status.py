"""The status document: where it lives, and how a person sees it.

The daemon rewrites ``status.json`` on every change (see ``jsonfiles``);
``reconnectd status`` reads it back. Version 1 of the document::

    {"version": 1, "pid": 1234, "started": "...Z", "updated": "...Z", "dry_run": false,
     "printers": [{"name": "mk3s", "state": "operational", "device": "/dev/ttyACM0",
                   "octoprint": "http://127.0.0.1:5000", "decision": "connect",
                   "reason": "device came back", "at": "...Z",
                   "holds": ["manual disconnect"], "attempts": 1}]}

Readers must tolerate missing fields and extra ones: fields may be added within a
version, never removed or changed in meaning.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from reconnectd.jsonfiles import JsonFileError, read_json

SCHEMA_VERSION = 1
STATUS_FILE = "status.json"
DEFAULT_RUNTIME_DIRECTORY = Path("/run/reconnectd")
DEFAULT_STATE_DIRECTORY = Path("/var/lib/reconnectd")

# systemd shows STATUS= on one line of `systemctl status`; longer is cut there anyway.
SUMMARY_MAX = 200
# One printer with a very long name or reason must not crowd out all the others.
SUMMARY_PART_MAX = 60
SUMMARY_SEPARATOR = " · "

COLUMNS = ("PRINTER", "STATE", "DEVICE", "DECISION", "REASON", "AT")


class StatusUnavailable(Exception):
    """The daemon's status cannot be shown; the message says why, for a person."""


def _first_directory(value: str | None, default: Path) -> Path:
    """Given a ``*_DIRECTORY`` variable, return its first entry, or the default.

    systemd sets it to a colon-separated list when the unit names several
    directories; reconnectd's own comes first.
    """
    first = (value or "").split(":")[0]
    return Path(first) if first else default


def status_path(environ: Mapping[str, str] | None = None) -> Path:
    """Given the environment, return where the status file is (``$RUNTIME_DIRECTORY``)."""
    env = os.environ if environ is None else environ
    return _first_directory(env.get("RUNTIME_DIRECTORY"), DEFAULT_RUNTIME_DIRECTORY) / STATUS_FILE


def state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Given the environment, return the directory kept across restarts."""
    env = os.environ if environ is None else environ
    return _first_directory(env.get("STATE_DIRECTORY"), DEFAULT_STATE_DIRECTORY)


def iso_utc(epoch: float) -> str:
    """Given seconds since the epoch, return the document's time format, ``...T...Z``."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def _text(value: object, default: str = "") -> str:
    """Given a field read from the document, return it as one line of text."""
    if value is None:
        return default
    return " ".join(str(value).split()) or default


def _holds(printer: Mapping[str, object]) -> list[str]:
    """Given one printer's entry, return its holds as text (tolerating bad types)."""
    holds = printer.get("holds")
    if not isinstance(holds, list):
        return []
    return [_text(hold) for hold in holds if _text(hold)]


def _attempts(printer: Mapping[str, object]) -> int:
    """Given one printer's entry, return its connect attempts (0 if unknown)."""
    attempts = printer.get("attempts")
    # bool is an int too, and never a count.
    if isinstance(attempts, int) and not isinstance(attempts, bool):
        return attempts
    return 0


def _shorten(text: str, limit: int) -> str:
    """Given text, return it cut to ``limit`` characters, ending in "…" if cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _summary_part(printer: Mapping[str, object]) -> str:
    """Given one printer's entry, return its piece of the STATUS= line."""
    name = _text(printer.get("name"), "?")
    holds = _holds(printer)
    if holds:
        what = "holding after " + ", ".join(holds)
    else:
        what = _text(printer.get("state"), "unknown")
        attempts = _attempts(printer)
        if attempts > 1:
            what += f" (attempt {attempts})"
    return _shorten(f"{name}: {what}", SUMMARY_PART_MAX)


def summary_line(printers: Sequence[Mapping[str, object]]) -> str:
    """Given the printers' entries, return the one-line summary for ``STATUS=``.

    Example: ``mk3s: operational · ender: holding after manual disconnect``. A held
    printer shows its holds instead of its state; a connect retried shows its
    attempt. Past ``SUMMARY_MAX`` characters the last printers are replaced by
    ``… +N more``.
    """
    if not printers:
        return "no printers configured"
    parts = [_summary_part(printer) for printer in printers]
    line = SUMMARY_SEPARATOR.join(parts)
    if len(line) <= SUMMARY_MAX:
        return line
    for shown in range(len(parts) - 1, 0, -1):
        line = SUMMARY_SEPARATOR.join(parts[:shown])
        line += f"{SUMMARY_SEPARATOR}… +{len(parts) - shown} more"
        if len(line) <= SUMMARY_MAX:
            return line
    # Unreachable while SUMMARY_PART_MAX leaves room for the suffix; kept as a bound.
    return _shorten(line, SUMMARY_MAX)


def _row(printer: Mapping[str, object]) -> list[str]:
    """Given one printer's entry, return its cells in ``COLUMNS`` order."""
    state = _text(printer.get("state"))
    holds = _holds(printer)
    if holds:
        # Holds explain why nothing happens; they belong next to the state.
        state = ", ".join([*([state] if state else []), "held: " + ", ".join(holds)])
    state = state or "-"
    decision = _text(printer.get("decision"), "-")
    attempts = _attempts(printer)
    if attempts > 1:
        decision += f" (attempt {attempts})"
    return [
        _text(printer.get("name"), "?"),
        state,
        _text(printer.get("device"), "-"),
        decision,
        _text(printer.get("reason"), "-"),
        _text(printer.get("at"), "-"),
    ]


def render_table(document: Mapping[str, object]) -> str:
    """Given a status document, return it as a header line and aligned columns.

    The header gives the daemon's pid and the time of the last update (and says
    when it runs with ``--dry-run``); then one row per printer.
    """
    header = f"reconnectd pid {_text(document.get('pid'), '?')}"
    header += f", started {_text(document.get('started'), '?')}"
    header += f", updated {_text(document.get('updated'), '?')}"
    if document.get("dry_run") is True:
        header += " (dry run: no connect or disconnect is sent)"

    printers = document.get("printers")
    entries = [p for p in printers if isinstance(p, Mapping)] if isinstance(printers, list) else []
    if not entries:
        return f"{header}\nno printers configured\n"

    rows = [list(COLUMNS), *(_row(p) for p in entries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    lines = [header, ""]
    for row in rows:
        cells = [cell.ljust(width) for cell, width in zip(row, widths)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines) + "\n"


def _pid_alive(pid: int) -> bool:
    """Given a pid, return whether a process with it exists."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        # It exists, it is just not ours to signal (reconnectd runs as root).
        return True
    return True


def load_status(path: Path) -> dict[str, object]:
    """Given the status file's path, return the document of the running daemon.

    Raise ``StatusUnavailable`` if the daemon is not running (no file, or a stale
    file whose pid has exited), or if the file is unreadable, corrupt or of an
    unknown version.
    """
    try:
        document = read_json(path)
    except JsonFileError as exc:
        if exc.missing:
            raise StatusUnavailable(
                f"reconnectd is not running (no status file at {path})"
            ) from None
        raise StatusUnavailable(f"cannot read the status of reconnectd: {exc}") from None
    if not isinstance(document, dict):
        raise StatusUnavailable(f"{path}: corrupt status file (not a JSON object)")
    version = document.get("version")
    if version != SCHEMA_VERSION:
        raise StatusUnavailable(
            f"{path}: status file version {version!r}, this reconnectd reads "
            f"version {SCHEMA_VERSION} (is the daemon from another release?)"
        )
    pid = document.get("pid")
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise StatusUnavailable(f"{path}: corrupt status file (no valid pid)")
    if not _pid_alive(pid):
        raise StatusUnavailable(
            f"reconnectd is not running: {path} is stale (pid {pid} has exited, "
            f"last update {_text(document.get('updated'), '?')})"
        )
    return document
