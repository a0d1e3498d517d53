"""``reconnectd login``: get an API key through OctoPrint's Application Keys workflow.

The workflow (OctoPrint's bundled ``appkeys`` plugin, 1.3.10 and later) lets a person
grant a key in the web UI instead of copying it by hand. Checked against 1.11.8:

1. ``GET /plugin/appkeys/probe`` answers 204 when the workflow is there;
2. ``POST /plugin/appkeys/request {"app": "reconnectd"}`` answers 201, with the URL
   to poll in ``Location``; OctoPrint accepts 3 such requests a minute, 5 in ten
   minutes and 10 an hour from one address, then answers 429;
3. that URL answers 202 while nobody has decided, 200 with ``api_key`` once a user
   clicked Allow, and 404 once the request was denied or dropped. OctoPrint drops a
   request that is not polled for 5 s or that is older than 10 minutes.

Then the key goes into a file, mode 0600 from its first byte, and
:mod:`reconnectd.config_edit` points the config at that file.

What the command answers, as ``cli.py`` maps :class:`Failure` to exit codes:

- OctoPrint unreachable: 69 (EX_UNAVAILABLE), naming the URL and the reason.
- No workflow (the probe does not answer 204: the plugin is disabled, or something
  else answers at the URL): 69, as a service the command needs is not there, with
  how to copy a key by hand instead. Too many requests (HTTP 429) and any other
  refusal of the request: 69 too; trying again later can work.
- Denied: 77 (EX_NOPERM).
- No decision within :data:`DECISION_TIMEOUT`: 77 as well. No permission was
  granted, and OctoPrint answers a request it dropped on its own timeout exactly as
  one that was denied, so the two cannot be told apart anyway.
- Ctrl-C: 130, the shell's code for an interrupted command.
- The key file cannot be written: 73 (EX_CANTCREAT).

The key is never printed, logged or put in a message.
"""

from __future__ import annotations

import enum
import http.cookiejar
import json
import os
import pwd
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO, Union
from urllib.parse import urljoin, urlsplit, urlunsplit

import requests

from reconnectd.config import DEFAULT_URL
from reconnectd.http_transport import USER_AGENT, connection_failure
from reconnectd.jsonfiles import fsync_directory
from reconnectd.urls import instance_of, shown_url, url_problem

APP_NAME = "reconnectd"
# The user the service runs as: it must be able to read the key file.
SERVICE_USER = "reconnectd"

PROBE_PATH = "/plugin/appkeys/probe"
REQUEST_PATH = "/plugin/appkeys/request"

# Seconds for each HTTP request, to connect and between bytes of the answer. No
# longer is useful: a poll that waits more than OctoPrint's 5 s poll timeout finds
# the request dropped anyway.
HTTP_TIMEOUT = 5.0
# OctoPrint drops a request that is not polled for 5 s: once a second leaves room.
POLL_INTERVAL = 1.0
# Long enough to open a browser and log in; OctoPrint itself gives up after 10 min.
DECISION_TIMEOUT = 300.0
# Without a terminal to redraw a line in, say that we still wait this often.
PROGRESS_EVERY = 30.0

MANUAL_PLACE = "User Settings > Application Keys"


class Failure(enum.Enum):
    """Why no key was obtained; ``cli.py`` gives each its exit code."""

    UNREACHABLE = "unreachable"
    NO_WORKFLOW = "no workflow"
    REFUSED = "refused"
    DENIED = "denied"
    TIMED_OUT = "timed out"


@dataclass(frozen=True)
class LoginFailed:
    """The workflow ended without a key: why, and a message for the user."""

    kind: Failure
    message: str


@dataclass(frozen=True)
class Granted:
    """The workflow ended with a key (left out of ``repr``)."""

    api_key: str = field(repr=False)


@dataclass(frozen=True)
class Pacing:
    """The clock and the sleep of the polling loop, and how long it waits.

    ``cli.py`` uses :data:`PACING`; tests put a fake clock and sleep there so that
    a timeout needs no real time.
    """

    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    timeout: float = DECISION_TIMEOUT
    interval: float = POLL_INTERVAL


PACING = Pacing()

LoginResult = Union[Granted, LoginFailed]


# -- the workflow ------------------------------------------------------------------


def check_url(url: str) -> str | None:
    """Given a URL from the command line or the config, return what is wrong with it
    (as the config's checks say it, the URL shown with its password masked), or None."""
    problem = url_problem(url, DEFAULT_URL)
    if problem is None:
        return None
    if problem.startswith("expected"):
        return problem
    return f"{problem}, got {json.dumps(shown_url(url), ensure_ascii=False)}"


def request_api_key(
    url: str,
    out: TextIO,
    *,
    user: str | None = None,
    ca_file: Path | None = None,
    session: requests.Session | None = None,
    pacing: Pacing | None = None,
) -> LoginResult:
    """Given OctoPrint's URL, run the Application Keys workflow and return its outcome.

    Tells the user on ``out`` what to do and how long is left. ``user`` asks for a
    key of that OctoPrint user only (only they can approve it). An https URL is
    verified against ``ca_file`` if given, else the system's CAs. Return
    :class:`Granted` with the key, or :class:`LoginFailed` saying why there is none.
    A KeyboardInterrupt passes through; OctoPrint drops the request 5 s later.
    """
    pace = pacing if pacing is not None else PACING
    base = url.rstrip("/")
    own_session = session is None
    client = requests.Session() if session is None else session
    client.headers["User-Agent"] = USER_AGENT
    # OctoPrint sets a session cookie; nothing here needs it.
    client.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    try:
        return _workflow(_Client(client, ca_file), base, out, user, pace)
    finally:
        if own_session:
            client.close()


def _workflow(send: _Client, base: str, out: TextIO, user: str | None, pace: Pacing) -> LoginResult:
    shown = shown_url(base)  # a password in the URL is never printed
    probe = send("GET", base + PROBE_PATH)
    if isinstance(probe, str):
        return LoginFailed(Failure.UNREACHABLE, f"cannot reach OctoPrint at {shown}: {probe}")
    if probe.status_code >= 500:
        return LoginFailed(
            Failure.UNREACHABLE,
            f"OctoPrint at {shown} answered HTTP {probe.status_code} (is it still starting?)",
        )
    if probe.status_code != 204:
        return LoginFailed(
            Failure.NO_WORKFLOW,
            f"OctoPrint at {shown} does not offer the Application Keys workflow"
            f" (GET {PROBE_PATH} answered HTTP {probe.status_code}, not 204)",
        )

    body = {"app": APP_NAME}
    if user:
        body["user"] = user
    answer = send("POST", base + REQUEST_PATH, body)
    if isinstance(answer, str):
        return LoginFailed(Failure.UNREACHABLE, f"cannot reach OctoPrint at {shown}: {answer}")
    status = answer.status_code
    if status == 429:
        return LoginFailed(
            Failure.REFUSED,
            f"OctoPrint at {shown} refuses more key requests for now (it takes 3 a minute,"
            " 5 in ten minutes and 10 an hour); try again in a few minutes",
        )
    if status >= 500:
        return LoginFailed(
            Failure.UNREACHABLE, f"OctoPrint at {shown} answered HTTP {status} to the key request"
        )
    if status == 404:
        return LoginFailed(
            Failure.NO_WORKFLOW,
            f"OctoPrint at {shown} does not offer the Application Keys workflow"
            f" (POST {REQUEST_PATH} answered HTTP 404)",
        )
    poll_url = _poll_url(answer, base) if status == 201 else None
    if poll_url is None:
        detail = _message_of(answer)
        return LoginFailed(
            Failure.REFUSED,
            f"OctoPrint at {shown} refused the key request: HTTP {status}"
            + (f": {detail}" if detail else ""),
        )

    whom = f'logged in as "{user}"' if user else "logged in as a user who may control the printer"
    print(f"Open OctoPrint at {shown} in a browser, {whom}:", file=out)
    print(
        f'it asks whether "{APP_NAME}" may access it ("Access Request"). Click Allow.',
        file=out,
    )
    out.flush()
    return _await_decision(send, base, poll_url, out, pace)


def _await_decision(
    send: _Client, base: str, poll_url: str, out: TextIO, pace: Pacing
) -> LoginResult:
    shown = shown_url(base)
    deadline = pace.clock() + pace.timeout
    progress = _Progress(out, deadline)
    try:
        while True:
            answer = send("GET", poll_url)
            if isinstance(answer, str):
                return LoginFailed(
                    Failure.UNREACHABLE,
                    f"lost OctoPrint at {shown} while waiting for the decision: {answer}",
                )
            status = answer.status_code
            if status == 200:
                key = _key_of(answer)
                if key is None:
                    return LoginFailed(
                        Failure.REFUSED,
                        f"OctoPrint at {shown} approved the request but sent no usable key",
                    )
                progress.finish("approved.")
                return Granted(key)
            if status == 404:
                progress.finish("denied.")
                return LoginFailed(
                    Failure.DENIED,
                    f"the request was denied in OctoPrint at {shown} (or OctoPrint dropped it:"
                    " it forgets a request after 10 minutes, and when it restarts)",
                )
            if status != 202:
                what = Failure.UNREACHABLE if status >= 500 else Failure.REFUSED
                return LoginFailed(
                    what, f"OctoPrint at {shown} answered HTTP {status} while waiting"
                )
            now = pace.clock()
            if now >= deadline:
                progress.finish("no decision.")
                return LoginFailed(
                    Failure.TIMED_OUT,
                    f"no decision within {_duration(pace.timeout)}; the request is withdrawn."
                    " Run reconnectd login again when you can approve it",
                )
            progress.waiting(now)
            pace.sleep(min(pace.interval, deadline - now))
    finally:
        progress.finish("stopped.")


class _Client:
    """Sends one request with a timeout; the answer, or why there is none in words."""

    def __init__(self, session: requests.Session, ca_file: Path | None) -> None:
        self._session = session
        self._ca_file = None if ca_file is None else str(ca_file)
        # Given with every request: the session's value loses to $REQUESTS_CA_BUNDLE.
        self._verify: str | bool = True if self._ca_file is None else self._ca_file

    def __call__(
        self, method: str, url: str, body: dict[str, str] | None = None
    ) -> requests.Response | str:
        try:
            return self._session.request(
                method,
                url,
                json=body,
                timeout=(HTTP_TIMEOUT, HTTP_TIMEOUT),
                allow_redirects=False,
                verify=self._verify,
            )
        except requests.Timeout:
            return f"no answer within {HTTP_TIMEOUT:g} s"
        except requests.ConnectionError as exc:
            return connection_failure(exc, self._ca_file)
        except requests.RequestException as exc:
            return f"request failed: {type(exc).__name__}"
        except OSError as exc:
            # requests raises a bare OSError for a CA bundle that is not there.
            return f"request failed: {exc}"


def _poll_url(answer: requests.Response, base: str) -> str | None:
    location = answer.headers.get("Location")
    if location:
        return _with_credentials(urljoin(base + REQUEST_PATH, location), base)
    # OctoPrint always sends Location; the token in the body is the same endpoint.
    try:
        token = answer.json().get("app_token")
    except (ValueError, AttributeError):
        return None
    if isinstance(token, str) and re.fullmatch(r"[A-Za-z0-9_-]+", token):
        return f"{base}{REQUEST_PATH}/{token}"
    return None


def _with_credentials(url: str, base: str) -> str:
    """Given the URL OctoPrint says to poll and the one it was reached at, return the
    poll URL with the user name and password of ``base`` when both name one server.

    OctoPrint writes an absolute ``Location`` without them (its own idea of its URL),
    and the proxy in front of it would answer every poll 401; any other server is not
    given them.
    """
    poll, reached = urlsplit(url), urlsplit(base)
    if "@" in poll.netloc or "@" not in reached.netloc:
        return url
    if instance_of(f"{poll.scheme}://{poll.netloc}") != instance_of(
        f"{reached.scheme}://{reached.netloc}"
    ):
        return url
    return urlunsplit(poll._replace(netloc=reached.netloc))


def _key_of(answer: requests.Response) -> str | None:
    try:
        body = answer.json()
    except ValueError:
        return None
    key = body.get("api_key") if isinstance(body, dict) else None
    if not isinstance(key, str):
        return None
    key = key.strip()
    # It goes into an HTTP header and a one-line file.
    if not key or any(c.isspace() or not c.isprintable() for c in key):
        return None
    return key


def _message_of(answer: requests.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        return ""
    message = body.get("error") if isinstance(body, dict) else None
    return " ".join(message.split())[:200] if isinstance(message, str) else ""


def _duration(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        minutes = int(seconds // 60)
        return f"{minutes} minute{'s' if minutes != 1 else ''}"
    return f"{seconds:g} s"


class _Progress:
    """A line saying how long is left: redrawn in place on a terminal, else every 30 s."""

    def __init__(self, out: TextIO, deadline: float) -> None:
        self._out = out
        self._deadline = deadline
        self._tty = _isatty(out)
        self._drawn = 0  # the length of the line on screen
        self._next_line: float | None = None

    def waiting(self, now: float) -> None:
        left = max(0, int(self._deadline - now + 0.5))
        text = f"Waiting for the decision: {left // 60}:{left % 60:02d} left"
        if self._tty:
            self._out.write(f"\r{text} ")
            self._drawn = len(text) + 1
        elif self._next_line is None or now >= self._next_line:
            self._out.write(f"{text}\n")
            self._next_line = now + PROGRESS_EVERY
        self._out.flush()

    def finish(self, outcome: str) -> None:
        if self._drawn:
            # Padded to cover what the longer line before it left on screen.
            self._out.write(f"\r{f'Waiting for the decision: {outcome}':{self._drawn}}\n")
            self._out.flush()
            self._drawn = 0


def _isatty(out: TextIO) -> bool:
    try:
        return out.isatty()
    except (AttributeError, ValueError):
        return False


# -- the key file ----------------------------------------------------------------


def key_file_problem(path: Path) -> str | None:
    """Given where the key is to go, return why it cannot be written there, or None.

    Checked before OctoPrint is asked, so nobody approves a key that is then lost.
    """
    if path.is_dir():
        return f'cannot write the key to "{path}": it is a directory'
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f'cannot write the key to "{path}": {existing} is not a directory'
    if not os.access(existing, os.W_OK | os.X_OK):
        return (
            f'cannot write the key to "{path}": {existing} is not writable'
            " (run it as root: sudo reconnectd login)"
        )
    return None


def store_key(path: Path, key: str, service_user: str | None = SERVICE_USER) -> str | None:
    """Given a path and a key, write the key there (mode 0600) and return the file's new owner.

    The file is created with mode 0600 under a temporary name in the same directory,
    synced, and renamed over ``path``: no moment exists in which others could read it,
    and a reader never sees half a key. When run as root and ``service_user`` exists,
    the file is given to that user (the service runs as it) and its name is returned;
    otherwise None. Missing directories are created (mode 0755). Raise OSError if the
    file cannot be written.
    """
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    owner = service_owner(service_user)
    temp = write_temp(path, (key + "\n").encode(), 0o600, (owner[1], owner[2]) if owner else None)
    replace_atomically(temp, path)
    return owner[0] if owner else None


def service_owner(name: str | None) -> tuple[str, int, int] | None:
    if name is None or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def write_temp(target: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> Path:
    """Given a target, write ``data`` to a new file beside it and return that file's path.

    The file is created with ``mode`` (0600 at most until chmod, whatever the umask) and
    ``owner`` set before a byte is written, then synced. Raise OSError on failure, with
    the temporary file removed.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    while True:
        temp = target.parent / f".{target.name}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(temp, flags, mode & 0o600)
        except FileExistsError:
            continue
        break
    try:
        try:
            if owner is not None:
                os.fchown(fd, owner[0], owner[1])
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def replace_atomically(temp: Path, target: Path) -> None:
    try:
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too, or a power cut can undo it.
    fsync_directory(target.parent)
