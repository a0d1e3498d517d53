"""A scripted OctoPrint: a real HTTP server on loopback that answers each request as
told and records what it was sent, and the 1.11.8 bodies it serves by default.

Used by tests/test_octoprint_api.py and tests/test_octoprint_api_versions.py, through
the ``server`` and ``api`` fixtures in tests/conftest.py.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

KEY = "K3Y-d0e5-n0t-leak-5ecret"

CONNECTION = {
    "current": {
        "state": "Closed",
        "port": None,
        "baudrate": None,
        "printerProfile": "_default",
    },
    "options": {
        "ports": ["/dev/ttyACM0", "/dev/serial/by-id/usb-Prusa_MK3-if00"],
        "baudrates": [250000, 115200],
        "printerProfiles": [{"id": "_default", "name": "Default"}],
        "portPreference": "/dev/ttyACM0",
        "baudratePreference": 115200,
        "printerProfilePreference": "_default",
    },
}
JOB_OFFLINE = {"job": {}, "progress": {}, "state": "Offline"}


# -- a scripted OctoPrint --------------------------------------------------------


@dataclass
class Answer:
    status: int = 200
    body: Any = None  # JSON-encoded unless bytes
    content_type: str = "application/json"
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if self.body is None:
            return b""
        return json.dumps(self.body).encode()


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Script:
    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)


class ScriptedServer:
    """A real HTTP server on 127.0.0.1 answering each (method, path) as scripted."""

    def __init__(self) -> None:
        self.script = Script()
        script = self.script

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                path = self.path
                script.seen.append(Seen(self.command, path, dict(self.headers.items()), body))
                answer = script.answers.get((self.command, path), Answer(404, {"error": "?"}))
                if answer.delay:
                    time.sleep(answer.delay)
                payload = answer.payload()
                try:
                    self.send_response(answer.status)
                    self.send_header("Content-Type", answer.content_type)
                    self.send_header("Content-Length", str(len(payload)))
                    for name, value in answer.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up waiting, as it should

            do_GET = do_POST = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self.thread.start()

    def answer(self, method: str, path: str, answer: Answer) -> None:
        self.script.answers[(method, path)] = answer

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def serve_state(
    server: ScriptedServer, connection: Any = CONNECTION, job: Any = JOB_OFFLINE
) -> None:
    server.answer("GET", "/api/connection", Answer(200, connection))
    server.answer("GET", "/api/job", Answer(200, job))
