"""What reconnectd learns from OctoPrint, as plain values, and how to read it.

The HTTP client (``octoprint_api.py``) produces these values; the decision core
(``core.py``) consumes them. Neither side sees ``requests`` or JSON.

OctoPrint's traps, and why the code below looks the way it does:

* ``GET /api/connection`` says ``"Closed"`` for a manual Disconnect, a vanished
  device and a firmware fatal error alike. The difference is only visible in
  ``GET /api/job``: ``"Offline"`` with no error, or ``"Offline after error"`` with
  the error text. Both are read together into one :class:`~reconnectd.host.HostView`.
* A connect is silently ignored while any connection object exists, so the only
  safe moment to connect is ``Phase.CLOSED``.

What differs between versions (each seen against a real one, 1.9.3 to 2.0.0rc7):

* OctoPrint 2.0 says ``"Offline"`` where 1.x says ``"Closed"``.
* OctoPrint 2.0 says ``"Connecting"`` both while it opens the port (where 1.x says
  ``"Opening serial connection"``, and where both hang forever on a node that
  cannot be opened) and while it greets the firmware: from 2.0 on, "Connecting"
  is read as ``Phase.OPENING``, so that a connection stuck there is recovered.
* OctoPrint 2.0.0rc7 loses the error text: after a vanished device, a silent
  printer or a firmware ``kill()`` alike, ``/api/job`` says ``"Offline after
  error"`` with no ``error`` (and ``/api/printer/error`` is empty). Such an error
  cannot be told from a firmware stop, so it counts as one (:func:`error_of`).
"""

from __future__ import annotations

from typing import Any

from reconnectd.host import ErrorKind, HostView, Phase

_PHASE_BY_STATE: dict[str, Phase] = {
    "closed": Phase.CLOSED,
    "offline": Phase.CLOSED,  # OctoPrint 2.0's word for no connection
    # OctoPrint 1.11.8 shows this for ~15 ms after an error while the connection
    # object still exists (seen against a real one): a connect sent then would be
    # ignored, so it is "closing, look again", not closed.
    "offline after error": Phase.ERROR,
    "opening serial connection": Phase.OPENING,
    "detecting serial connection": Phase.CONNECTING,
    "detecting serial port": Phase.CONNECTING,
    "detecting baudrate": Phase.CONNECTING,
    "detecting": Phase.CONNECTING,  # OctoPrint 2.0, from a connector that says no more
    "connecting": Phase.CONNECTING,
    "operational": Phase.OPERATIONAL,
    "error": Phase.ERROR,
}


def phase_of(state: str, version: str | None = None) -> Phase:
    """Given OctoPrint's ``current.state`` text (and its version, when known), return
    its :class:`Phase`.

    Every state not known to be closed, opening, connecting, operational or error
    (printing, paused, cancelling, transferring to SD, and any state a future
    OctoPrint invents) is ``BUSY``: unknown means hands off. From 2.0 on,
    ``"Connecting"`` is ``OPENING``: 2.0 uses that one word for opening the port too,
    and only OPENING is recovered when it lasts.
    """
    text = state.strip().lower()
    if text == "connecting" and is_2_or_later(version):
        return Phase.OPENING
    return _PHASE_BY_STATE.get(text, Phase.BUSY)


def is_2_or_later(version: str | None) -> bool:
    """Given OctoPrint's version text (``"2.0.0rc7"``, ``"1.11.8"``), return whether it
    is 2.0 or later; an unknown or unreadable version is not."""
    if not version:
        return False
    major = version.strip().split(".", 1)[0]
    return major.isdigit() and int(major) >= 2


# What a closed OctoPrint's error is taken to be when /api/job says there was one but
# not which (OctoPrint 2.0.0rc7 drops the text when it closes the connection).
UNNAMED_ERROR = (
    'OctoPrint says "Offline after error" but not which error (OctoPrint 2.0 does not '
    "report it); taken as a firmware stop"
)


def error_of(job_state: str | None, error: str | None) -> str | None:
    """Given ``/api/job``'s ``state`` and ``error`` while no connection exists, return
    the error text to decide on.

    The error text when there is one; :data:`UNNAMED_ERROR` when the state says there
    was an error but no text came (OctoPrint 2.0); None when there was no error.
    """
    if error is not None and error.strip():
        return error
    if job_state is not None and "error" in job_state.strip().lower():
        return UNNAMED_ERROR
    return None


# Firmware safety stops. Checked first: a fatal message may also mention the port.
_FATAL_MARKERS = (
    "kill() called",
    "printer halted",
    "thermal runaway",
    "heating failed",
    "maxtemp",
    "mintemp",
    "emergency",
    "system stopped",
)

# Texts OctoPrint produces when the serial line itself failed or went quiet.
_TRANSPORT_MARKERS = (
    "serialexception",
    "device reports readiness to read but returned no data",
    "device disconnected",
    "input/output error",
    "[errno 5]",
    "[errno 2]",
    "[errno 6]",
    "[errno 19]",
    "no such file or directory",
    "could not open port",
    "too many consecutive timeouts",
    "no more candidates to test",
    "failed to autodetect",
    "unexpected error while connecting",
    "connection closed",
)


def classify_error(error: str | None) -> ErrorKind:
    """Given the error text OctoPrint reports after closing, return why it closed.

    An error that is neither a known firmware stop nor a known failure of the
    serial line is taken as FATAL: OctoPrint disconnects on firmware ``Error:``
    lines by default, and reconnecting after an unknown firmware error resets the
    board through DTR. Unknown means a person must look.
    """
    if error is None or not error.strip():
        return ErrorKind.NONE
    text = error.lower()
    if any(marker in text for marker in _FATAL_MARKERS):
        return ErrorKind.FATAL
    if any(marker in text for marker in _TRANSPORT_MARKERS):
        return ErrorKind.TRANSPORT
    return ErrorKind.FATAL


def octoprint_view(
    state: str, *, error: str | None = None, version: str | None = None, **fields: Any
) -> HostView:
    """Given one reading of ``/api/connection`` and ``/api/job`` (and OctoPrint's version
    when a state text needs it), return it in the core's words.

    ``fields`` are :class:`~reconnectd.host.HostView`'s others (port, ports, the
    preferences).
    """
    return HostView(
        state=state,
        phase=phase_of(state, version),
        error=error,
        error_kind=classify_error(error),
        **fields,
    )


# OctoPrint plugins that reconnect the printer on their own, by plugin identifier (the
# key of their settings under ``plugins`` in /api/settings, compared without case),
# with the name their users know. Two reconnectors fight: each undoes the other's
# decision (a Disconnect reconnectd respects, a plugin reconnects).
RECONNECT_PLUGINS: dict[str, str] = {
    "serialreconnect": "SerialReconnect",
    "portretry": "PortRetry",
    "portretryplus": "PortRetryPlus",
    "autoconnectplus": "AutoConnectPlus",
    "reconnectguru": "ReconnectGuru",  # its first releases
    "reconnect_guru": "ReconnectGuru",
}


def reconnect_plugins(plugin_settings: object) -> list[tuple[str, str]]:
    """Given the ``plugins`` object of ``GET /api/settings``, return the reconnect
    plugins in it as (identifier, name), sorted by identifier.

    OctoPrint lists there every enabled plugin that has settings, under its
    identifier. A plugin whose own ``enabled`` setting is false is loaded but idle,
    and is left out. Anything that is not an object yields nothing.
    """
    if not isinstance(plugin_settings, dict):
        return []
    found: list[tuple[str, str]] = []
    for identifier, settings in plugin_settings.items():
        name = RECONNECT_PLUGINS.get(str(identifier).lower())
        if name is None:
            continue
        if isinstance(settings, dict) and settings.get("enabled") is False:
            continue
        found.append((str(identifier), name))
    return sorted(found)
