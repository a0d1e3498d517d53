"""The client keeps connections alive, and copes with an OctoPrint that drops them.

OctoPrint 1.10 and later keep a connection open between requests; 1.9.3 drops it
without a FIN and resets the next request sent on it, unread (seen against the real
ones: tests/test_octoprint_versions.py asks each). :class:`RawServer` does either, on
loopback, at the socket level, so the tests can count connections and resets.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from io import BufferedReader

import pytest

from reconnectd.host import Accepted, HostView, Unreachable
from reconnectd.octoprint_api import OctoPrintApi
from tests.support.scripted_octoprint import CONNECTION, JOB_OFFLINE, KEY

BODIES = {"/api/connection": CONNECTION, "/api/job": JOB_OFFLINE}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    connection_header: str | None
    on_connection: int  # which accepted connection it came on, from 1


class RawServer:
    """An HTTP/1.1 server on 127.0.0.1 that behaves like one OctoPrint version.

    ``keeps``: answer every request on a connection, as 1.10+ does. ``drops``: answer
    the first, then reset the connection when the next request arrives on it (1.9.3).
    ``resets``: reset every connection as soon as a request arrives, unanswered.
    """

    def __init__(self, behaviour: str) -> None:
        self.behaviour = behaviour
        self.requests: list[Request] = []
        self.connections = 0
        self.resets = 0
        self._lock = threading.Lock()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                number = self.connections
            threading.Thread(target=self._serve, args=(conn, number), daemon=True).start()

    def _serve(self, conn: socket.socket, number: int) -> None:
        reader = conn.makefile("rb")
        answered = 0
        try:
            while True:
                if self.behaviour == "resets" or (self.behaviour == "drops" and answered):
                    # Wait for the request, then close with it unread: the kernel
                    # answers with a reset, as 1.9.3's server does.
                    if conn.recv(1, socket.MSG_PEEK):
                        self._reset(conn)
                    return
                request = self._read_request(reader, number)
                if request is None:
                    return
                self._answer(conn, request)
                answered += 1
                if request.connection_header == "close":
                    return
        except OSError:
            return
        finally:
            reader.close()
            conn.close()

    def _reset(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        with self._lock:
            self.resets += 1

    def _read_request(self, reader: BufferedReader, number: int) -> Request | None:
        line = reader.readline()
        if not line:
            return None
        method, path, _ = line.decode().split(" ", 2)
        headers: dict[str, str] = {}
        while (header := reader.readline()) not in (b"\r\n", b""):
            name, _, value = header.decode().partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        if length:
            reader.read(length)
        request = Request(method, path, headers.get("connection"), number)
        with self._lock:
            self.requests.append(request)
        return request

    def _answer(self, conn: socket.socket, request: Request) -> None:
        # A request asking for "close" is told so, as every HTTP/1.1 server (1.9.3's
        # included) does: the client then never sends on that connection again.
        closing = "Connection: close\r\n" if request.connection_header == "close" else ""
        if request.method == "POST":
            conn.sendall(f"HTTP/1.1 204 No Content\r\n{closing}Content-Length: 0\r\n\r\n".encode())
            return
        body = json.dumps(BODIES.get(request.path, {})).encode()
        head = (
            f"HTTP/1.1 200 OK\r\n{closing}Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        conn.sendall(head.encode() + body)


@pytest.fixture
def server(request: pytest.FixtureRequest) -> Iterator[RawServer]:
    raw = RawServer(request.param)
    yield raw
    raw.close()


@pytest.fixture
def api(server: RawServer) -> Iterator[OctoPrintApi]:
    client = OctoPrintApi(server.url, KEY, 2.0)
    yield client
    client.close()


@pytest.mark.parametrize("server", ["keeps"], indirect=True)
def test_one_connection_serves_every_request(server: RawServer, api: OctoPrintApi) -> None:
    for _ in range(3):
        assert isinstance(api.read(), HostView)
    assert isinstance(api.connect("/dev/ttyACM0", None, None), Accepted)
    assert server.connections == 1
    assert len(server.requests) == 7
    assert {r.connection_header for r in server.requests} == {"keep-alive"}


@pytest.mark.parametrize("server", ["drops"], indirect=True)
def test_a_dropped_connection_is_asked_again_then_a_connection_per_request(
    server: RawServer, api: OctoPrintApi
) -> None:
    first = api.read()
    assert isinstance(first, HostView), first
    # /api/connection on the first connection; /api/job was reset on it and sent
    # again on a new one, from then on with Connection: close.
    assert [(r.path, r.on_connection, r.connection_header) for r in server.requests] == [
        ("/api/connection", 1, "keep-alive"),
        ("/api/job", 2, "close"),
    ]
    assert server.resets == 1
    for _ in range(3):
        assert isinstance(api.read(), HostView)
    assert server.resets == 1, "no connection is reused after the first drop"
    assert {r.connection_header for r in server.requests[1:]} == {"close"}
    assert server.connections == 1 + 1 + 3 * 2


@pytest.mark.parametrize("server", ["drops"], indirect=True)
def test_a_command_on_a_dropped_connection_arrives_once(
    server: RawServer, api: OctoPrintApi
) -> None:
    assert isinstance(api.read(detail=False), HostView)
    assert isinstance(api.connect("/dev/ttyACM0", None, None), Accepted)
    posts = [r for r in server.requests if r.method == "POST"]
    assert len(posts) == 1, "the reset request was never read; the one sent again was"
    assert server.resets == 1


@pytest.mark.parametrize("server", ["resets"], indirect=True)
def test_a_server_that_resets_everything_is_tried_once_more_not_forever(
    server: RawServer, api: OctoPrintApi
) -> None:
    result = api.read()
    assert isinstance(result, Unreachable)
    assert "reset" in result.reason.lower(), result.reason
    assert server.connections == 2, "the request and one more on a new connection"
    assert isinstance(api.read(), Unreachable)
    assert server.connections == 3, "no second retry: connections are no longer kept"


@pytest.mark.parametrize("server", ["keeps"], indirect=True)
def test_read_without_the_job_asks_one_path(server: RawServer, api: OctoPrintApi) -> None:
    view = api.read(detail=False)
    assert isinstance(view, HostView)
    assert view.error is None
    assert [r.path for r in server.requests] == ["/api/connection"]
