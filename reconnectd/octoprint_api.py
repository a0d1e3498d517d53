"""reconnectd's one HTTP client for OctoPrint's REST API (the 1.x connection API).

The 1.x connection API is what OctoPrint 1.9 to 2.0 all serve: 2.0 serves its new
shape of ``/api/connection`` only to a request with an ``X-OctoPrint-Api-Version``
header, which this client never sends. What still differs is read in
:mod:`reconnectd.octoprint_state`.

Every call returns a value (:mod:`reconnectd.host`), never raises for anything the
network or OctoPrint can do: the main loop decides when to retry. The transport
(``http_transport``) bounds every request by ``timeout``; ``read()`` makes up to two
requests (three while OctoPrint says "Connecting").

The API key goes into the session's headers and nowhere else: no reason string,
repr or log line contains it. An https URL is always verified (``http_transport``).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import requests

from reconnectd.host import (
    Accepted,
    CommandResult,
    HostView,
    Phase,
    ReadResult,
    Refused,
    Unreachable,
)
from reconnectd.http_transport import Transport, message_of
from reconnectd.octoprint_state import error_of, octoprint_view, phase_of, reconnect_plugins
from reconnectd.urls import shown_url

KEY_HEADER = "X-Api-Key"
KEY_REJECTED = "API key rejected or lacking permission"

# Statuses that mean "OctoPrint understood and said no": retrying the same request
# will not help until something changes (the key, the port list, the printer state).
# 412 is OctoPrint 2.0's "preconditions for connecting weren't met": the port is gone.
_REFUSALS = frozenset({400, 409, 412, 415})


class _WrongShape(Exception):
    """An answer that is JSON but not what OctoPrint 1.x sends."""


class OctoPrintApi:
    """A client for one OctoPrint: read its connection state, connect, disconnect."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self._http = Transport(
            url, timeout, key_header=KEY_HEADER, key=api_key, ca_file=ca_file, session=session
        )

    def __repr__(self) -> str:
        return f"OctoPrintApi({shown_url(self._http.url)!r}, timeout={self._http.timeout:g})"

    @property
    def url(self) -> str:
        return self._http.url

    def read(self, *, detail: bool = True) -> ReadResult:
        """Given whether the details matter (``/api/job``), return OctoPrint's connection
        state as a :class:`~reconnectd.host.HostView`.

        Reads ``/api/connection`` and then, when ``job``, ``/api/job`` (the only place
        that tells a manual Disconnect from a closed-after-error; without it the view's
        ``error`` is None), and ``/api/version`` when the state is ``"Connecting"``, a
        word that means more in OctoPrint 2.0 (see
        :func:`~reconnectd.octoprint_state.phase_of`). Return :class:`Unreachable` or
        :class:`Refused` if one of the first two requests fails.
        """
        connection_body = self._get_json("/api/connection")
        if isinstance(connection_body, (Unreachable, Refused)):
            return connection_body
        job_body: dict[str, Any] = {}
        if detail:
            answer = self._get_json("/api/job")
            if isinstance(answer, (Unreachable, Refused)):
                return answer
            job_body = answer
        try:
            view = _view(connection_body, job_body)
        except _WrongShape as exc:
            return Unreachable(f"answer has an unexpected shape: {exc}")
        if view.state.strip().lower() != "connecting":
            return view
        version = self._get_json("/api/version")
        server = version.get("server") if isinstance(version, dict) else None
        if not isinstance(server, str):
            # Only the reading of "Connecting" depends on it: read as 1.x means it
            # (still trying), and the next look asks again.
            return view
        return dataclasses.replace(view, phase=phase_of(view.state, server))

    def reconnect_plugins(self) -> list[tuple[str, str]] | Unreachable | Refused:
        """Return the reconnect plugins enabled in this OctoPrint, as (identifier, name).

        Read from ``GET /api/settings``, which lists every enabled plugin with
        settings and needs no plugin of its own (the Plugin Manager may be disabled).
        The key needs the SETTINGS_READ permission (Application Keys of an admin or
        a normal user have it): :class:`Refused` 403 otherwise.
        """
        body = self._get_json("/api/settings")
        if isinstance(body, (Unreachable, Refused)):
            return body
        return reconnect_plugins(body.get("plugins"))

    def connect(self, port: str, baudrate: int | None, profile: str | None) -> CommandResult:
        """Given a port (and optionally a baudrate and profile), ask OctoPrint to connect.

        Return :class:`Accepted` when OctoPrint took the command (it connects in the
        background; a connect while any connection exists is silently ignored).
        ``baudrate`` None leaves the choice to OctoPrint's ``serial.baudrate`` setting
        (auto-detection when unset). Never sends ``save`` or ``autoconnect``: both
        change OctoPrint's settings.
        """
        body: dict[str, Any] = {"command": "connect", "port": port}
        if baudrate is not None:
            body["baudrate"] = baudrate
        if profile is not None:
            body["printerProfile"] = profile
        return self._command(body)

    def disconnect(self) -> CommandResult:
        """Ask OctoPrint to drop its connection; return whether it took the command."""
        return self._command({"command": "disconnect"})

    def act(self, port: str | None, baudrate: int | None, profile: str | None) -> CommandResult:
        """The core's Connect, for OctoPrint: :meth:`connect` (a port is required)."""
        if port is None:
            return Refused(400, "no port to connect to")
        return self.connect(port, baudrate, profile)

    def recover(self) -> CommandResult:
        """The core's Disconnect, for OctoPrint: end a connection stuck opening."""
        return self.disconnect()

    def close(self) -> None:
        """Close the HTTP session and its pooled connections."""
        self._http.close()

    # -- internals -------------------------------------------------------------

    def _get_json(self, path: str) -> dict[str, Any] | Unreachable | Refused:
        """Given a path, GET it and return its JSON object, or why not."""
        answer = self._request("GET", path)
        if not isinstance(answer, requests.Response):
            return answer
        return self._http.json_object(answer)

    def _command(self, body: dict[str, Any]) -> CommandResult:
        answer = self._request("POST", "/api/connection", body)
        if not isinstance(answer, requests.Response):
            return answer
        # 204 is what OctoPrint sends; any other 2xx still means it took the command.
        return Accepted()

    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> requests.Response | Unreachable | Refused:
        """Given a request, return OctoPrint's answer if it is a success, else why not."""
        answer = self._http.request(method, path, body=body)
        if isinstance(answer, Unreachable):
            return answer
        status = answer.status_code
        if status >= 500:
            return self._http.unreachable(method, path, f"HTTP {status}")
        if status == 403:
            return Refused(403, KEY_REJECTED, key_rejected=True)
        if status in _REFUSALS:
            message = self._http.scrub(message_of(answer)) or f"HTTP {status}"
            if status == 400 and "CSRF" in message:
                # OctoPrint treats a POST whose key it does not accept as a browser's
                # and wants a CSRF token; this client never sends one, so the real
                # cause is the key.
                return Refused(403, KEY_REJECTED, key_rejected=True)
            return Refused(status, message)
        if not 200 <= status < 300:
            # 401, 404, a redirect to a login page: something that is not OctoPrint's
            # API answers at this URL (a proxy, a wrong path), or OctoPrint is starting.
            return self._http.unreachable(method, path, f"HTTP {status}")
        return answer


def _view(connection: dict[str, Any], job: dict[str, Any]) -> HostView:
    """Given the bodies of ``/api/connection`` and ``/api/job``, return the view.

    Raise :class:`_WrongShape` naming the first field that is missing or mistyped.
    """
    current = _field(connection, "current", dict, "/api/connection")
    options = _field(connection, "options", dict, "/api/connection")
    where = "/api/connection current"
    state = _field(current, "state", str, where)
    port = _optional(current, "port", str, where)
    where = "/api/connection options"
    ports = _field(options, "ports", list, where)
    baudrates = _field(options, "baudrates", list, where)
    if not all(isinstance(p, str) for p in ports):
        raise _WrongShape(f"{where}: ports is not a list of text")
    if not all(isinstance(b, int) and not isinstance(b, bool) for b in baudrates):
        raise _WrongShape(f"{where}: baudrates is not a list of numbers")
    profiles = _profiles(_optional(options, "printerProfiles", list, where))
    error = _optional(job, "error", str, "/api/job")
    if phase_of(state) == Phase.CLOSED:
        # OctoPrint 2.0 says "Offline after error" here without the error's text.
        error = error_of(_optional(job, "state", str, "/api/job"), error)
    return octoprint_view(
        state=state,
        port=port,
        error=error or None,
        ports=tuple(ports),
        baudrates=tuple(baudrates),
        port_preference=_optional(options, "portPreference", str, where),
        baudrate_preference=_optional(options, "baudratePreference", int, where),
        profile_preference=_optional(options, "printerProfilePreference", str, where),
        profiles=tuple(identifier for identifier, _ in profiles),
        profile_names=tuple(name for _, name in profiles),
    )


def _profiles(listed: list[Any] | None) -> list[tuple[str, str]]:
    """Given ``options.printerProfiles`` (``[{"id": ..., "name": ...}]``), return the
    profiles as (id, name); an entry without a text id is left out, a missing name is
    the id. Only ``check --online`` reads them, so an odd entry is no reason to fail."""
    profiles = []
    for entry in listed or []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            name = entry.get("name")
            profiles.append((entry["id"], name if isinstance(name, str) else entry["id"]))
    return profiles


def _field(body: dict[str, Any], key: str, kind: type[Any], where: str) -> Any:
    if key not in body:
        raise _WrongShape(f"{where}: {key} is missing")
    value = body[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise _WrongShape(f"{where}: {key} is {type(value).__name__}, not {kind.__name__}")
    return value


def _optional(body: dict[str, Any], key: str, kind: type[Any], where: str) -> Any:
    if body.get(key) is None:
        return None
    return _field(body, key, kind, where)
