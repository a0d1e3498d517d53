"""The one HTTP transport under every client: OctoPrint's, Moonraker's, and login's.

What every request to a printer host needs, in one place:

* a timeout on every request (to connect, and between bytes of the answer), so the
  worst a call can block is known in advance;
* results as values, never exceptions: a failure is an :class:`Unreachable` whose
  reason says what happened in a few words ("connection refused", "certificate verify
  failed: ...; a certificate from a private CA needs ca_file");
* https always verified, against the system's CAs or against ``ca_file`` alone;
* nothing from the environment (proxies, netrc, CA bundle): requests would look those
  up on every request, a third of the time a request takes on loopback (bench/run),
  and the service's environment is the unit's anyway;
* connections kept alive, and a request that a server resets on a kept connection
  (OctoPrint 1.9 drops them without a FIN) sent once more on a new connection, with a
  connection per request from then on;
* the API key in one header and nowhere else: every text that reaches a log or a
  reason is scrubbed of it, and of a password in the URL (which requests sends as
  ``Authorization: Basic``); a reason shows the URL as :func:`~reconnectd.urls.shown_url`
  does.

The statuses a host answers with mean different things to each host: each client maps
them (``octoprint_api``, ``moonraker_api``).
"""

from __future__ import annotations

import errno
import http.cookiejar
import logging
import os
import re
import ssl
from typing import Any, Union

import requests
import urllib3

from reconnectd.host import Unreachable
from reconnectd.urls import shown_url, url_password

log = logging.getLogger(__name__)

USER_AGENT = "reconnectd"
# The longest piece of a host's own message kept in a reason: enough for "port is
# invalid" or a stock text, not a whole HTML page or a server traceback.
MESSAGE_LIMIT = 200

Answer = Union[requests.Response, Unreachable]


class Transport:
    """HTTP to one host: requests with timeouts, answers or :class:`Unreachable`."""

    def __init__(
        self,
        url: str,
        timeout: float,
        *,
        key_header: str | None = None,
        key: str | None = None,
        ca_file: str | os.PathLike[str] | None = None,
        session: requests.Session | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = session if session is not None else requests.Session()
        # A CA bundle's path, or True for the system's; never False.
        self.ca_file = None if ca_file is None else os.fspath(ca_file)
        self._verify: str | bool = True if self.ca_file is None else self.ca_file
        self.session.verify = self._verify
        self.session.headers["User-Agent"] = USER_AGENT
        self.session.trust_env = False
        self._keep_alive = True
        # Stateless on purpose: no session cookie may keep a revoked key's login alive,
        # and every request stands on the key alone.
        self.session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        if key and key_header:
            self.session.headers[key_header] = key
        # Kept only to scrub them from texts that come from elsewhere (exception
        # messages, a host's answers), should any ever echo them.
        self._secrets = [s for s in (key, *url_password(url)) if s]

    def request(
        self,
        method: str,
        path: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
    ) -> Answer:
        """Given a request, return the host's answer (any status), or :class:`Unreachable`
        when none came (refused, timed out, TLS failed)."""
        try:
            try:
                answer = self._send(method, path, body, params)
            except requests.ConnectionError as exc:
                if not (self._keep_alive and _dropped(exc)):
                    raise
                # Sent again on a new connection, and from now on a connection per
                # request. A command sent twice does no harm: a second connect is
                # ignored, a second restart finds Klippy restarting.
                log.debug("%s %s: kept-alive connection dropped: %s", method, path, exc)
                self._keep_alive = False
                self.session.headers["Connection"] = "close"
                self.session.close()
                answer = self._send(method, path, body, params)
        except requests.Timeout:
            return self.unreachable(method, path, f"no answer within {self.timeout:g} s")
        except requests.ConnectionError as exc:
            return self.unreachable(method, path, connection_failure(exc, self.ca_file))
        except requests.RequestException as exc:
            return self.unreachable(method, path, f"request failed: {type(exc).__name__}")
        except OSError as exc:
            # requests raises a bare OSError, outside its own exceptions, when the
            # CA bundle has vanished since the config was loaded.
            return self.unreachable(method, path, f"request failed: {exc}")
        log.debug("%s %s: HTTP %d", method, path, answer.status_code)
        return answer

    def json_object(self, answer: requests.Response) -> dict[str, Any] | Unreachable:
        """Given an answer, return its JSON object, or :class:`Unreachable` saying why not."""
        path = answer.request.path_url if answer.request is not None else "?"
        method = str(answer.request.method) if answer.request is not None else "?"
        try:
            body = answer.json()
        except ValueError:
            kind = answer.headers.get("Content-Type", "no content type").split(";")[0].strip()
            return self.unreachable(method, path, f"answer is not JSON ({kind})")
        if not isinstance(body, dict):
            what = f"answer is JSON but not an object ({type(body).__name__})"
            return self.unreachable(method, path, what)
        return body

    def unreachable(self, method: str, path: str, what: str) -> Unreachable:
        """Given what went wrong with a request, return it as :class:`Unreachable`."""
        # Only the text from elsewhere is scrubbed: a short password must not garble
        # the URL shown after it, which is masked already.
        reason = f"{self.scrub(what)} ({method} {shown_url(self.url)}{path})"
        log.debug("%s %s: unreachable: %s", method, path, reason)
        return Unreachable(reason)

    def scrub(self, text: str) -> str:
        """Given a text from elsewhere, return it with the key and URL password masked."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def close(self) -> None:
        """Close the session and its pooled connections."""
        self.session.close()

    def _send(
        self,
        method: str,
        path: str,
        body: dict[str, Any] | None,
        params: dict[str, str] | None,
    ) -> requests.Response:
        return self.session.request(
            method,
            self.url + path,
            json=body,
            params=params,
            timeout=(self.timeout, self.timeout),
            allow_redirects=False,
            # Given per request too: the session's value loses to
            # $REQUESTS_CA_BUNDLE, which would silently replace ca_file.
            verify=self._verify,
        )


def message_of(answer: requests.Response, key: str = "error") -> str:
    """Given a refusal, return the host's message, trimmed to one short line.

    OctoPrint puts it in ``{"error": "..."}``, Moonraker in ``{"error": {"message":
    "...", "traceback": ...}}`` (the traceback is left out); HTML is stripped of tags.
    """
    text = ""
    try:
        body = answer.json()
    except ValueError:
        text = re.sub(r"<[^>]*>", " ", answer.text)
    else:
        if isinstance(body, dict):
            error = body.get(key)
            if isinstance(error, str):
                text = error
            elif isinstance(error, dict) and isinstance(error.get("message"), str):
                text = error["message"]
        elif isinstance(body, str):
            text = body
    text = " ".join(text.split())
    if len(text) > MESSAGE_LIMIT:
        text = text[: MESSAGE_LIMIT - 1].rstrip() + "…"
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
