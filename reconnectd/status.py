"""The status document: where it lives, and how a person sees it.

The daemon rewrites ``status.json`` on every change (see ``jsonfiles``);
``reconnectd status`` reads it back. Version 1 of the document::

    {"version": 1, "pid": 1234, "started": "...Z", "updated": "...Z", "dry_run": false,
     "holds_unsaved": null,
     "printers": [{"name": "mk3s", "state": "operational", "device": "/dev/ttyACM0",
                   "octoprint": "http://127.0.0.1:5000", "decision": "connect",
                   "reason": "device came back", "at": "...Z",
                   "holds": ["manual disconnect"], "attempts": 1, "connects": 3}]}

Readers must tolerate missing fields and extra ones: fields may be added within a
version, never removed or changed in meaning.

How this reader takes a document (``validate_status``), field by field. What it
needs in order to say anything true is checked, and a file that fails is an
invalid status file (``reconnectd status`` says so in one line and exits 1); a
field that is merely odd is dropped, as if missing, and the rest is shown:

- the document: a JSON object, else invalid;
- ``version``: exactly the integer 1, else invalid (missing, ``true``, ``1.0``, 2...);
- ``pid``: an integer from 1 to 2**31 - 1 (a ``pid_t``), else invalid: it alone says
  whether the daemon runs, and 0 or a negative pid given to ``kill`` would mean a
  process group;
- ``printers``: a list of objects, else invalid, since a printer left out would look
  like no printer; missing, it is an empty list;
- ``started``, ``updated``, ``holds_unsaved``, and each printer's ``name``, ``state``,
  ``device``, ``octoprint``, ``decision``, ``reason``, ``at``: a string or null, else
  dropped (a number is not taken for text; times are shown as written, never computed);
- ``dry_run``: a boolean, else dropped (not a dry run);
- ``holds``: a list, else dropped; its entries other than strings are dropped;
- ``attempts``, ``connects``: an integer from 0 to 10**9, else dropped;
- any other field: kept as it is for ``status --json`` if it is plain JSON (no NaN or
  Infinity, nested at most 32 deep), else dropped.

The table shows text on one line, with control characters and unpaired surrogates
replaced by U+FFFD: a status file cannot move the terminal's cursor or break its output.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from reconnectd.jsonfiles import JsonFileError, read_json, shown_value

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

# pid_t is a signed 32-bit int: past it, os.kill raises OverflowError.
PID_MAX = 2**31 - 1
# Past this, a count is not one the daemon wrote.
COUNT_MAX = 10**9
# Deeper, json.dump (its pure-Python encoder, with indent) may run out of stack.
EXTRA_DEPTH_MAX = 32

_TEXT_FIELDS = ("started", "updated", "holds_unsaved")
_PRINTER_TEXT_FIELDS = ("name", "state", "device", "octoprint", "decision", "reason", "at")
_PRINTER_COUNT_FIELDS = ("attempts", "connects")
# C0 and C1 controls (terminal escapes, carriage returns) and unpaired surrogates
# (which no UTF-8 output can encode).
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


class StatusUnavailable(Exception):
    """The daemon's status cannot be shown; the message says why, for a person.

    ``not_running`` is true when the daemon is simply not running (no status file,
    or a stale one), false when the file is there but cannot be read or is invalid.
    The message is one line whatever the path or the file holds.
    """

    def __init__(self, message: str, *, not_running: bool = False) -> None:
        super().__init__(_printable(message))
        self.not_running = not_running


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


def _printable(text: str) -> str:
    """Given text, return it with control characters and lone surrogates as U+FFFD."""
    return _UNPRINTABLE.sub("\ufffd", text)


def _text(value: object, default: str = "") -> str:
    """Given a field read from the document, return it as one line of printable text.

    Only a string is text: anything else (null, a number, a list) gives ``default``.
    """
    if not isinstance(value, str):
        return default
    return _printable(" ".join(value.split())) or default


def _count(value: object) -> int | None:
    """Given a field read from the document, return it if it is a plausible count."""
    # bool is an int too, and never a count.
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= COUNT_MAX:
        return value
    return None


def _holds(printer: Mapping[str, object]) -> list[str]:
    """Given one printer's entry, return its holds as text (tolerating bad types)."""
    holds = printer.get("holds")
    if not isinstance(holds, list):
        return []
    return [_text(hold) for hold in holds if _text(hold)]


def _attempts(printer: Mapping[str, object]) -> int:
    """Given one printer's entry, return its connect attempts (0 if unknown)."""
    return _count(printer.get("attempts")) or 0


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
    pid = document.get("pid")
    shown_pid = str(pid) if type(pid) is int and 1 <= pid <= PID_MAX else "?"
    header = f"reconnectd pid {shown_pid}"
    header += f", started {_text(document.get('started'), '?')}"
    header += f", updated {_text(document.get('updated'), '?')}"
    if document.get("dry_run") is True:
        header += " (dry run: no connect or disconnect is sent)"

    unsaved = _text(document.get("holds_unsaved"))
    if unsaved:
        # Nothing the user decided may be lost silently: a restart now would forget it.
        header += f"\nholds not yet on disk: {unsaved}"

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


def _plain(value: object, depth: int = 0) -> bool:
    """Given a value read from the document, return whether any JSON writer takes it.

    False for NaN and Infinity (not JSON, though Python reads them) and for nesting
    deeper than ``EXTRA_DEPTH_MAX``.
    """
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, list):
        return depth < EXTRA_DEPTH_MAX and all(_plain(item, depth + 1) for item in value)
    if isinstance(value, dict):
        return depth < EXTRA_DEPTH_MAX and all(_plain(item, depth + 1) for item in value.values())
    return value is None or isinstance(value, (bool, int, str))


def _valid_printer(entry: Mapping[str, object]) -> dict[str, object]:
    """Given one printer's entry, return its fields that this reader can take."""
    printer: dict[str, object] = {}
    for key, value in entry.items():
        if key in _PRINTER_TEXT_FIELDS:
            keep = value is None or isinstance(value, str)
        elif key in _PRINTER_COUNT_FIELDS:
            keep = _count(value) is not None
        elif key == "holds":
            if isinstance(value, list):
                printer[key] = [hold for hold in value if isinstance(hold, str)]
            continue
        else:
            keep = _plain(value)
        if keep:
            printer[key] = value
    return printer


def validate_status(document: object, path: Path) -> dict[str, object]:
    """Given a parsed status document and its file's path, return its plain values.

    The fields are taken as the module docstring says: a field merely odd is
    dropped; what the result holds can be shown, or written as strict JSON, without
    an error. Raise ``StatusUnavailable`` (one line, naming ``path``) if the document
    is not a status document of this version, or has no valid pid or printers.
    """

    def invalid(problem: str) -> StatusUnavailable:
        return StatusUnavailable(f"{path}: invalid status file: {problem}")

    if not isinstance(document, dict):
        raise invalid(f"the document is {shown_value(document)}, not a JSON object")
    if "version" not in document:
        raise invalid("version: missing")
    version = document["version"]
    # type(): neither true nor 1.0 is the version 1.
    if type(version) is not int or version != SCHEMA_VERSION:
        raise StatusUnavailable(
            f"{path}: status file version {shown_value(version)}, this reconnectd reads "
            f"version {SCHEMA_VERSION} (is the daemon from another release?)"
        )
    if "pid" not in document:
        raise invalid("pid: missing")
    pid = document["pid"]
    if type(pid) is not int or not 1 <= pid <= PID_MAX:
        raise invalid(f"pid: {shown_value(pid)} is not a process id (1 to {PID_MAX})")
    entries = document.get("printers", [])
    if not isinstance(entries, list):
        raise invalid(f"printers: {shown_value(entries)} is not a list")
    printers = []
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise invalid(f"printers[{index}]: {shown_value(entry)} is not an object")
        printers.append(_valid_printer(entry))

    valid: dict[str, object] = {}
    for key, value in document.items():
        if key in ("version", "pid"):
            keep = True
        elif key == "printers":
            value, keep = printers, True
        elif key in _TEXT_FIELDS:
            keep = value is None or isinstance(value, str)
        elif key == "dry_run":
            keep = isinstance(value, bool)
        else:
            keep = _plain(value)
        if keep:
            valid[key] = value
    return valid


def _pid_alive(pid: int) -> bool:
    """Given a pid from 1 to ``PID_MAX``, return whether a process with it exists.

    Raise ``ValueError`` for any other pid: to ``kill``, 0 and negative pids name
    process groups (-1: every process), and a larger one overflows ``pid_t``.
    """
    if not 1 <= pid <= PID_MAX:
        raise ValueError(f"not a process id: {pid}")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        # PermissionError: it exists, it is just not ours to signal (reconnectd runs
        # as root). Anything else says nothing about it: show what the file says.
        return True
    return True


def load_status(path: Path) -> dict[str, object]:
    """Given the status file's path, return the running daemon's document, validated.

    Raise ``StatusUnavailable`` if the daemon is not running (no file, or a stale
    file whose pid has exited: ``not_running`` is then true), or if the file is
    unreadable, not JSON, or invalid as ``validate_status`` says.
    """
    try:
        document = read_json(path)
    except JsonFileError as exc:
        if exc.missing:
            raise StatusUnavailable(
                f"reconnectd is not running (no status file at {path})", not_running=True
            ) from None
        raise StatusUnavailable(f"cannot read the status of reconnectd: {exc}") from None
    valid = validate_status(document, path)
    pid = valid["pid"]
    assert isinstance(pid, int)
    if not _pid_alive(pid):
        raise StatusUnavailable(
            f"reconnectd is not running: {path} is stale (pid {pid} has exited, "
            f"last update {_text(valid.get('updated'), '?')})",
            not_running=True,
        )
    return valid
