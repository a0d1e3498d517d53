"""A lightweight OctoPrint 1.x for tests that need many of them: the connection API only.

:class:`FakeOctoPrint` is a real HTTP server on 127.0.0.1 that answers
``GET /api/connection``, ``GET /api/job`` and ``POST /api/connection`` the way
OctoPrint 1.11.8 does, with the same status codes and error texts. It never opens
a serial port: which ports exist comes from ``ports()``, and whether a printer
answers on a port from ``printer_present(port)``. ``tests/test_fake_octoprint.py``
runs one script against both this and a real OctoPrint and compares what each
showed; a difference in OctoPrint shows up there.

What it copies from OctoPrint:

- A bad or missing key is anonymous: 403 on GET; 400 ``CSRF validation failed``
  on POST (the CSRF check runs before the permission check).
- POST needs ``Content-Type: application/json`` (else 415), a known ``command``,
  and a ``port`` from the list (or ``AUTO``) and a ``baudrate`` from the list (or 0).
- Success is always 204; a connect while any connection exists is ignored.
- A connect goes ``Opening serial connection`` -> ``Connecting`` -> ``Operational``
  when the printer answers; when it does not, ``Connecting`` until the timeout,
  then ``Closed`` with job ``Offline`` and no error. Without a baudrate (as
  reconnectd sends it) OctoPrint detects it: ``Detecting serial connection`` ->
  ``Operational``, or, when nothing answers, ``Closed`` with job ``Offline after
  error`` and the autodetection error.
- A connection whose device goes away (``printer_present`` answers None, or names
  another device: a replugged printer gets a new node) closes with job
  ``Offline after error`` and a ``SerialException``; the error stays, even across a
  Disconnect, until the next connect.
- ``/api/job`` says ``Offline`` / ``Offline after error`` where ``/api/connection``
  says ``Closed``, and the connection's state otherwise.

States are computed from the clock when asked for, so no thread runs behind the
server's back; every POST is recorded in :attr:`FakeOctoPrint.posts`.

Faults for tests of what reconnectd does when OctoPrint misbehaves
(:meth:`FakeOctoPrint.set_fault`): refusing connections (stopped), answering 500,
answering an HTML page instead of JSON (a proxy or a login page in front of it),
answering later than the client waits. A revoked key needs no fault: give the fake
another ``api_key`` and it answers the old one as the real OctoPrint does.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlsplit

OPENING = "Opening serial connection"
DETECTING = "Detecting serial connection"
CONNECTING = "Connecting"
OPERATIONAL = "Operational"
CLOSED = "Closed"
OFFLINE = "Offline"
OFFLINE_AFTER_ERROR = "Offline after error"
# What OctoPrint 1.11.8 says when the device of an open connection vanishes.
VANISHED_ERROR = (
    "SerialException: device reports readiness to read but returned no data "
    "(device disconnected or multiple access on port?)"
)
FORBIDDEN = (
    "You don't have the permission to access the requested resource. "
    "It is either read-protected or not readable by the server."
)
NOT_JSON = (
    "Did not attempt to load JSON data because the request Content-Type was not 'application/json'."
)
# How a connect without a baudrate ends when nothing answers (util/comm.py; after
# trying every baudrate, ~40 s on the real one with the tests' timeouts).
AUTODETECT_ERROR = "No more candidates to test, and no working port/baudrate combination detected."
BAUDRATES = (250000, 230400, 115200, 57600, 38400, 19200, 9600)

# The faults set_fault() knows.
FAULT_REFUSE = "refuse"  # nothing listens on the port: OctoPrint stopped or restarting
FAULT_500 = "500"  # every request fails inside the server
FAULT_HTML = "html"  # a 200 HTML page where the API's JSON should be
FAULT_SLOW = "slow"  # every answer comes slow_by seconds late, then as usual
FAULTS = (FAULT_REFUSE, FAULT_500, FAULT_HTML, FAULT_SLOW)
# What a web server says for an internal error: an HTML page, not the API's JSON.
ERROR_PAGE = (
    "<!doctype html>\n<html><head><title>500 Internal Server Error</title></head>"
    "<body><h1>Internal Server Error</h1><p>The server could not complete the "
    "request.</p></body></html>\n"
)
# A page in front of the API: a reverse proxy's sign-in page, a captive portal.
SIGN_IN_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Sign in</title></head><body>"
    '<form method="post" action="/login"><input name="user"><input name="password" '
    'type="password"><button>Sign in</button></form></body></html>\n'
)

PortsFunction = Callable[[], Sequence[str]]
# Given a port, the device that answers there now (any text naming it), or None.
PresenceFunction = Callable[[str], Optional[str]]


@dataclass(frozen=True)
class Post:
    """One ``POST /api/connection`` as received: what, where, when, and the answer."""

    command: str | None
    port: str | None
    at: float  # time.monotonic() when it arrived
    status: int
    ignored: bool = False  # a connect accepted (204) while a connection existed


@dataclass
class _Connection:
    port: str
    baudrate: int | None
    since: float
    device: str | None = None  # set once the firmware answered
    detecting: bool = False  # no baudrate given: OctoPrint tries them all
    operational_at: float | None = None


class FakeOctoPrint:
    """A fake OctoPrint's connection API on a free loopback port; a context manager.

    ``handshake`` is the time from a connect to ``Operational`` (of which the first
    ``opening`` seconds show ``Opening serial connection``); ``silent_timeout`` the
    time from a connect to ``Closed`` when no firmware answers.
    """

    def __init__(
        self,
        ports: PortsFunction,
        printer_present: PresenceFunction,
        *,
        api_key: str | None = None,
        opening: float = 0.02,
        handshake: float = 0.1,
        silent_timeout: float = 4.0,
    ) -> None:
        self.api_key = api_key or secrets.token_hex(16)
        self.opening = opening
        self.handshake = handshake
        self.silent_timeout = silent_timeout
        self.posts: list[Post] = []
        # Every request received, any method or path: what a client costs the server.
        self.requests_received = 0
        self._ports = ports
        self._printer_present = printer_present
        self._connection: _Connection | None = None
        self._error: str | None = None
        self._lock = threading.Lock()
        # Notified on every recorded POST: a waiter sleeps instead of polling, and a
        # poller in this process would take the interpreter lock from the server's
        # threads and slow every answer it times (bench/run measures them).
        self._posted = threading.Condition(self._lock)
        self.fault: str | None = None  # see set_fault()
        self.slow_by = 0.0
        self._open: set[socket.socket] = set()  # connections being served
        self._server, self._thread = self._listen(0)
        self.port = int(self._server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"

    def _listen(self, port: int) -> tuple[ThreadingHTTPServer, threading.Thread]:
        """Given a port (0: any free one), serve on it; return the server and its thread."""
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler_for(self))
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-octoprint-{server.server_address[1]}",
            daemon=True,
        )
        thread.start()
        return server, thread

    def __enter__(self) -> FakeOctoPrint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"FakeOctoPrint({self.url})"

    def close(self) -> None:
        """Stop serving and free the port; calling it again does nothing."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(5)
        self._server.server_close()

    # -- faults ---------------------------------------------------------------

    def set_fault(self, fault: str | None, *, slow_by: float = 0.0) -> None:
        """Given a fault from ``FAULTS`` (or None to end it), behave that way from now on.

        ``refuse`` closes the listening socket and every open connection, as a
        stopped OctoPrint does; ending it listens on the same port again. ``slow``
        holds every request ``slow_by`` seconds, then handles it as usual (a POST
        still acts). ``500`` and ``html`` answer every request, POSTs included (which
        are recorded, and do nothing), with an HTML page: status 500, or 200.
        Raise ValueError for an unknown fault.
        """
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")
        with self._lock:
            before = self.fault
            self.fault, self.slow_by = fault, slow_by
        if fault == FAULT_REFUSE and before != FAULT_REFUSE:
            self.close()
            with self._lock:
                open_connections = list(self._open)
            for connection in open_connections:
                # A keep-alive connection would otherwise still be answered.
                with contextlib.suppress(OSError):
                    connection.shutdown(socket.SHUT_RDWR)
        elif before == FAULT_REFUSE and fault != FAULT_REFUSE:
            self._server, self._thread = self._listen(self.port)

    # -- for assertions -------------------------------------------------------

    @property
    def connects(self) -> list[Post]:
        """Every connect OctoPrint accepted (204), ignored ones included, oldest first."""
        with self._lock:
            return [p for p in self.posts if p.command == "connect" and p.status == 204]

    def wait_for_posts(self, count: int, timeout: float) -> bool:
        """Given a count, block until that many POSTs are recorded; False after ``timeout`` s."""
        with self._posted:
            return self._posted.wait_for(lambda: len(self.posts) >= count, timeout)

    @property
    def state(self) -> str:
        """The ``current.state`` that ``GET /api/connection`` would answer now."""
        with self._lock:
            return self._current_state(time.monotonic())

    @property
    def operational_since(self) -> float | None:
        """When the current connection became Operational (monotonic), or None."""
        with self._lock:
            self._current_state(time.monotonic())
            return None if self._connection is None else self._connection.operational_at

    # -- the model ------------------------------------------------------------

    def _current_state(self, now: float) -> str:
        """Given the time, bring the connection up to date and return its state text."""
        connection = self._connection
        if connection is None:
            return CLOSED
        elapsed = now - connection.since
        if connection.device is not None:
            if self._printer_present(connection.port) == connection.device:
                return OPERATIONAL
            self._connection, self._error = None, VANISHED_ERROR
            return CLOSED
        waiting = DETECTING if connection.detecting else CONNECTING
        if elapsed < self.opening and not connection.detecting:
            return OPENING
        if elapsed < self.handshake:
            return waiting
        device = self._printer_present(connection.port)
        if device is not None:
            connection.device = device
            connection.operational_at = connection.since + self.handshake
            return OPERATIONAL
        if elapsed < self.silent_timeout:
            return waiting
        # Gave up: closed without an error, unless it was detecting the baudrate.
        self._connection = None
        self._error = AUTODETECT_ERROR if connection.detecting else None
        return CLOSED

    def _connection_body(self) -> dict[str, Any]:
        state = self._current_state(time.monotonic())
        connection = self._connection
        return {
            "current": {
                "state": state,
                "port": None if connection is None else connection.port,
                "baudrate": None if connection is None else connection.baudrate or 115200,
                "printerProfile": "_default",
            },
            "options": {
                "ports": list(self._ports()),
                "baudrates": list(BAUDRATES),
                "printerProfiles": [{"id": "_default", "name": "Default"}],
                "portPreference": None,
                "baudratePreference": None,
                "printerProfilePreference": "_default",
            },
        }

    def _job_body(self) -> dict[str, Any]:
        state = self._current_state(time.monotonic())
        if state == CLOSED:
            state = OFFLINE if self._error is None else OFFLINE_AFTER_ERROR
        body: dict[str, Any] = {
            "job": {
                "file": {"name": None, "path": None, "size": None, "origin": None, "date": None},
                "averagePrintTime": None,
                "estimatedPrintTime": None,
                "lastPrintTime": None,
                "filament": {"length": None, "volume": None},
                "user": None,
            },
            "progress": {
                "completion": None,
                "filepos": None,
                "printTime": None,
                "printTimeLeft": None,
                "printTimeLeftOrigin": None,
            },
            "state": state,
        }
        if self._error is not None:
            body["error"] = self._error
        return body

    def _command(self, body: dict[str, Any], now: float) -> tuple[int, str | None, bool]:
        """Given a POST body, act on it; return the status, the error text, and ignored."""
        command = body.get("command")
        if command not in ("connect", "disconnect", "fake_ack"):
            return 400, "command is invalid", False
        state = self._current_state(now)
        if command == "disconnect":
            if self._connection is not None:
                self._connection, self._error = None, None
            return 204, None, False
        if command == "fake_ack":
            return 204, None, False
        port = body.get("port")
        if port is not None and port != "AUTO" and port not in self._ports():
            return 400, "port is invalid", False
        baudrate = body.get("baudrate")
        if baudrate is not None and baudrate != 0 and baudrate not in BAUDRATES:
            return 400, "baudrate is invalid", False
        profile = body.get("printerProfile")
        if profile is not None and profile != "_default":
            return 400, "printerProfile is invalid", False
        if state != CLOSED:
            return 204, None, True
        self._connection = _Connection(
            str(port or "AUTO"), baudrate, now, detecting=not baudrate or port in (None, "AUTO")
        )
        self._error = None
        return 204, None, False

    def _count_request(self) -> None:
        with self._lock:
            self.requests_received += 1

    def _track(self, connection: socket.socket, is_open: bool) -> None:
        with self._lock:
            if is_open:
                self._open.add(connection)
            else:
                self._open.discard(connection)

    def _authorized(self, headers: Any, query: str) -> bool:
        keys = [headers.get("X-Api-Key")]
        authorization = str(headers.get("Authorization") or "")
        if authorization.startswith("Bearer "):
            keys.append(authorization[len("Bearer ") :])
        keys.extend(parse_qs(query).get("apikey", []))
        return self.api_key in keys


def _handler_for(fake: FakeOctoPrint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as OctoPrint's Tornado; an idle connection is dropped after 10 s.
        protocol_version = "HTTP/1.1"
        timeout = 10
        # Headers and body go out in two writes: with Nagle's algorithm on, the body
        # waits for the client's delayed ACK (~40 ms). Tornado sends them at once.
        disable_nagle_algorithm = True

        def setup(self) -> None:
            super().setup()
            fake._track(self.connection, True)

        def finish(self) -> None:
            fake._track(self.connection, False)
            # The connection may have been shut down under us (set_fault("refuse")).
            with contextlib.suppress(OSError):
                super().finish()

        def _fault(self) -> int | None:
            """Act out the fault in force; return the status sent, or None to go on as usual."""
            with fake._lock:
                fault, slow_by = fake.fault, fake.slow_by
            if fault == FAULT_SLOW:
                time.sleep(slow_by)
            elif fault == FAULT_500:
                self._send_page(500, ERROR_PAGE)
                return 500
            elif fault == FAULT_HTML:
                self._send_page(200, SIGN_IN_PAGE)
                return 200
            return None

        def do_GET(self) -> None:
            fake._count_request()
            if self._fault() is not None:
                return
            url = urlsplit(self.path)
            if url.path not in ("/api/connection", "/api/job"):
                self._send(404, {"error": "Not Found"})
                return
            if not fake._authorized(self.headers, url.query):
                self._send(403, {"error": FORBIDDEN})
                return
            with fake._lock:
                if url.path == "/api/connection":
                    body = fake._connection_body()
                else:
                    body = fake._job_body()
            self._send(200, body)

        def do_POST(self) -> None:
            now = time.monotonic()
            fake._count_request()
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            faulted = self._fault()
            if faulted is not None:
                try:
                    fields = json.loads(raw or b"null")
                except ValueError:
                    fields = None
                fields = fields if isinstance(fields, dict) else {}
                command, port = fields.get("command"), fields.get("port")
                with fake._lock:
                    fake.posts.append(
                        Post(
                            command if isinstance(command, str) else None,
                            port if isinstance(port, str) else None,
                            now,
                            faulted,
                        )
                    )
                    fake._posted.notify_all()
                return
            if url.path != "/api/connection":
                self._send(404, {"error": "Not Found"})
                return
            body: Any = None
            error: str | None
            ignored = False
            if not fake._authorized(self.headers, url.query):
                status, error = 400, "CSRF validation failed"
            elif self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                status, error = 415, NOT_JSON
            else:
                try:
                    body = json.loads(raw or b"null")
                except ValueError:
                    body = None
                if isinstance(body, dict):
                    with fake._lock:
                        status, error, ignored = fake._command(body, now)
                else:
                    status, error = 400, "command is invalid"
            fields = body if isinstance(body, dict) else {}
            command, port = fields.get("command"), fields.get("port")
            post = Post(
                command if isinstance(command, str) else None,
                port if isinstance(port, str) else None,
                now,
                status,
                ignored,
            )
            with fake._lock:
                fake.posts.append(post)
                fake._posted.notify_all()
            self._send(status, None if error is None else {"error": error})

        def _send(self, status: int, body: dict[str, Any] | None) -> None:
            payload = b"" if body is None else json.dumps(body).encode()
            try:
                self.send_response(status)
                if body is not None:
                    self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self._say_if_closing()
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up waiting

        def _say_if_closing(self) -> None:
            # Tornado (OctoPrint's server) answers a request that asked for
            # "Connection: close" with the same header; a client that is not told
            # keeps the connection and may reuse it just as the server closes it.
            if self.close_connection:
                self.send_header("Connection", "close")

        def _send_page(self, status: int, page: str) -> None:
            payload = page.encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self._say_if_closing()
                self.end_headers()
                self.wfile.write(payload)
            except (BrokenPipeError, ConnectionResetError):
                pass

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


# -- the ports of a umockdev testbed, as an OctoPrint under it would see them ----------


def ports_under(root: Path) -> PortsFunction:
    """Given a testbed's root, return a function listing its ttyACM/ttyUSB nodes and by-id links.

    That is what an OctoPrint started under the testbed with
    ``additionalPorts: ["/dev/serial/by-id/*"]`` offers.
    """

    def ports() -> list[str]:
        dev = Path(root) / "dev"
        found = [
            f"/dev/{name}"
            for name in _listdir(dev)
            if name.startswith(("ttyACM", "ttyUSB", "ttyS", "rfcomm"))
        ]
        found.extend(f"/dev/serial/by-id/{name}" for name in _listdir(dev / "serial" / "by-id"))
        return sorted(found)

    return ports


def printer_under(root: Path) -> PresenceFunction:
    """Given a testbed's root, return a function naming the node a port leads to now.

    A by-id link is followed to its node (``/dev/ttyACM16``): the testbed gives a
    replugged device a new node name, so a connection made before a replug reads
    as lost. None when the link or the node is gone.
    """

    def printer_present(port: str) -> str | None:
        path = Path(root) / port.lstrip("/")
        if path.parent.name == "by-id":
            try:
                target = os.readlink(path)
            except OSError:
                return None
            port = os.path.normpath(os.path.join(os.path.dirname(port), target))
            path = Path(root) / port.lstrip("/")
        return port if os.path.lexists(path) else None

    return printer_present


def _listdir(path: Path) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []
