"""The state file: what the decision cores must remember across a restart.

Holds (a manual Disconnect, a firmware stop) and the device instances they were
placed on live in ``$STATE_DIRECTORY/state.json``. Two promises rest on it:

* Nothing the user decided is lost by a restart. A write that fails (disk full, a
  read-only remount, a directory briefly unwritable) is not taken as done: the store
  keeps what is on disk apart from what should be, tries again on every wake-up of
  the loop (and asks for one, :attr:`HoldStore.retry_at`), says so once per failure
  episode, and :attr:`HoldStore.unsaved` tells the status file meanwhile.
* A damaged file never stops the daemon. Whatever is wrong with it (not JSON, nested
  a thousand deep, a number with a hundred thousand digits, the wrong shape), it is
  moved aside as ``state.json.corrupt-<time>`` for a person to look at, said once in
  the journal, and the daemon starts with the holds that could be read (usually none).

Version 1 of the document::

    {"version": 1, "printers": {"mk3s": {
        "holds": [{"kind": "manual", "reason": "disconnected in OctoPrint", "instance": "17"}],
        "connected_instance": "17", "last_instance": "17",
        "known_devices": ["2c99:0002:CZPX1017"]}}}
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from reconnectd.jsonfiles import JsonFileError, read_json, shown_value, write_json_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
HOLD_KINDS = ("manual", "fatal")
# A failed write is tried again on every wake-up; with nothing else waking the loop,
# this soon.
RETRY_AFTER = 5.0

Writer = Callable[..., None]


class HoldStore:
    """Reads and writes the state file; see the module docstring for its promises."""

    def __init__(
        self,
        path: Path,
        *,
        write: Writer = write_json_atomic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path
        self._write = write
        self._wall_clock = wall_clock
        self._on_disk: Mapping[str, object] | None = None  # the printers part, as last written
        self.unsaved: str | None = None  # why what should be on disk is not, while it lasts
        self.retry_at: float | None = None

    def load(self) -> dict[str, object]:
        """Return each printer's stored memory by name; never raise.

        A missing file is a first start. A damaged one is moved aside and said once;
        the printers whose entries could be read are returned.
        """
        try:
            document = read_json(self.path)
        except JsonFileError as error:
            if error.missing:
                return {}
            if error.unreadable:
                # Not the file's fault (permissions): moving it would lose it for good.
                log.warning("ignoring stored holds: %s", error)
                return {}
            return self._set_aside(error.problem, {})
        printers, problems = parse_state(document)
        if problems:
            return self._set_aside("; ".join(problems), printers)
        if document == {"version": SCHEMA_VERSION, "printers": printers}:
            # Exactly what save() writes: a start that changes nothing leaves the file
            # alone (no fsync at every start of a Pi's SD card).
            self._on_disk = printers
        return printers

    def save(self, printers: Mapping[str, object], now: float) -> None:
        """Given each printer's memory, make the file say so; never raise.

        Cheap when nothing changed. A failure is kept (:attr:`unsaved`), logged once
        per episode, and tried again on the next call.
        """
        if printers == self._on_disk:
            self._recovered()
            return
        document = {"version": SCHEMA_VERSION, "printers": dict(printers)}
        try:
            self._write(self.path, document, mode=0o600)
        except OSError as error:
            reason = f"cannot store holds in {self.path}: {error.strerror or error}"
            if self.unsaved is None:
                log.error("%s; will keep trying, and a restart now would forget them", reason)
            self.unsaved = reason
            self.retry_at = now + RETRY_AFTER
            return
        self._on_disk = dict(printers)
        self._recovered()

    def _recovered(self) -> None:
        if self.unsaved is not None:
            log.info("holds are stored in %s again", self.path)
        self.unsaved = None
        self.retry_at = None

    def _set_aside(self, problem: str, printers: dict[str, object]) -> dict[str, object]:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(self._wall_clock()))
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        kept = (
            f"starting with the holds of {', '.join(sorted(printers))} only"
            if printers
            else "starting with no holds"
        )
        try:
            os.replace(self.path, aside)
        except OSError as error:
            log.warning(
                "ignoring stored holds: %s is damaged (%s) and cannot be moved aside (%s); %s",
                self.path,
                problem,
                error.strerror or error,
                kept,
            )
        else:
            log.warning(
                "ignoring stored holds: %s is damaged (%s); moved to %s; %s",
                self.path,
                problem,
                aside.name,
                kept,
            )
        return printers


def parse_state(document: object) -> tuple[dict[str, object], list[str]]:
    """Given a parsed state document, return the printers' memories that are valid and
    a list of problems with the rest (empty when the whole document is valid)."""
    if not isinstance(document, dict):
        return {}, [f"not an object but {_kind(document)}"]
    problems: list[str] = []
    version = document.get("version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        problems.append(f"version is {shown_value(version)}, not {SCHEMA_VERSION}")
    extra = sorted(set(document) - {"version", "printers"})
    if extra:
        problems.append(f"unknown keys {', '.join(shown_value(k) for k in extra)}")
    printers = document.get("printers")
    if not isinstance(printers, dict):
        return {}, [*problems, f'"printers" is {_kind(printers)}, not an object']
    if problems:
        return {}, problems  # a document we do not know: trust none of it
    valid: dict[str, object] = {}
    for name, memory in printers.items():
        problem = _memory_problem(memory)
        if problem is None:
            valid[name] = memory
        else:
            problems.append(f"printer {shown_value(name)}: {problem}")
    return valid, problems


def _memory_problem(memory: object) -> str | None:
    if not isinstance(memory, dict):
        return f"{_kind(memory)}, not an object"
    unknown = sorted(
        set(memory) - {"holds", "connected_instance", "last_instance", "known_devices"}
    )
    if unknown:
        return f"unknown keys {', '.join(shown_value(k) for k in unknown)}"
    for key in ("connected_instance", "last_instance"):
        value = memory.get(key)
        if value is not None and not isinstance(value, str):
            return f"{key} is {_kind(value)}, not a string"
    known = memory.get("known_devices", [])
    if not isinstance(known, list) or not all(isinstance(k, str) for k in known):
        return "known_devices is not a list of strings"
    holds = memory.get("holds", [])
    if not isinstance(holds, list):
        return f"holds is {_kind(holds)}, not a list"
    for hold in holds:
        if not isinstance(hold, dict) or set(hold) != {"kind", "reason", "instance"}:
            return f"hold {shown_value(hold)} is not a kind, reason and instance"
        if hold["kind"] not in HOLD_KINDS:
            return f"hold kind {shown_value(hold['kind'])} is not one of {', '.join(HOLD_KINDS)}"
        if not isinstance(hold["reason"], str) or not isinstance(hold["instance"], str):
            return f"hold {shown_value(hold)} has a reason or instance that is not a string"
    return None


def _kind(value: object) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(
        type(value), "a list" if isinstance(value, list) else "an object"
    )
