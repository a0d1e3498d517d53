"""What Klipper reports through Moonraker, read into the core's words (``host.py``).

Pure: the client (``moonraker_api.py``) fetches the JSON; this module decides what
it means. Each fact below was seen against a real Klippy and Moonraker (see
tests/test_klipper_stack.py):

* ``GET /printer/info`` says ``ready``, ``startup``, ``shutdown`` or ``error``, with a
  ``state_message`` whose first line says why. Klippy reconnects to its MCU by itself
  only while in ``startup``; from ``shutdown`` or ``error`` nothing happens until
  someone sends FIRMWARE_RESTART.
* Losing the MCU reads ``shutdown`` / "Lost communication with MCU 'mcu'" (4.5 to 5.5 s
  after the board went), an MCU that was never reached ``error`` / "mcu 'mcu': Unable to
  connect", and a board that kept power while its USB link dropped answers a restart
  with ``error`` / "Failed automated reset of MCU 'mcu'" (a second restart recovers
  it). Those are losses of the serial line: safe to restart once the board is back.
* Every other shutdown or error was asked for or is the firmware's own verdict: an
  emergency stop ("Shutdown due to webhooks request"), M112, heater and thermal
  checks, an MCU-reported shutdown ("MCU 'mcu' shutdown: Timer too close"), a config
  error. A person must look (contract K3).
* While a print runs, Klippy stays ``ready``; only ``print_stats`` tells. After an MCU
  loss mid-print, ``print_stats`` reads ``paused`` although nothing can resume.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from reconnectd.host import ErrorKind, HostView, Phase

# The host's own words for its states, as /printer/info gives them.
READY, STARTUP, SHUTDOWN, ERROR = "ready", "startup", "shutdown", "error"

# Losses of the serial line (first line of the state message, lower case).
_LINE_LOST = (
    "lost communication with mcu",
    "unable to connect",
    "failed automated reset of mcu",
)
# Verdicts a person must acknowledge, checked first: an MCU-reported shutdown names
# the MCU too ("mcu 'mcu' shutdown: ..."), and must never pass for a lost line.
_VERDICTS = (
    "shutdown due to",
    "' shutdown:",
    "emergency",
    "m112",
    "heater",
    "thermal",
    "temperature",
    "timer too close",
    "can not update mcu",
)


def first_line(message: str | None) -> str:
    """Given a Klippy state message, return its first non-empty line."""
    for line in (message or "").splitlines():
        if line.strip():
            return line.strip()
    return ""


def classify_shutdown(message: str | None) -> ErrorKind:
    """Given the state message of a ``shutdown`` or ``error``, return why Klippy stopped.

    TRANSPORT when it lost or could not reach its MCU; FATAL for anything else,
    unknown causes included: restarting after a verdict nobody acknowledged could
    undo a safety stop.
    """
    text = first_line(message).lower()
    if any(marker in text for marker in _VERDICTS):
        return ErrorKind.FATAL
    if any(marker in text for marker in _LINE_LOST):
        return ErrorKind.TRANSPORT
    return ErrorKind.FATAL


def mcu_serials(settings: object) -> dict[str, str]:
    """Given ``configfile.settings``, return each ``[mcu*]`` section's ``serial`` path.

    Sections without a serial (a CAN bus MCU names ``canbus_uuid`` instead) are
    left out: there is no device node to wait for.
    """
    if not isinstance(settings, Mapping):
        return {}
    serials: dict[str, str] = {}
    for section, options in settings.items():
        name = str(section)
        if name != "mcu" and not name.startswith("mcu "):
            continue
        if isinstance(options, Mapping) and isinstance(options.get("serial"), str):
            serials[name] = options["serial"]
    return serials


def view_of(
    info: Mapping[str, Any],
    objects: Mapping[str, Any] | None,
    exists: Callable[[str], bool] = os.path.exists,
) -> HostView:
    """Given ``/printer/info``'s result and, when read, ``/printer/objects/query``'s
    ``status`` (``print_stats``, ``virtual_sdcard``, ``configfile``), return the view.

    ``exists`` tells whether a device path is there (contract K4: with several MCUs,
    act only when every ``serial`` they name exists).
    """
    state = str(info.get("state", "")).strip().lower()
    message = first_line(info.get("state_message") if isinstance(info, Mapping) else None)
    status = objects or {}
    print_stats = status.get("print_stats")
    printing = print_stats.get("state") if isinstance(print_stats, Mapping) else None
    if state == READY:
        busy = printing in ("printing", "paused")
        return HostView(
            state=READY,
            phase=Phase.BUSY if busy else Phase.OPERATIONAL,
            needs_port=False,
        )
    if state == STARTUP:
        return HostView(state=STARTUP, phase=Phase.CONNECTING, needs_port=False)
    if state not in (SHUTDOWN, ERROR):
        # A state a later Klipper invents: unknown means hands off.
        return HostView(state=state or "unknown", phase=Phase.BUSY, needs_port=False)
    kind = classify_shutdown(message)
    return HostView(
        state=state,
        phase=Phase.CLOSED,
        error=message or f"Klippy reports {state} without saying why",
        error_kind=kind,
        needs_port=False,
        waiting_for=_missing_mcu(status, exists) if objects is not None else None,
        lost_print=_lost_print(print_stats, status.get("virtual_sdcard")),
    )


def _missing_mcu(status: Mapping[str, Any], exists: Callable[[str], bool]) -> str | None:
    configfile = status.get("configfile")
    settings = configfile.get("settings") if isinstance(configfile, Mapping) else None
    missing = [
        f"[{section}] serial {path}"
        for section, path in sorted(mcu_serials(settings).items())
        if not exists(path)
    ]
    if not missing:
        return None
    return f"{', '.join(missing)} not there (that board is still off or unplugged)"


def _lost_print(print_stats: object, sdcard: object) -> str | None:
    """The print an MCU loss cut off: ``print_stats`` still names its file."""
    if not isinstance(print_stats, Mapping):
        return None
    if print_stats.get("state") not in ("printing", "paused"):
        return None
    filename = print_stats.get("filename") or "an unnamed file"
    parts = [str(filename)]
    progress = sdcard.get("progress") if isinstance(sdcard, Mapping) else None
    if isinstance(progress, (int, float)) and not isinstance(progress, bool):
        parts.append(f"{progress * 100:.1f} % done")
    duration = print_stats.get("print_duration")
    if isinstance(duration, (int, float)) and not isinstance(duration, bool) and duration > 0:
        parts.append(f"{duration / 60:.1f} min printing")
    return ", ".join(parts)
