"""Logging set-up: plain lines on stderr, journald priorities when stderr is the journal.

journald reads a service's stderr line by line and takes a leading ``<N>`` as that
line's syslog priority (sd-daemon(3)); it adds its own timestamps. Anywhere else
(a terminal, a file, a container log) each line carries a timestamp and a level.

A record that spans several lines (a traceback, a message quoting a reply) is
written with every continuation line indented and, in the journal, prefixed with
the record's priority: otherwise journald would store each traceback line as a
separate entry at the default priority, apart from the error it belongs to.

Secrets registered with :func:`redact` are replaced with ``***`` in every line
written here, whatever way they got into it (a ``%`` argument, an exception
message, a URL), and so is the password of every URL in a line
(``http://user:***@host``, :func:`reconnectd.urls.mask_urls`). The code should never
log a key or a password in the first place; this is the net under it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from reconnectd.urls import mask_urls

REDACTED = "***"

# Longest first, so that a secret containing another is replaced whole.
_secrets: list[str] = []

# Syslog priorities as sd-daemon(3) spells them; NOTICE (5) has no logging level.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
_DEBUG_PRIORITY = 7

_CONTINUATION_INDENT = "  "

# The handler the last setup_logging() installed, so that a second call replaces it.
_installed: logging.Handler | None = None


def redact(secret: str) -> None:
    """Given a secret (an API key), make every later log line show ``***`` instead.

    Blank strings are ignored: replacing "" would garble every line and hide nothing.
    """
    secret = secret.strip()
    if not secret or secret in _secrets:
        return
    _secrets.append(secret)
    _secrets.sort(key=len, reverse=True)


def scrub(text: str) -> str:
    """Given any text, return it with every registered secret replaced by ``***`` and
    the password of every URL in it masked."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, REDACTED)
    return mask_urls(text)


def syslog_priority(levelno: int) -> int:
    """Given a logging level number, return the syslog priority journald expects."""
    for level, priority in _PRIORITIES:
        if levelno >= level:
            return priority
    return _DEBUG_PRIORITY


def is_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """Given an output stream and the environment, return whether it goes to journald.

    systemd sets ``$JOURNAL_STREAM`` to ``device:inode`` of the stream it connected;
    the variable alone is not enough, since it is inherited by children whose stderr
    was redirected elsewhere (systemd.exec(5)).
    """
    value = environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep:
        return False
    try:
        expected = (int(device), int(inode))
        info = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        # ValueError also covers io.UnsupportedOperation: a stream with no file.
        return False
    return (info.st_dev, info.st_ino) == expected


class RedactingFilter(logging.Filter):
    """Replaces registered secrets and URL passwords in a record's message, traceback
    and stack.

    It rewrites the record itself, so that handlers after ours in the chain do not
    see the secret either (handlers before it, such as pytest's, still do).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:
            # A broken format string: leave it for the handler to report.
            return True
        cleaned = scrub(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


class LineFormatter(logging.Formatter):
    """Formats a record as one line, continuation lines indented under it.

    Given ``journal=True``, every line starts with the ``<N>`` priority and there is
    no timestamp; otherwise the first line reads ``YYYY-mm-dd HH:MM:SS LEVEL: ...``.
    """

    def __init__(self, journal: bool) -> None:
        if journal:
            super().__init__("%(message)s")
        else:
            super().__init__("%(asctime)s %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        lines = scrub(super().format(record)).splitlines() or [""]
        first, rest = lines[0], [_CONTINUATION_INDENT + line for line in lines[1:] if line]
        if not self.journal:
            return "\n".join([first, *rest])
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in [first, *rest])


def setup_logging(
    verbose: bool,
    environ: Mapping[str, str] | None = None,
    stream: TextIO | None = None,
) -> None:
    """Given the verbosity, send log records to stderr (or ``stream``) one line each.

    Levels: INFO, or DEBUG with ``verbose``. Calling it again (a reload, a test)
    replaces the handler installed before rather than adding a second one.
    """
    env = os.environ if environ is None else environ
    out = sys.stderr if stream is None else stream
    global _installed
    handler = logging.StreamHandler(out)
    handler.setFormatter(LineFormatter(journal=is_journal(out, env)))
    handler.addFilter(RedactingFilter())

    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    root.addHandler(handler)
    _installed = handler
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    # Python's warnings (a deprecation in a library) become log lines too,
    # instead of bare multi-line text on stderr.
    logging.captureWarnings(True)
