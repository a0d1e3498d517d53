"""reconnectd's client for Moonraker, the API server in front of Klipper's host (Klippy).

Two things are asked of it: what Klippy reports (``GET /printer/info``, then, when it
matters, ``GET /printer/objects/query`` for the print and the MCUs Klipper's config
names) and FIRMWARE_RESTART (``POST /printer/firmware_restart``). ``/printer/info`` is
read rather than ``/server/info``: it follows Klippy at once, where ``/server/info``
lags by 0.1 to 0.5 s.

Every call returns a value (``host.py``), never raises: the loop decides when to
retry. What Moonraker's statuses mean here:

* 401 (or 403): the key is missing, wrong, or Moonraker wants a login: a person must
  fix it (:class:`Refused` with ``key_rejected``).
* 503 "Klippy Host not connected": Klippy is restarting or not running; 404 on
  ``/printer/info`` before Klippy's first connection: both :class:`Unreachable`
  (contract K5: keep trying, reconcile when it is back).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import requests

from reconnectd.host import Accepted, CommandResult, ReadResult, Refused, Unreachable
from reconnectd.http_transport import Transport, message_of
from reconnectd.moonraker_state import ERROR, SHUTDOWN, view_of
from reconnectd.urls import shown_url

KEY_HEADER = "X-Api-Key"
KEY_REJECTED = "API key rejected (Moonraker answers 401: set api_key_file, or trust this host)"
# What a reading asks of /printer/objects/query: the print, its progress, and the MCUs
# Klipper's config names (contract K4).
_DETAIL = {"print_stats": "state,filename,print_duration", "virtual_sdcard": "progress"}
_CONFIG = {"configfile": "settings"}


class MoonrakerApi:
    """A client for one Moonraker: read Klippy's state, restart its firmware."""

    def __init__(
        self,
        url: str,
        api_key: str | None,
        timeout: float,
        *,
        ca_file: str | os.PathLike[str] | None = None,
        session: requests.Session | None = None,
        exists: Callable[[str], bool] = os.path.exists,
    ) -> None:
        self._http = Transport(
            url, timeout, key_header=KEY_HEADER, key=api_key, ca_file=ca_file, session=session
        )
        self._exists = exists

    def __repr__(self) -> str:
        return f"MoonrakerApi({shown_url(self._http.url)!r}, timeout={self._http.timeout:g})"

    @property
    def url(self) -> str:
        return self._http.url

    def read(self, *, detail: bool = True) -> ReadResult:
        """Return what Klippy reports, as a :class:`~reconnectd.host.HostView`.

        A Klippy that is down is also asked which MCUs its config names, each checked
        for presence (contract K4), and which print it lost (logged before a restart,
        K2); a running one, with ``detail``, whether it prints (which changes only the
        status's word for it, never a decision).
        """
        info = self._result("GET", "/printer/info")
        if not isinstance(info, dict):
            return info
        state = str(info.get("state", "")).strip().lower()
        objects: dict[str, Any] | None = None
        if state in (SHUTDOWN, ERROR):
            down = self._objects({**_DETAIL, **_CONFIG})
            if isinstance(down, (Unreachable, Refused)):
                return down
            objects = down
        elif state == "ready" and detail:
            found = self._objects({"print_stats": "state"})
            objects = found if isinstance(found, dict) else None
        return view_of(info, objects, self._exists)

    def restart(self) -> CommandResult:
        """Send FIRMWARE_RESTART; :class:`Accepted` means Moonraker passed it to Klippy
        (the answer is an acknowledgement: whether Klippy comes back ``ready`` is read
        afterwards)."""
        answer = self._http.request("POST", "/printer/firmware_restart")
        if isinstance(answer, Unreachable):
            return answer
        mapped = self._refusal(answer, "/printer/firmware_restart")
        return Accepted() if mapped is None else mapped

    def act(self, port: str | None, baudrate: int | None, profile: str | None) -> CommandResult:
        """The core's Connect, for Klipper: FIRMWARE_RESTART (Klipper's config names the
        port and baudrate; a profile is OctoPrint's)."""
        del port, baudrate, profile
        return self.restart()

    def recover(self) -> CommandResult:
        """Nothing gets stuck opening in Klippy (the core never asks); a restart."""
        return self.restart()

    def server_info(self) -> dict[str, Any] | Unreachable | Refused:
        """Return Moonraker's ``/server/info`` result (for ``check --online``)."""
        return self._result("GET", "/server/info")

    def config_settings(self) -> dict[str, Any] | Unreachable | Refused:
        """Return ``configfile.settings`` as Klippy loaded it (for ``check --online``)."""
        found = self._objects(_CONFIG)
        if not isinstance(found, dict):
            return found
        configfile = found.get("configfile")
        settings = configfile.get("settings") if isinstance(configfile, dict) else None
        return settings if isinstance(settings, dict) else {}

    def close(self) -> None:
        """Close the HTTP session and its pooled connections."""
        self._http.close()

    # -- internals -------------------------------------------------------------

    def _objects(self, wanted: dict[str, str]) -> dict[str, Any] | Unreachable | Refused:
        query = "&".join(f"{name}={fields}" for name, fields in wanted.items())
        result = self._result("GET", f"/printer/objects/query?{query}")
        if not isinstance(result, dict):
            return result
        status = result.get("status")
        return status if isinstance(status, dict) else {}

    def _result(self, method: str, path: str) -> dict[str, Any] | Unreachable | Refused:
        """GET or POST ``path``; return the ``result`` object of the answer, or why not."""
        answer = self._http.request(method, path)
        if isinstance(answer, Unreachable):
            return answer
        mapped = self._refusal(answer, path)
        if mapped is not None:
            return mapped
        body = self._http.json_object(answer)
        if isinstance(body, Unreachable):
            return body
        result = body.get("result")
        if not isinstance(result, dict):
            return self._http.unreachable(method, path, "answer has no result object")
        return result

    def _refusal(self, answer: requests.Response, path: str) -> Refused | Unreachable | None:
        status = answer.status_code
        method = str(answer.request.method) if answer.request is not None else "GET"
        if 200 <= status < 300:
            return None
        if status in (401, 403):
            return Refused(status, KEY_REJECTED, key_rejected=True)
        message = self._http.scrub(message_of(answer))
        if status == 503:
            what = f"Klippy is not connected to Moonraker ({message or 'HTTP 503'})"
            return self._http.unreachable(method, path.split("?")[0], what)
        if status == 404 and path == "/printer/info":
            what = "Klippy has not connected to Moonraker yet"
            return self._http.unreachable(method, path, what)
        if status >= 500 or status == 404:
            return self._http.unreachable(method, path.split("?")[0], f"HTTP {status}")
        return Refused(status, message or f"HTTP {status}")
