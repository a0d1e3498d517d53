"""The client against the answers OctoPrint 1.9.3 and 2.0.0rc7 gave where they differ
from 1.11.8, served by the scripted server on loopback (tests/support/scripted_octoprint.py).

The bodies are the ones seen against the real versions; test_octoprint_versions.py
runs the core scenarios against the real ones.
"""

from __future__ import annotations

import json
from typing import Any

from reconnectd.host import ErrorKind, HostView, Phase, Refused, Unreachable
from reconnectd.octoprint_api import OctoPrintApi
from reconnectd.octoprint_state import UNNAMED_ERROR
from tests.support.scripted_octoprint import CONNECTION, KEY, Answer, ScriptedServer, serve_state

# What OctoPrint 2.0.0rc7 serves as the 1.x /api/connection with no connection.
CONNECTION_2_0: dict[str, Any] = json.loads(json.dumps(CONNECTION))
CONNECTION_2_0["current"].update(state="Offline", printerProfile=None)
CONNECTION_2_0["options"]["autoconnect"] = False
VERSION_2_0 = {"api": "0.1", "server": "2.0.0rc7", "text": "OctoPrint 2.0.0rc7"}
VERSION_1_11 = {"api": "0.1", "server": "1.11.8", "text": "OctoPrint 1.11.8"}


def connecting() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(json.dumps(CONNECTION))
    body["current"].update(state="Connecting", port="/dev/ttyACM0", baudrate=115200)
    return body


def test_connecting_on_2_0_asks_the_version_and_reads_as_opening(
    server: ScriptedServer, api: OctoPrintApi
) -> None:
    serve_state(server, connecting(), {"state": "Connecting", "error": None})
    server.answer("GET", "/api/version", Answer(200, VERSION_2_0))
    view = api.read()
    assert isinstance(view, HostView)
    assert (view.state, view.phase) == ("Connecting", Phase.OPENING)
    assert [s.path for s in server.script.seen] == ["/api/connection", "/api/job", "/api/version"]


def test_connecting_on_1_x_stays_connecting(server: ScriptedServer, api: OctoPrintApi) -> None:
    serve_state(server, connecting(), {"state": "Connecting", "error": None})
    server.answer("GET", "/api/version", Answer(200, VERSION_1_11))
    view = api.read()
    assert isinstance(view, HostView)
    assert view.phase == Phase.CONNECTING
    assert [s.path for s in server.script.seen][-1] == "/api/version"


def test_connecting_with_no_version_answer_is_read_as_1_x(
    server: ScriptedServer, api: OctoPrintApi
) -> None:
    serve_state(server, connecting(), {"state": "Connecting", "error": None})
    server.answer("GET", "/api/version", Answer(404, {"error": "Not Found"}))
    view = api.read()
    assert isinstance(view, HostView), view
    assert view.phase == Phase.CONNECTING


def test_no_version_asked_for_other_states(server: ScriptedServer, api: OctoPrintApi) -> None:
    serve_state(server, CONNECTION_2_0, {"state": "Offline", "error": None})
    view = api.read()
    assert isinstance(view, HostView)
    assert (view.phase, view.error) == (Phase.CLOSED, None)
    assert [s.path for s in server.script.seen] == ["/api/connection", "/api/job"]


def test_2_0_offline_after_error_without_text_is_an_unnamed_error(
    server: ScriptedServer, api: OctoPrintApi
) -> None:
    # 2.0.0rc7 after the device vanished, the firmware went silent, or kill().
    serve_state(server, CONNECTION_2_0, {"state": "Offline after error", "error": None})
    view = api.read()
    assert isinstance(view, HostView)
    assert (view.phase, view.error, view.error_kind) == (
        Phase.CLOSED,
        UNNAMED_ERROR,
        ErrorKind.FATAL,
    )


def test_2_0_precondition_failure_is_a_refusal(server: ScriptedServer, api: OctoPrintApi) -> None:
    message = "Preconditions for connecting to serial weren't met by provided parameters"
    server.answer("POST", "/api/connection", Answer(412, {"error": message}))
    assert api.connect("/dev/ttyACM0", 115200, None) == Refused(412, message)


def test_reconnect_plugins_come_from_the_settings(
    server: ScriptedServer, api: OctoPrintApi
) -> None:
    settings = {
        "api": {"key": None},
        "plugins": {
            "appkeys": {"x": 1},
            "portretry": {"interval": 5.0},
            "SerialReconnect": {"enabled": False, "poll_period": 5},
        },
    }
    server.answer("GET", "/api/settings", Answer(200, settings))
    assert api.reconnect_plugins() == [("portretry", "PortRetry")]
    assert [(s.method, s.path) for s in server.script.seen] == [("GET", "/api/settings")]
    assert server.script.seen[0].headers["X-Api-Key"] == KEY


def test_reconnect_plugins_without_permission_or_answer(
    server: ScriptedServer, api: OctoPrintApi
) -> None:
    server.answer("GET", "/api/settings", Answer(403, {"error": "Forbidden"}))
    assert api.reconnect_plugins() == Refused(
        403, "API key rejected or lacking permission", key_rejected=True
    )
    server.answer("GET", "/api/settings", Answer(500, b"oops", content_type="text/plain"))
    assert isinstance(api.reconnect_plugins(), Unreachable)
    server.answer("GET", "/api/settings", Answer(200, {"api": {}}))  # no plugin has settings
    assert api.reconnect_plugins() == []
