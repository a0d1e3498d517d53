"""URLs of printer hosts: how one is shown, whether it can be used, which instance it names.

A URL may carry the user name and password of HTTP basic auth in front of OctoPrint
(a reverse proxy: ``http://user:secret@host:5000``). requests takes them from the URL
(``requests.utils.get_auth_from_url``, whatever the session's ``trust_env``) and sends
them as ``Authorization: Basic`` with every request. The password is a secret like the
API key: every place that shows a URL shows :func:`shown_url` of it, and log lines
pass through :func:`mask_urls`.

What requests does with the user name and password decides what may be written:
it percent-decodes them as UTF-8 (an invalid escape is kept as typed, a byte that is
not UTF-8 becomes U+FFFD), sends nothing at all when the password is missing
(``http://user@host``), and encodes them as Latin-1, raising ``UnicodeEncodeError``
(no ``RequestException``) for any other character. :func:`url_problem` refuses all
of that while the config is read, instead of a request failing later.
"""

from __future__ import annotations

import re
from urllib.parse import unquote, urlsplit

MASK = "***"
DEFAULT_PORTS = {"http": 80, "https": 443}

# RFC 3986 userinfo: unreserved, sub-delims, ":" and percent-escapes. Other ASCII
# must be percent-encoded (non-ASCII is encoded by requests itself).
_USERINFO_ASCII = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,;=:%"
)
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
# A URL inside a text: its scheme, then anything up to white space or a quote.
_URL_WITH_AT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>]*@[^\s\"'<>]*")


def shown_url(url: str) -> str:
    """Given a URL, return it as it may be shown: ``http://user:***@host``.

    The password is masked; a user name without a password is masked whole
    (``http://***@host``), since such a name is often a token. The URL need not
    parse: whatever lies between ``//`` (or the start) and the last ``@`` is taken
    for the user name and password, so a password holding ``/`` or ``@`` is masked
    whole too.
    """
    start = url.find("//")
    start = 0 if start < 0 else start + 2
    at = url.rfind("@", start)
    if at < 0:
        return url
    user, colon, _ = url[start:at].partition(":")
    return url[:start] + (f"{user}:{MASK}" if colon else MASK) + url[at:]


def mask_urls(text: str) -> str:
    """Given any text (a log line), return it with every URL in it shown by :func:`shown_url`."""
    if "@" not in text or "://" not in text:
        return text
    return _URL_WITH_AT.sub(lambda match: shown_url(match.group()), text)


def is_octoprint_url(url: str) -> bool:
    """Given a URL, return whether it can name an OctoPrint: http(s), a host, no query."""
    try:
        parts = urlsplit(url)
        # .port raises ValueError for a port that is not a number in 1-65535.
        return (
            parts.scheme.lower() in ("http", "https")
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
            and not parts.query
            and not parts.fragment
            and not any(c.isspace() or not c.isprintable() for c in url)
        )
    except ValueError:
        return False


def url_problem(url: str, example: str) -> str | None:
    """Given a host's URL and an example of a good one, return what is wrong with it, or None.

    Wrong is: not an http(s) URL with a host (see :func:`is_octoprint_url`), or a user
    name and password that cannot be sent as HTTP basic auth. The message never
    quotes any part of the password; a caller showing the URL shows :func:`shown_url`.
    """
    expected = f'expected an http:// or https:// URL with a host like "{example}"'
    start = url.find("//")
    at = url.rfind("@", start + 2) if start >= 0 else -1
    if at >= 0:
        problem = _userinfo_problem(url[start + 2 : at])
        if problem is not None:
            return problem
    if not is_octoprint_url(url):
        return expected
    return None


def _userinfo_problem(userinfo: str) -> str | None:
    """Given what a URL holds before its host's ``@``, return why requests cannot send it
    as HTTP basic auth (RFC 7617), or None."""
    user, colon, password = userinfo.partition(":")
    if not colon:
        return (
            'a user name without a password before "@": requests then sends no credentials'
            ' at all; write "user:password@" ("user:@" for an empty password)'
        )
    if not user:
        return 'the user name before ":" is empty; HTTP basic auth needs one'
    for part, what, shown in ((user, "user name", True), (password, "password", False)):
        problem = _part_problem(part, what, shown)
        if problem is not None:
            return problem
    return None


def _part_problem(part: str, what: str, shown: bool) -> str | None:
    # The user name may be quoted in a message; the password never is, not even a
    # single character of it.
    bad = sorted({c for c in part if c.isascii() and c not in _USERINFO_ASCII})
    if bad:
        if shown:
            listed = " ".join(repr(c) for c in bad)
            escapes = ", ".join(f"%{ord(c):02X} for {c!r}" for c in bad)
            return (
                f"the user name has characters a URL cannot hold as they are ({listed}):"
                f" write {escapes}"
            )
        return (
            f"the {what} has a character a URL cannot hold as it is (a space, a control"
            ' character or one of "/?#@[]<>\\^`{|}): percent-encode it, as %2F for "/"'
            ' or %40 for "@"'
        )
    if _BAD_ESCAPE.search(part):
        return (
            f'the {what} has an invalid percent-escape: "%" must be followed by two hex'
            ' digits (a "%" itself is written %25)'
        )
    try:
        decoded = unquote(part, errors="strict")
    except UnicodeDecodeError:
        return (
            f"the {what}'s percent-escapes are not UTF-8: write each character as the"
            ' escapes of its UTF-8 bytes ("ä" is %C3%A4)'
        )
    if what == "user name" and ":" in decoded:
        return 'the user name holds ":" (%3A), which HTTP basic auth cannot carry in a user name'
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return f"the {what} holds a control character, which HTTP basic auth cannot carry"
    try:
        decoded.encode("latin-1")
    except UnicodeEncodeError:
        return (
            f"the {what} holds a character outside Latin-1, which requests cannot send in"
            " HTTP basic auth"
        )
    return None


def instance_of(url: str) -> str:
    """Given a host's URL, return what names its instance: scheme, lowercase host, port
    (80 or 443 when not written) and path without a trailing ``/``; the user name and
    password left out. Two URLs with the same result reach the same server."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is None:
        port = DEFAULT_PORTS.get(scheme)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"  # IPv6
    return f"{scheme}://{host}:{port}{parts.path.rstrip('/')}"


def url_password(url: str) -> list[str]:
    """Given a URL, return its password as written and as requests decodes it (for
    scrubbing texts from elsewhere); empty when it has none."""
    start = url.find("//")
    at = url.rfind("@", start + 2) if start >= 0 else -1
    if at < 0:
        return []
    _, colon, password = url[start + 2 : at].partition(":")
    if not colon or not password:
        return []
    return list(dict.fromkeys([password, unquote(password)]))
