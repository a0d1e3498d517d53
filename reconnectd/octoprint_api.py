"""reconnectd's one HTTP client for OctoPrint's REST API (the 1.x connection API).

The 1.x connection API is what OctoPrint 1.9 to 2.0 all serve: 2.0 serves its new
shape of ``/api/connection`` only to a request with an ``X-OctoPrint-Api-Version``
header, which this client never sends. What still differs is read in
:mod:`reconnectd.octoprint_state`.

Every call returns a value (:mod:`reconnectd.octoprint_state`), never raises for
anything the network or OctoPrint can do: the main loop decides when to retry.
Every request has a timeout, so the worst a call can block is known in advance:
``read()`` makes up to two requests (three while OctoPrint says "Connecting"), each
bounded by ``timeout`` to connect and ``timeout`` between bytes of the answer.

The API key goes into the session's headers and nowhere else: no reason string,
repr or log line contains it.

An https URL is always verified: against the system's CA certificates, or against
``ca_file`` alone when a private CA signed OctoPrint's certificate. There is no
switch to turn verification off. A failed verification is an :class:`Unreachable`
whose reason says why in a few words ("certificate verify failed: ...").
"""

from __future__ import annotations

import dataclasses
import errno
import http.cookiejar
import logging
import os
import re
import ssl
from typing import Any, Union

import requests
import urllib3

from reconnectd.octoprint_state import (
    Accepted,
    CommandResult,
    OctoPrintView,
    Phase,
    ReadResult,
    Refused,
    Unreachable,
    error_of,
    phase_of,
    reconnect_plugins,
)

log = logging.getLogger(__name__)

USER_AGENT = "reconnectd"

# The longest piece of OctoPrint's own message kept in a Refused reason: enough for
# "port is invalid" or flask's stock texts, not a whole HTML page.
_MESSAGE_LIMIT = 200

# Statuses that mean "OctoPrint understood and said no": retrying the same request
# will not help until something changes (the key, the port list, the printer state).
# 412 is OctoPrint 2.0's "preconditions for connecting weren't met": the port is gone.
_REFUSALS = frozenset({400, 409, 412, 415})

_Answer = Union[requests.Response, Unreachable]


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
        self._url = url.rstrip("/")
        self._timeout = timeout
        self._session = session if session is not None else requests.Session()
        # A CA bundle's path, or True for the system's; never False.
        self._ca_file = None if ca_file is None else os.fspath(ca_file)
        self._verify: str | bool = True if self._ca_file is None else self._ca_file
        self._session.verify = self._verify
        self._session.headers["User-Agent"] = USER_AGENT
        # Nothing from the environment (proxies, netrc, CA bundle): requests would
        # look those up again on every request, a third of the time a request takes
        # on loopback (bench/run measures it), and the service's environment is the
        # unit's anyway. The CA is ca_file or the system's, as the config says.
        self._session.trust_env = False
        # Connections are kept alive: a new one for each request cost about 2 of the
        # 9 ms from a device's return to the connect (bench/run). OctoPrint 1.9 drops
        # them; see _request().
        self._keep_alive = True
        # Stateless on purpose: no session cookie may keep a revoked key's login alive,
        # and every request stands on the key alone.
        self._session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        if api_key:
            self._session.headers["X-Api-Key"] = api_key
        # Kept only to scrub it from texts that come from elsewhere (exception
        # messages, OctoPrint's answers), should any ever echo it.
        self._secret = api_key or None

    def __repr__(self) -> str:
        return f"OctoPrintApi({self._url!r}, timeout={self._timeout:g})"

    @property
    def url(self) -> str:
        return self._url

    def read(self, *, job: bool = True) -> ReadResult:
        """Given whether the job matters, return OctoPrint's connection state as an
        :class:`OctoPrintView`.

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
        if job:
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
        return dataclasses.replace(view, version=server)

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

    def close(self) -> None:
        """Close the HTTP session and its pooled connections."""
        self._session.close()

    # -- internals -------------------------------------------------------------

    def _get_json(self, path: str) -> dict[str, Any] | Unreachable | Refused:
        """Given a path, GET it and return its JSON object, or why not."""
        answer = self._request("GET", path)
        if not isinstance(answer, requests.Response):
            return answer
        refused = self._refusal(answer)
        if refused is not None:
            return refused
        return self._json(answer)

    def _command(self, body: dict[str, Any]) -> CommandResult:
        answer = self._request("POST", "/api/connection", body)
        if not isinstance(answer, requests.Response):
            return answer
        refused = self._refusal(answer)
        if refused is not None:
            return refused
        # 204 is what OctoPrint sends; any other 2xx still means it took the command.
        return Accepted()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> _Answer:
        """Given a request, return the answer if it is not a failure, else :class:`Unreachable`."""
        try:
            try:
                answer = self._send(method, path, body)
            except requests.ConnectionError as exc:
                if not (self._keep_alive and _dropped(exc)):
                    raise
                # OctoPrint 1.9 drops a kept-alive connection without closing it, and
                # resets the next request sent on it, unread (seen against a real
                # 1.9.3 on most requests made 50 ms or more apart; 1.10 and later
                # keep them). Sent again on a new connection, and from now on a
                # connection per request. Sending a command twice would do no harm
                # either: a second connect is ignored, a second disconnect finds none.
                log.debug("%s %s: kept-alive connection dropped: %s", method, path, exc)
                self._keep_alive = False
                self._session.headers["Connection"] = "close"
                self._session.close()
                answer = self._send(method, path, body)
        except requests.Timeout:
            return self._unreachable(method, path, f"no answer within {self._timeout:g} s")
        except requests.ConnectionError as exc:
            return self._unreachable(method, path, connection_failure(exc, self._ca_file))
        except requests.RequestException as exc:
            return self._unreachable(method, path, f"request failed: {type(exc).__name__}")
        except OSError as exc:
            # requests raises a bare OSError, outside its own exceptions, when the
            # CA bundle has vanished since the config was loaded.
            return self._unreachable(method, path, f"request failed: {exc}")
        log.debug("%s %s: HTTP %d", method, path, answer.status_code)
        if answer.status_code >= 500:
            return self._unreachable(method, path, f"HTTP {answer.status_code}")
        if answer.status_code == 403 or answer.status_code in _REFUSALS:
            return answer
        if not 200 <= answer.status_code < 300:
            # 401, 404, a redirect to a login page: something that is not OctoPrint's
            # API answers at this URL (a proxy, a wrong path), or OctoPrint is starting.
            return self._unreachable(method, path, f"HTTP {answer.status_code}")
        return answer

    def _send(self, method: str, path: str, body: dict[str, Any] | None) -> requests.Response:
        return self._session.request(
            method,
            self._url + path,
            json=body,
            timeout=(self._timeout, self._timeout),
            allow_redirects=False,
            # Given per request too: the session's value loses to
            # $REQUESTS_CA_BUNDLE, which would silently replace ca_file.
            verify=self._verify,
        )

    def _refusal(self, answer: requests.Response) -> Refused | None:
        status = answer.status_code
        if status == 403:
            return Refused(403, "API key rejected or lacking permission")
        if status in _REFUSALS:
            message = self._scrub(_message_of(answer)) or f"HTTP {status}"
            if status == 400 and "CSRF" in message:
                # OctoPrint treats a POST whose key it does not accept as a browser's
                # and wants a CSRF token; this client never sends one, so the real
                # cause is the key.
                return Refused(403, "API key rejected or lacking permission")
            return Refused(status, message)
        return None

    def _json(self, answer: requests.Response) -> dict[str, Any] | Unreachable:
        path = answer.request.path_url if answer.request is not None else "?"
        method = answer.request.method if answer.request is not None else "?"
        try:
            body = answer.json()
        except ValueError:
            kind = answer.headers.get("Content-Type", "no content type").split(";")[0].strip()
            return self._unreachable(str(method), path, f"answer is not JSON ({kind})")
        if not isinstance(body, dict):
            return self._unreachable(
                str(method), path, f"answer is JSON but not an object ({type(body).__name__})"
            )
        return body

    def _unreachable(self, method: str, path: str, what: str) -> Unreachable:
        reason = self._scrub(f"{what} ({method} {self._url}{path})")
        log.debug("%s %s: unreachable: %s", method, path, reason)
        return Unreachable(reason)

    def _scrub(self, text: str) -> str:
        if self._secret:
            text = text.replace(self._secret, "***")
        return text


def _dropped(exc: requests.ConnectionError) -> bool:
    """Given a failed request, return whether the server dropped an open connection
    (reset, or closed before answering), as opposed to refusing a new one or a timeout."""
    cause = exc.args[0] if exc.args else None
    return isinstance(cause, urllib3.exceptions.ProtocolError)


def connection_failure(exc: requests.ConnectionError, ca_file: str | None = None) -> str:
    """Given a failed connection, return what happened in words (refused, no route, TLS)."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        current = pending.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        # Before the errno test: an SSLError is an OSError whose errno is OpenSSL's.
        if isinstance(current, ssl.SSLError):
            return _tls_failure(current, ca_file)
        if isinstance(current, ValueError) and type(current).__name__ == "CertificateError":
            # urllib3 1.x matches host names itself, with its own exception class.
            return f"certificate verify failed: {current}"
        if isinstance(current, OSError) and current.errno is not None:
            if current.errno == errno.ECONNREFUSED:
                return "connection refused"
            return f"cannot connect: {current.strerror or errno.errorcode.get(current.errno)}"
        pending.extend([current.__cause__, current.__context__])
        pending.extend(arg for arg in current.args if isinstance(arg, BaseException))
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException):
            pending.append(reason)
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS failed"
    text = str(exc)
    if "Name or service not known" in text or "nodename nor servname" in text:
        return "cannot connect: host name not known"
    if "Connection refused" in text:
        return "connection refused"
    return "cannot connect"


# OpenSSL's verify results that mean "signed by a CA you do not trust": the
# usual case of a private CA and no (or the wrong) ca_file.
_UNTRUSTED_ISSUER = frozenset(
    {
        2,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT
        18,  # X509_V_ERR_DEPTH_ZERO_SELF_SIGNED_CERT
        19,  # X509_V_ERR_SELF_SIGNED_CERT_IN_CHAIN
        20,  # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT_LOCALLY
        21,  # X509_V_ERR_UNABLE_TO_VERIFY_LEAF_SIGNATURE
    }
)


def _tls_failure(exc: ssl.SSLError, ca_file: str | None) -> str:
    """Given OpenSSL's error, return it in a few words, with the likely fix when known."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        what = f"certificate verify failed: {exc.verify_message or exc.reason}"
        if exc.verify_code in _UNTRUSTED_ISSUER:
            if ca_file is None:
                what += "; a certificate from a private CA needs ca_file"
            else:
                what += f"; not signed by a CA in {ca_file}"
        return what
    # "[SSL: WRONG_VERSION_NUMBER] wrong version number (_ssl.c:1006)" -> the words.
    text = exc.strerror or str(exc)
    text = re.sub(r"^\[[^\]]*\]\s*|\s*\(_ssl\.c:\d+\)$", "", text) or str(exc.reason)
    if exc.reason == "WRONG_VERSION_NUMBER":
        text += "; is this port https?"
    return f"TLS failed: {text}"


def _message_of(answer: requests.Response) -> str:
    """Given a refusal, return OctoPrint's message, trimmed to one short line."""
    text = ""
    try:
        body = answer.json()
    except ValueError:
        text = re.sub(r"<[^>]*>", " ", answer.text)
    else:
        if isinstance(body, dict) and isinstance(body.get("error"), str):
            text = body["error"]
        elif isinstance(body, str):
            text = body
    text = " ".join(text.split())
    if len(text) > _MESSAGE_LIMIT:
        text = text[: _MESSAGE_LIMIT - 1].rstrip() + "…"
    return text


def _view(connection: dict[str, Any], job: dict[str, Any]) -> OctoPrintView:
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
    error = _optional(job, "error", str, "/api/job")
    if phase_of(state) == Phase.CLOSED:
        # OctoPrint 2.0 says "Offline after error" here without the error's text.
        error = error_of(_optional(job, "state", str, "/api/job"), error)
    return OctoPrintView(
        state=state,
        port=port,
        error=error or None,
        ports=tuple(ports),
        baudrates=tuple(baudrates),
        port_preference=_optional(options, "portPreference", str, where),
        baudrate_preference=_optional(options, "baudratePreference", int, where),
        profile_preference=_optional(options, "printerProfilePreference", str, where),
    )


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
