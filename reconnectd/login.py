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

Then the key goes into a file, mode 0600 from its first byte, and the config is
pointed at that file. The config is edited as text, line by line, so the user's
comments and layout survive; the edited text must parse to exactly the old document
with only that one setting changed, and must load with no problem the old file did
not have, before it replaces the old file. Otherwise the file is left alone and the
line to add is printed.

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

import copy
import enum
import errno
import http.cookiejar
import json
import os
import pwd
import re
import secrets
import shlex
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, Union
from urllib.parse import urljoin, urlsplit

import requests

from reconnectd.config import DEFAULT_URL, ConfigError, load_config
from reconnectd.octoprint_api import USER_AGENT, _connection_failure

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9 and 3.10 only
    import tomli as tomllib

APP_NAME = "reconnectd"
# The user the service runs as: it must be able to read the key file.
SERVICE_USER = "reconnectd"
KEY_FILE_NAME = "octoprint.key"

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
    """Given a URL from the command line, return what is wrong with it, or None."""
    try:
        parts = urlsplit(url)
        valid = (
            parts.scheme.lower() in ("http", "https")
            and bool(parts.hostname)
            and (parts.port is None or parts.port > 0)
            and not parts.query
            and not parts.fragment
            and not any(c.isspace() or not c.isprintable() for c in url)
        )
    except ValueError:
        valid = False
    if valid:
        return None
    return f'expected an http:// or https:// URL with a host like "{DEFAULT_URL}"'


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
    probe = send("GET", base + PROBE_PATH)
    if isinstance(probe, str):
        return LoginFailed(Failure.UNREACHABLE, f"cannot reach OctoPrint at {base}: {probe}")
    if probe.status_code >= 500:
        return LoginFailed(
            Failure.UNREACHABLE,
            f"OctoPrint at {base} answered HTTP {probe.status_code} (is it still starting?)",
        )
    if probe.status_code != 204:
        return LoginFailed(
            Failure.NO_WORKFLOW,
            f"OctoPrint at {base} does not offer the Application Keys workflow"
            f" (GET {PROBE_PATH} answered HTTP {probe.status_code}, not 204)",
        )

    body = {"app": APP_NAME}
    if user:
        body["user"] = user
    answer = send("POST", base + REQUEST_PATH, body)
    if isinstance(answer, str):
        return LoginFailed(Failure.UNREACHABLE, f"cannot reach OctoPrint at {base}: {answer}")
    status = answer.status_code
    if status == 429:
        return LoginFailed(
            Failure.REFUSED,
            f"OctoPrint at {base} refuses more key requests for now (it takes 3 a minute,"
            " 5 in ten minutes and 10 an hour); try again in a few minutes",
        )
    if status >= 500:
        return LoginFailed(
            Failure.UNREACHABLE, f"OctoPrint at {base} answered HTTP {status} to the key request"
        )
    if status == 404:
        return LoginFailed(
            Failure.NO_WORKFLOW,
            f"OctoPrint at {base} does not offer the Application Keys workflow"
            f" (POST {REQUEST_PATH} answered HTTP 404)",
        )
    poll_url = _poll_url(answer, base) if status == 201 else None
    if poll_url is None:
        detail = _message_of(answer)
        return LoginFailed(
            Failure.REFUSED,
            f"OctoPrint at {base} refused the key request: HTTP {status}"
            + (f": {detail}" if detail else ""),
        )

    whom = f'logged in as "{user}"' if user else "logged in as a user who may control the printer"
    print(f"Open OctoPrint at {base} in a browser, {whom}:", file=out)
    print(
        f'it asks whether "{APP_NAME}" may access it ("Access Request"). Click Allow.',
        file=out,
    )
    out.flush()
    return _await_decision(send, base, poll_url, out, pace)


def _await_decision(
    send: _Client, base: str, poll_url: str, out: TextIO, pace: Pacing
) -> LoginResult:
    deadline = pace.clock() + pace.timeout
    progress = _Progress(out, deadline)
    try:
        while True:
            answer = send("GET", poll_url)
            if isinstance(answer, str):
                return LoginFailed(
                    Failure.UNREACHABLE,
                    f"lost OctoPrint at {base} while waiting for the decision: {answer}",
                )
            status = answer.status_code
            if status == 200:
                key = _key_of(answer)
                if key is None:
                    return LoginFailed(
                        Failure.REFUSED,
                        f"OctoPrint at {base} approved the request but sent no usable key",
                    )
                progress.finish("approved.")
                return Granted(key)
            if status == 404:
                progress.finish("denied.")
                return LoginFailed(
                    Failure.DENIED,
                    f"the request was denied in OctoPrint at {base} (or OctoPrint dropped it:"
                    " it forgets a request after 10 minutes, and when it restarts)",
                )
            if status != 202:
                what = Failure.UNREACHABLE if status >= 500 else Failure.REFUSED
                return LoginFailed(
                    what, f"OctoPrint at {base} answered HTTP {status} while waiting"
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
            return _connection_failure(exc, self._ca_file)
        except requests.RequestException as exc:
            return f"request failed: {type(exc).__name__}"
        except OSError as exc:
            # requests raises a bare OSError for a CA bundle that is not there.
            return f"request failed: {exc}"


def _poll_url(answer: requests.Response, base: str) -> str | None:
    location = answer.headers.get("Location")
    if location:
        return urljoin(base + REQUEST_PATH, location)
    # OctoPrint always sends Location; the token in the body is the same endpoint.
    try:
        token = answer.json().get("app_token")
    except (ValueError, AttributeError):
        return None
    if isinstance(token, str) and re.fullmatch(r"[A-Za-z0-9_-]+", token):
        return f"{base}{REQUEST_PATH}/{token}"
    return None


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
    owner = _service_owner(service_user)
    temp = _write_temp(path, (key + "\n").encode(), 0o600, (owner[1], owner[2]) if owner else None)
    _replace(temp, path)
    return owner[0] if owner else None


def _service_owner(name: str | None) -> tuple[str, int, int] | None:
    if name is None or os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return entry.pw_name, entry.pw_uid, entry.pw_gid


def _write_temp(target: Path, data: bytes, mode: int, owner: tuple[int, int] | None) -> Path:
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


def _replace(temp: Path, target: Path) -> None:
    try:
        os.replace(temp, target)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    # The rename itself must reach the disk too, or a power cut can undo it.
    try:
        fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- the config ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigFile:
    """The config file as found: its text and document, or why it cannot be used.

    ``text`` is None when there is no file yet; ``document`` is None when there is
    no file or it is not TOML (``problem`` then says why).
    """

    path: Path
    text: str | None
    document: dict[str, Any] | None
    problem: str | None = None


@dataclass(frozen=True)
class Table:
    """The table of the config that says how to reach one OctoPrint.

    ``printer`` is the index of the ``[[printer]]`` whose ``[printer.octoprint]`` it
    is, or None for ``[octoprint]``; ``key_file`` the ``api_key_file`` it names now,
    ``credential`` its ``api_key_credential``, and ``ca_file`` the CA bundle that
    OctoPrint's https URL is verified against (its own or inherited).
    """

    printer: int | None
    name: str
    key_file: Path | None = None
    has_inline_key: bool = False
    credential: str | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class NoTable:
    """No single table of the config can be pointed at the key: why, and what to add."""

    reason: str
    advice: str


@dataclass(frozen=True)
class ConfigOutcome:
    """What became of the config, and a message saying so.

    ``ok``: the config reads the key from where it was stored, or needs nothing
    done; else the message says which line to add where.
    """

    ok: bool
    message: str


def read_config(path: Path) -> ConfigFile:
    """Given the config path, return the file's text and document (or why not).

    Never raises: a missing file is ``text`` None, anything else a ``problem``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ConfigFile(path, None, None)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ConfigFile(path, None, None, f"{path}: cannot read the file: {reason}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return ConfigFile(path, None, None, f"{path}: not UTF-8 text")
    try:
        document = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        return ConfigFile(path, text, None, f"{path}: not valid TOML: {exc}")
    return ConfigFile(path, text, document)


def configured_url(config: ConfigFile) -> str:
    """Given the config file, return the URL of its ``[octoprint]`` (the default if unset)."""
    shared = (config.document or {}).get("octoprint")
    url = shared.get("url") if isinstance(shared, dict) else None
    return url.rstrip("/") if isinstance(url, str) else DEFAULT_URL


def find_table(config: ConfigFile, url: str) -> Table | NoTable:
    """Given the config file and a URL, return the one table to point at the key.

    That is ``[octoprint]`` when the URL is its URL (or there is no file yet), else
    the one ``[printer.octoprint]`` whose ``url`` it is. Return :class:`NoTable` if
    the file cannot be read, or no table or several tables have that URL.
    """
    path = config.path
    line_for_shared = f"in the [octoprint] table of {path}"
    if config.problem is not None:
        return NoTable(config.problem, line_for_shared)
    document = config.document
    if document is None:
        return Table(None, "[octoprint]")
    shared = document.get("octoprint", {})
    if not isinstance(shared, dict):
        return NoTable(f"{path}: octoprint is not a table", line_for_shared)
    if _same_url(url, configured_url(config)):
        return _table(config, None, "[octoprint]", shared, shared)
    matches: list[tuple[int, str, dict[str, Any]]] = []
    printers = document.get("printer", [])
    for index, printer in enumerate(printers if isinstance(printers, list) else []):
        own = printer.get("octoprint") if isinstance(printer, dict) else None
        if isinstance(own, dict) and isinstance(own.get("url"), str) and _same_url(url, own["url"]):
            name = printer.get("name")
            matches.append((index, name if isinstance(name, str) else f"#{index + 1}", own))
    advice = (
        f"in the [printer.octoprint] table of the printer that uses this OctoPrint in {path}"
        f" (with url = {_toml_string(url)})"
    )
    if not matches:
        return NoTable(
            f"no table of {path} has url = {_toml_string(url)}"
            f" ([octoprint] has {_toml_string(configured_url(config))})",
            advice,
        )
    if len(matches) > 1:
        names = ", ".join(f'"{name}"' for _, name, _ in matches)
        return NoTable(
            f"several [printer.octoprint] tables of {path} have url = {_toml_string(url)}"
            f" (printers {names})",
            f"in each of those tables in {path}",
        )
    index, name, own = matches[0]
    return _table(config, index, f'[printer.octoprint] of printer "{name}"', own, shared)


def _table(
    config: ConfigFile,
    printer: int | None,
    name: str,
    table: dict[str, Any],
    shared: dict[str, Any],
) -> Table:
    credential = table.get("api_key_credential")
    ca_file = table.get("ca_file", shared.get("ca_file"))
    return Table(
        printer,
        name,
        key_file=_named_file(config, table.get("api_key_file")),
        has_inline_key="api_key" in table,
        credential=credential if isinstance(credential, str) else None,
        ca_file=_named_file(config, ca_file),
    )


def default_key_file(config: ConfigFile, table: Table | NoTable, url: str) -> Path:
    """Given the config, its table for the URL and the URL, return where the key goes.

    The file the table names already; else ``octoprint.key`` beside the config for
    ``[octoprint]``, ``NAME.key`` for a printer's own OctoPrint (never the shared
    file: that holds another OctoPrint's key), and for a URL no table names,
    ``octoprint.key`` unless a table uses that file already.
    """
    directory = Path(os.path.abspath(config.path)).parent
    if isinstance(table, Table):
        if table.key_file is not None:
            return table.key_file
        if table.printer is None:
            return directory / KEY_FILE_NAME
        name = _printer_name(config, table.printer)
        return directory / f"{name}.key"
    shared = directory / KEY_FILE_NAME
    if shared not in _all_key_files(config):
        return shared
    port = urlsplit(url).port or (443 if url.lower().startswith("https:") else 80)
    return directory / f"octoprint-{port}.key"


def point_config(
    config: ConfigFile, table: Table | NoTable, key_file: Path, url: str
) -> ConfigOutcome:
    """Given the config, the table for the URL and the stored key file, point the config at it.

    Edit the text line by line (comments survive), check that it parses to the old
    document with only ``api_key_file`` set (and an inline ``api_key`` gone) in that
    table, write it beside the config with the old mode and owner, load it with the
    daemon's loader, and replace the config only if it has no problem the old file
    did not have. A missing file is created. Return what was done, or why nothing was
    and the exact line to add where: never raises for the file's content.
    """
    line = f"api_key_file = {_toml_string(str(key_file))}"
    if isinstance(table, NoTable):
        return ConfigOutcome(
            False,
            f"{config.path} was not changed: {table.reason}.\n"
            f"To use the key, add this line {table.advice}:\n    {line}",
        )
    manual = (
        f"To use the key, add this line to the {table.name} table of {config.path}"
        + (" (and remove its api_key line)" if table.has_inline_key else "")
        + f":\n    {line}"
    )
    unsafe = (
        f"{config.path} was not changed: its {table.name} table is not written in a way"
        f" this command can edit safely.\n{manual}"
    )
    if table.credential is not None:
        # The key reaches the daemon through systemd, from whatever file the unit's
        # LoadCredential= names: pointing the config elsewhere would bypass that.
        return ConfigOutcome(
            True,
            f"{config.path} was left as it is: its {table.name} table reads the key from"
            f' the systemd credential "{table.credential}". The unit needs'
            f" LoadCredential={table.credential}:{key_file} (systemctl edit reconnectd),"
            " then a restart.",
        )
    if table.key_file == key_file and not table.has_inline_key:
        return ConfigOutcome(True, f"{config.path} already reads the key from {key_file}.")
    if config.text is None:
        new_text = (
            "# reconnectd configuration, written by reconnectd login.\n"
            "# The commented example: reconnectd/example.toml in the package.\n\n"
            f"[octoprint]\nurl = {_toml_string(url)}\n{line}\n"
        )
        expected: dict[str, Any] = {"octoprint": {"url": url, "api_key_file": str(key_file)}}
    else:
        assert config.document is not None
        edited = edit_text(config.text, table.printer, str(key_file))
        expected = _expected_document(config.document, table.printer, str(key_file))
        if edited is None:
            return ConfigOutcome(False, unsafe)
        new_text = edited
    try:
        parsed = tomllib.loads(new_text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        parsed = None
    if parsed != expected:
        return ConfigOutcome(False, unsafe)
    return _replace_config(config, new_text, manual, table)


def manual_steps(key_file: Path, table: Table | NoTable, config_path: Path) -> str:
    """Given where the key goes, return how to copy a key from OctoPrint by hand."""
    quoted = shlex.quote(str(key_file))
    steps = [
        f"Copy a key by hand instead: in OctoPrint open {MANUAL_PLACE}, generate a key"
        f' for "{APP_NAME}" and copy it. Then write it to the key file with',
        f"    sudo sh -c {shlex.quote(f'umask 077 && cat > {quoted}')}",
        "paste the key, press Enter and then Ctrl-D.",
    ]
    if _service_owner(SERVICE_USER) is not None:
        steps.append(f"Let the service read it: sudo chown {SERVICE_USER}: {quoted}")
    where = table.name if isinstance(table, Table) else "[octoprint]"
    steps.append(
        f"Point the config at it: api_key_file = {_toml_string(str(key_file))}"
        f" in the {where} table of {config_path}."
    )
    return "\n".join(steps)


def _replace_config(config: ConfigFile, new_text: str, manual: str, table: Table) -> ConfigOutcome:
    path = config.path
    real = Path(os.path.realpath(path))
    try:
        if config.text is None:
            real.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            mode, owner = 0o644, None
        else:
            info = real.stat()
            mode = info.st_mode & 0o7777
            same = info.st_uid == os.geteuid() and info.st_gid == os.getegid()
            owner = None if same else (info.st_uid, info.st_gid)
        temp = _write_temp(real, new_text.encode(), mode, owner)
    except OSError as exc:
        return ConfigOutcome(False, f"{path} was not changed: {_os_reason(exc)}.\n{manual}")
    try:
        after = _problems(temp, real)
        before = [] if config.text is None else _problems(real, real)
        new_problems = [p for p in after if p not in before]
        if new_problems:
            temp.unlink(missing_ok=True)
            shown = "\n".join(f"    {p}" for p in new_problems)
            return ConfigOutcome(
                False,
                f"{path} was not changed: the edited file would not load:\n{shown}\n{manual}",
            )
        _replace(temp, real)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        return ConfigOutcome(False, f"{path} was not changed: {_os_reason(exc)}.\n{manual}")
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    verb = "Wrote" if config.text is None else "Updated"
    removed = " (its api_key line is gone)" if table.has_inline_key else ""
    message = f"{verb} {path}: the {table.name} table reads the key from the file{removed}."
    if after:
        message += f"\n{path} still has other problems; reconnectd check lists them."
    return ConfigOutcome(True, message)


def _problems(file: Path, shown_as: Path) -> list[str]:
    """Given a config file, return its problems as for ``shown_as`` (empty: it loads)."""
    try:
        load_config(str(file), {})
    except ConfigError as error:
        prefix, shown = f"{file}:", f"{shown_as}:"
        return [shown + p[len(prefix) :] if p.startswith(prefix) else p for p in error.problems]
    return []


def _os_reason(exc: OSError) -> str:
    if exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or errno.errorcode.get(exc.errno or 0, "error")


def _expected_document(
    document: dict[str, Any], printer: int | None, key_file: str
) -> dict[str, Any]:
    expected = copy.deepcopy(document)
    if printer is None:
        table = expected.setdefault("octoprint", {})
    else:
        table = expected["printer"][printer]["octoprint"]
    table.pop("api_key", None)
    table["api_key_file"] = key_file
    return expected


# -- editing TOML as text ----------------------------------------------------------

_HEADER = re.compile(r"^[ \t]*(\[\[?)[ \t]*([^\[\]#]+?)[ \t]*(\]\]?)[ \t]*(?:#.*)?$")
_COMMENTED_HEADER = re.compile(r"^[ \t]*#[ \t]*\[")
_KEY_LINE = r"^[ \t]*{}[ \t]*="
# A key, a one-line string value and what follows it: the comment to keep.
_STRING_VALUE = re.compile(r"""^[ \t]*[A-Za-z_]+[ \t]*=[ \t]*(?:"(?:[^"\\]|\\.)*"|'[^']*')(.*)$""")


def edit_text(text: str, printer: int | None, key_file: str) -> str | None:
    """Given config text, set ``api_key_file`` in one table and drop its ``api_key`` line.

    ``printer`` None means ``[octoprint]`` (appended if the file has none), else the
    ``[printer.octoprint]`` of that ``[[printer]]``. An existing ``api_key_file`` or
    ``api_key`` line is replaced in place, keeping its comment; otherwise the line
    goes after a commented-out ``#api_key_file`` example, after ``url``, or after
    the header. Return None if the table's header cannot be found (an inline table,
    dotted keys): the caller then checks the result by parsing it anyway.
    """
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if "\r\n" in text else "\n"
    headers = _headers(lines)
    body = _table_body(headers, len(lines), printer)
    setting = f"api_key_file = {_toml_string(key_file)}"
    if body is None:
        if printer is not None or any(name == "octoprint" for _, _, name in headers):
            return None
        if lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += newline
        gap = [newline] if lines else []
        return "".join([*lines, *gap, f"[octoprint]{newline}", f"{setting}{newline}"])
    start, end = body
    file_at = _find(lines, start, end, "api_key_file")
    key_at = _find(lines, start, end, "api_key")
    if file_at is not None or key_at is not None:
        at = file_at if file_at is not None else key_at
        assert at is not None
        lines[at] = _rewritten(lines[at], setting, newline)
        if file_at is not None and key_at is not None:
            del lines[key_at]
        return "".join(lines)
    at = _insertion_point(lines, start, end)
    indent = _indent(lines[at - 1]) if at > start else ""
    lines.insert(at, f"{indent}{setting}{newline}")
    if at > 0 and not lines[at - 1].endswith(("\n", "\r")):
        lines[at - 1] += newline
    return "".join(lines)


def _headers(lines: list[str]) -> list[tuple[int, bool, str]]:
    """Given the lines, return each table header: line index, whether [[array]], name."""
    found = []
    for index, line in enumerate(lines):
        match = _HEADER.match(line.rstrip("\r\n"))
        if match and (match[1] == "[[") == (match[3] == "]]"):
            parts = [part.strip().strip("\"'") for part in match[2].split(".")]
            found.append((index, match[1] == "[[", ".".join(parts)))
    return found


def _table_body(
    headers: list[tuple[int, bool, str]], count: int, printer: int | None
) -> tuple[int, int] | None:
    """Given the headers, return the line range of the table's keys, or None if absent."""
    wanted: int | None = None
    if printer is None:
        wanted = next(
            (i for i, (_, array, name) in enumerate(headers) if not array and name == "octoprint"),
            None,
        )
    else:
        arrays = [i for i, (_, array, name) in enumerate(headers) if array and name == "printer"]
        if printer >= len(arrays):
            return None
        for i in range(arrays[printer] + 1, len(headers)):
            _, array, name = headers[i]
            if array or not name.startswith("printer."):
                break
            if name == "printer.octoprint":
                wanted = i
                break
    if wanted is None:
        return None
    end = headers[wanted + 1][0] if wanted + 1 < len(headers) else count
    return headers[wanted][0] + 1, end


def _find(lines: list[str], start: int, end: int, key: str) -> int | None:
    pattern = re.compile(_KEY_LINE.format(re.escape(key)))
    return next((i for i in range(start, end) if pattern.match(lines[i])), None)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _rewritten(line: str, setting: str, newline: str) -> str:
    indent = _indent(line)
    match = _STRING_VALUE.match(line.rstrip("\r\n"))
    rest = match[1] if match and re.fullmatch(r"[ \t]*(#.*)?", match[1]) else ""
    return f"{indent}{setting}{rest.rstrip()}{newline}"


def _insertion_point(lines: list[str], start: int, end: int) -> int:
    """Given a table's line range, return where a new key line reads best."""
    example = re.compile(r"^[ \t]*#[ \t]*api_key_file[ \t]*=")
    for i in range(start, end):
        if _COMMENTED_HEADER.match(lines[i]):
            break
        if example.match(lines[i]):
            return i + 1
    url_at = _find(lines, start, end, "url")
    if url_at is not None:
        return url_at + 1
    return start


def _toml_string(text: str) -> str:
    # A JSON string is a TOML basic string, except for the few escapes JSON writes
    # as \u for non-ASCII when asked, and DEL, which TOML wants escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _same_url(a: str, b: str) -> bool:
    return _normal_url(a) == _normal_url(b)


def _normal_url(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def _named_file(config: ConfigFile, value: object) -> Path | None:
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    file = Path(value)
    if not file.is_absolute():
        file = Path(os.path.abspath(config.path)).parent / file
    return Path(os.path.abspath(file))


def _all_key_files(config: ConfigFile) -> set[Path]:
    document = config.document or {}
    tables = [document.get("octoprint")]
    printers = document.get("printer")
    for printer in printers if isinstance(printers, list) else []:
        tables.append(printer.get("octoprint") if isinstance(printer, dict) else None)
    files = {_named_file(config, t.get("api_key_file")) for t in tables if isinstance(t, dict)}
    return {f for f in files if f is not None}


def _printer_name(config: ConfigFile, index: int) -> str:
    printer = (config.document or {})["printer"][index]
    name = printer.get("name")
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        return name
    return f"printer{index + 1}"
