"""The OctoPrint client, against a scripted HTTP server and against a real OctoPrint.

The first half serves scripted answers from a real HTTP server on loopback: every
way an answer can be useless or a refusal, and the exact requests the client sends.
The second half runs OctoPrint 1.11.8 with a fake Marlin on a pty and checks that
the state and error texts OctoPrint really produces read as the decision core
expects (``phase_of``, ``classify_error``): a change in OctoPrint shows up here.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import requests
import urllib3

from reconnectd.host import Accepted, ErrorKind, HostView, Phase, ReadResult, Refused, Unreachable
from reconnectd.http_transport import connection_failure
from reconnectd.octoprint_api import OctoPrintApi
from reconnectd.octoprint_state import classify_error, octoprint_view, phase_of
from tests.support.fake_marlin import KILL_TEXT, FakeMarlin, open_pty_port
from tests.support.octoprint_instance import OctoPrintInstance, octoprint_bin
from tests.support.scripted_octoprint import (
    CONNECTION,
    JOB_OFFLINE,
    KEY,
    Answer,
    ScriptedServer,
    serve_state,
)


def assert_no_key(*things: object) -> None:
    for thing in things:
        assert KEY not in repr(thing)
        assert KEY not in str(thing)


def test_read_builds_the_view(server: ScriptedServer, api: OctoPrintApi) -> None:
    job = {"job": {}, "state": "Offline after error", "error": "SerialException: gone"}
    serve_state(server, job=job)
    assert api.read() == octoprint_view(
        state="Closed",
        port=None,
        error="SerialException: gone",
        ports=("/dev/ttyACM0", "/dev/serial/by-id/usb-Prusa_MK3-if00"),
        baudrates=(250000, 115200),
        port_preference="/dev/ttyACM0",
        baudrate_preference=115200,
        profile_preference="_default",
        profiles=("_default",),
        profile_names=("Default",),
    )
    assert [(s.method, s.path) for s in server.script.seen] == [
        ("GET", "/api/connection"),
        ("GET", "/api/job"),
    ]
    assert all(s.headers["X-Api-Key"] == KEY for s in server.script.seen)


def test_read_without_preferences_and_error(server: ScriptedServer, api: OctoPrintApi) -> None:
    connection = json.loads(json.dumps(CONNECTION))
    connection["current"].update(state="Operational", port="/dev/ttyACM0", baudrate=115200)
    options = connection["options"]
    options.update(portPreference=None, baudratePreference=None)
    del options["printerProfilePreference"]
    serve_state(server, connection, {"state": "Operational", "error": ""})
    view = api.read()
    assert isinstance(view, HostView)
    assert (view.state, view.port, view.error) == ("Operational", "/dev/ttyACM0", None)
    assert (view.port_preference, view.baudrate_preference, view.profile_preference) == (
        None,
        None,
        None,
    )


def test_refused_port_is_unreachable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = OctoPrintApi(f"http://127.0.0.1:{port}", KEY, 1)
    result = api.read()
    assert isinstance(result, Unreachable)
    assert result.reason.startswith("connection refused")
    assert f"127.0.0.1:{port}/api/connection" in result.reason
    command = api.connect("/dev/ttyACM0", None, None)
    assert isinstance(command, Unreachable)
    assert command.reason.startswith("connection refused")
    api.close()


@pytest.mark.parametrize("status", [500, 502, 503])
def test_server_error_is_unreachable(
    server: ScriptedServer, api: OctoPrintApi, status: int
) -> None:
    server.answer("GET", "/api/connection", Answer(status, b"<h1>Bad Gateway</h1>", "text/html"))
    result = api.read()
    assert isinstance(result, Unreachable)
    assert result.reason.startswith(f"HTTP {status} (GET ")


def test_server_error_on_job_is_unreachable(server: ScriptedServer, api: OctoPrintApi) -> None:
    serve_state(server)
    server.answer("GET", "/api/job", Answer(500, {"error": "boom"}))
    result = api.read()
    assert isinstance(result, Unreachable)
    assert result.reason.startswith("HTTP 500 (GET ")
    assert result.reason.endswith("/api/job)")


def test_html_instead_of_json(server: ScriptedServer, api: OctoPrintApi) -> None:
    # What a captive portal or a reverse proxy's login page looks like.
    serve_state(server)
    server.answer(
        "GET",
        "/api/connection",
        Answer(200, b"<html><body>Sign in</body></html>", "text/html; charset=utf-8"),
    )
    result = api.read()
    assert isinstance(result, Unreachable)
    assert result.reason.startswith("answer is not JSON (text/html)")


def test_json_that_is_not_an_object(server: ScriptedServer, api: OctoPrintApi) -> None:
    serve_state(server, job=["not", "an", "object"])
    result = api.read()
    assert isinstance(result, Unreachable)
    assert result.reason.startswith("answer is JSON but not an object (list)")


def test_slower_than_the_timeout(server: ScriptedServer) -> None:
    serve_state(server)
    server.answer("GET", "/api/connection", Answer(200, CONNECTION, delay=1.5))
    api = OctoPrintApi(server.url, KEY, 0.3)
    started = time.monotonic()
    result = api.read()
    elapsed = time.monotonic() - started
    api.close()
    assert isinstance(result, Unreachable)
    assert result.reason.startswith("no answer within 0.3 s")
    assert elapsed < 1.2


def test_slow_post_is_unreachable(server: ScriptedServer) -> None:
    server.answer("POST", "/api/connection", Answer(204, None, delay=1.5))
    api = OctoPrintApi(server.url, KEY, 0.3)
    result = api.disconnect()
    api.close()
    assert result == Unreachable(
        f"no answer within 0.3 s (POST {server.url}/api/connection)",
    )


def test_forbidden_is_refused(server: ScriptedServer, api: OctoPrintApi) -> None:
    forbidden = Answer(403, {"error": "You don't have the permission to access the requested"})
    server.answer("GET", "/api/connection", forbidden)
    server.answer("POST", "/api/connection", forbidden)
    assert api.read() == Refused(403, "API key rejected or lacking permission", key_rejected=True)
    assert api.connect("/dev/ttyACM0", None, None) == Refused(
        403, "API key rejected or lacking permission", key_rejected=True
    )


def test_forbidden_job_is_refused(server: ScriptedServer, api: OctoPrintApi) -> None:
    serve_state(server)
    server.answer("GET", "/api/job", Answer(403, {"error": "no"}))
    assert api.read() == Refused(403, "API key rejected or lacking permission", key_rejected=True)


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (400, {"error": "port is invalid"}, "port is invalid"),
        (400, {"error": "baudrate is invalid"}, "baudrate is invalid"),
        (409, {"error": "Printer is not operational"}, "Printer is not operational"),
        (
            415,
            {"error": "Did not attempt to load JSON data because the request Content-Type"},
            "Did not attempt to load JSON data because the request Content-Type",
        ),
        (400, b"<p>Bad   request\n here</p>", "Bad request here"),
        (400, b"", "HTTP 400"),
        (400, {"error": "x" * 500}, "x" * 199 + "…"),
    ],
)
def test_refusals_carry_octoprints_message(
    server: ScriptedServer, api: OctoPrintApi, status: int, body: Any, reason: str
) -> None:
    server.answer("POST", "/api/connection", Answer(status, body))
    assert api.connect("/dev/ttyUSB9", None, None) == Refused(status, reason)


def test_csrf_refusal_means_the_key(server: ScriptedServer, api: OctoPrintApi) -> None:
    # OctoPrint's answer to a POST whose key it did not accept.
    server.answer("POST", "/api/connection", Answer(400, {"error": "CSRF validation failed"}))
    assert api.disconnect() == Refused(
        403, "API key rejected or lacking permission", key_rejected=True
    )


def test_no_cookies_kept(server: ScriptedServer, api: OctoPrintApi) -> None:
    # OctoPrint sets a session cookie; sent back, it could outlive a revoked key.
    cookie = {"Set-Cookie": "session_P5000=abc; Path=/; HttpOnly"}
    serve_state(server)
    server.answer("GET", "/api/connection", Answer(200, CONNECTION, headers=cookie))
    server.answer("POST", "/api/connection", Answer(204))
    assert isinstance(api.read(), HostView)
    assert api.disconnect() == Accepted()
    assert isinstance(api.read(), HostView)
    assert len(server.script.seen) == 5
    assert all("Cookie" not in s.headers for s in server.script.seen)


@pytest.mark.parametrize("status", [301, 401, 404])
def test_other_statuses_are_unreachable(
    server: ScriptedServer, api: OctoPrintApi, status: int
) -> None:
    server.answer("GET", "/api/connection", Answer(status, {"error": "?"}))
    result = api.read()
    assert isinstance(result, Unreachable)
    assert result.reason.startswith(f"HTTP {status} (GET ")


def _without(body: dict[str, Any], *keys: str) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(body))
    target = copy
    for key in keys[:-1]:
        target = target[key]
    del target[keys[-1]]
    return copy


def _with(body: dict[str, Any], value: Any, *keys: str) -> dict[str, Any]:
    copy: dict[str, Any] = json.loads(json.dumps(body))
    target = copy
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return copy


@pytest.mark.parametrize(
    ("connection", "job", "detail"),
    [
        (_without(CONNECTION, "current"), JOB_OFFLINE, "/api/connection: current is missing"),
        (_without(CONNECTION, "options"), JOB_OFFLINE, "/api/connection: options is missing"),
        (
            _without(CONNECTION, "current", "state"),
            JOB_OFFLINE,
            "/api/connection current: state is missing",
        ),
        (
            _with(CONNECTION, 3, "current", "state"),
            JOB_OFFLINE,
            "/api/connection current: state is int, not str",
        ),
        (
            _without(CONNECTION, "options", "ports"),
            JOB_OFFLINE,
            "/api/connection options: ports is missing",
        ),
        (
            _with(CONNECTION, "/dev/ttyACM0", "options", "ports"),
            JOB_OFFLINE,
            "/api/connection options: ports is str, not list",
        ),
        (
            _with(CONNECTION, [1, 2], "options", "ports"),
            JOB_OFFLINE,
            "/api/connection options: ports is not a list of text",
        ),
        (
            _with(CONNECTION, ["115200"], "options", "baudrates"),
            JOB_OFFLINE,
            "/api/connection options: baudrates is not a list of numbers",
        ),
        (
            _with(CONNECTION, "115200", "options", "baudratePreference"),
            JOB_OFFLINE,
            "/api/connection options: baudratePreference is str, not int",
        ),
        (CONNECTION, {"state": "Offline", "error": 5}, "/api/job: error is int, not str"),
    ],
)
def test_wrong_shape_is_unreachable(
    server: ScriptedServer, api: OctoPrintApi, connection: Any, job: Any, detail: str
) -> None:
    serve_state(server, connection, job)
    assert api.read() == Unreachable(f"answer has an unexpected shape: {detail}")


def test_connect_sends_port_only(server: ScriptedServer, api: OctoPrintApi) -> None:
    server.answer("POST", "/api/connection", Answer(204))
    assert api.connect("/dev/ttyACM0", None, None) == Accepted()
    (seen,) = server.script.seen
    assert (seen.method, seen.path) == ("POST", "/api/connection")
    assert json.loads(seen.body) == {"command": "connect", "port": "/dev/ttyACM0"}
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["X-Api-Key"] == KEY


def test_connect_sends_baudrate_and_profile_when_given(
    server: ScriptedServer, api: OctoPrintApi
) -> None:
    server.answer("POST", "/api/connection", Answer(204))
    assert api.connect("/dev/serial/by-id/usb-x", 250000, "prusa_mk3s") == Accepted()
    (seen,) = server.script.seen
    # Exactly these keys: "save" and "autoconnect" would change OctoPrint's settings.
    assert json.loads(seen.body) == {
        "command": "connect",
        "port": "/dev/serial/by-id/usb-x",
        "baudrate": 250000,
        "printerProfile": "prusa_mk3s",
    }


def test_disconnect_body(server: ScriptedServer, api: OctoPrintApi) -> None:
    server.answer("POST", "/api/connection", Answer(204))
    assert api.disconnect() == Accepted()
    (seen,) = server.script.seen
    assert json.loads(seen.body) == {"command": "disconnect"}
    assert seen.headers["Content-Type"] == "application/json"


def test_no_key_no_header(server: ScriptedServer) -> None:
    serve_state(server)
    api = OctoPrintApi(server.url, None, 1)
    assert isinstance(api.read(), HostView)
    assert all("X-Api-Key" not in s.headers for s in server.script.seen)
    api.close()


def test_key_never_appears(server: ScriptedServer, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    api = OctoPrintApi(server.url + "/", KEY, 0.3)
    results: list[object] = [api]
    server.answer("POST", "/api/connection", Answer(400, {"error": f"bad key {KEY}"}))
    results.append(api.connect("/dev/ttyACM0", 115200, "_default"))
    for answer in (
        Answer(403, {"error": KEY}),
        Answer(500, KEY.encode(), "text/plain"),
        Answer(200, KEY.encode(), "text/html"),
        Answer(200, {"current": KEY}),
        Answer(200, CONNECTION, delay=1),
    ):
        server.answer("GET", "/api/connection", answer)
        results.append(api.read())
    api.close()
    results.append(OctoPrintApi("http://127.0.0.1:1", KEY, 0.3).read())
    assert_no_key(*results)
    assert KEY not in caplog.text
    assert any(isinstance(r, Refused) and "***" in r.reason for r in results)


def test_read_gives_the_printer_profiles_and_skips_odd_entries(
    server: ScriptedServer, api: OctoPrintApi
) -> None:
    connection = json.loads(json.dumps(CONNECTION))
    connection["options"]["printerProfiles"] = [
        {"id": "_default", "name": "Default"},
        {"id": "mk4", "name": "Original Prusa MK4"},
        {"id": 5, "name": "no text id"},
        "not an object",
        {"id": "nameless"},
    ]
    serve_state(server, connection)
    view = api.read()
    assert isinstance(view, HostView)
    assert view.profiles == ("_default", "mk4", "nameless")
    assert view.profile_names == ("Default", "Original Prusa MK4", "nameless")


# -- a user name and password in the URL (basic auth in front of OctoPrint) --------

PASSWORD = "Pr0xy-pa55word"


@pytest.mark.parametrize(
    ("userinfo", "user", "password"),
    [
        pytest.param(f"proxy:{PASSWORD}", "proxy", PASSWORD, id="plain"),
        pytest.param(f"j%C3%BCrgen:{PASSWORD}%2F%40", "jürgen", f"{PASSWORD}/@", id="escaped"),
        pytest.param("proxy:", "proxy", "", id="empty-password"),
    ],
)
def test_url_credentials_reach_the_server_as_basic_auth(
    server: ScriptedServer, userinfo: str, user: str, password: str
) -> None:
    """The session ignores the environment (trust_env off): the URL's credentials
    must still be sent, as requests' get_auth_from_url reads them, in Latin-1."""
    serve_state(server)
    api = OctoPrintApi(server.url.replace("http://", f"http://{userinfo}@"), KEY, 1)
    assert isinstance(api.read(), HostView)
    assert isinstance(api.connect("/dev/ttyACM0", None, None), Unreachable)  # 404 here
    api.close()
    basic = base64.b64encode(f"{user}:{password}".encode("latin-1")).decode()
    assert [(s.method, s.headers.get("Authorization")) for s in server.script.seen] == [
        ("GET", f"Basic {basic}"),
        ("GET", f"Basic {basic}"),
        ("POST", f"Basic {basic}"),
    ]
    assert all(s.headers["X-Api-Key"] == KEY for s in server.script.seen)
    assert all("@" not in s.path for s in server.script.seen)


def test_url_password_never_appears(
    server: ScriptedServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    url = server.url.replace("http://", f"http://proxy:{PASSWORD}@")
    api = OctoPrintApi(url, KEY, 0.3)
    results: list[object] = [api]
    server.answer("POST", "/api/connection", Answer(400, {"error": f"wrong {PASSWORD}"}))
    results.append(api.connect("/dev/ttyACM0", None, None))
    for answer in (
        Answer(401, b"<h1>401 Authorization Required</h1>", "text/html"),
        Answer(500, PASSWORD.encode(), "text/plain"),
        Answer(200, b"<html>a login page</html>", "text/html"),
        Answer(200, [PASSWORD]),
        Answer(200, CONNECTION, delay=1),
    ):
        server.answer("GET", "/api/connection", answer)
        results.append(api.read())
    api.close()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results.append(OctoPrintApi(f"http://proxy:{PASSWORD}@127.0.0.1:{port}", KEY, 0.3).read())
    texts = [repr(r) for r in results]
    assert all(PASSWORD not in text for text in texts), texts
    assert PASSWORD not in caplog.text
    # Every reason names the URL it was about, the password masked.
    unreachable = [r for r in results if isinstance(r, Unreachable)]
    assert len(unreachable) == 6
    assert all("http://proxy:***@127.0.0.1:" in r.reason for r in unreachable), unreachable
    port = server.url.rsplit(":", 1)[1]
    assert texts[0] == f"OctoPrintApi('http://proxy:***@127.0.0.1:{port}', timeout=0.3)"
    assert results[1] == Refused(400, "wrong ***")


# -- TLS failures as urllib3 1.x reports them -------------------------------------
# (urllib3 2.x, what the test venv has, is driven for real in tests/test_tls.py.)


class CertificateError(ValueError):
    """The shape of urllib3 1.x's own host name mismatch (util/ssl_match_hostname)."""


def test_urllib3_1_host_name_mismatch_reads_as_a_certificate_failure() -> None:
    cause = CertificateError("hostname '127.0.0.1' doesn't match 'octopi.invalid'")
    wrapped = urllib3.exceptions.MaxRetryError(None, "/api/connection", reason=cause)  # type: ignore[arg-type]
    reason = connection_failure(requests.exceptions.SSLError(wrapped))
    assert (
        reason == "certificate verify failed: hostname '127.0.0.1' doesn't match 'octopi.invalid'"
    )


def test_tls_failure_without_a_known_cause_still_says_tls() -> None:
    assert connection_failure(requests.exceptions.SSLError("handshake")) == "TLS failed"


# -- the real OctoPrint ------------------------------------------------------------

# Marked, not skipped: a missing OctoPrint is reported by the fixture with its path.
octoprint_tests = pytest.mark.octoprint

POLL = 0.02


@dataclass
class Rig:
    octoprint: OctoPrintInstance
    api: OctoPrintApi
    ports_dir: Path
    fake_port: Path  # where each test's fake Marlin appears
    dead_port: Path | None  # a node that exists but cannot be opened (ENXIO)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    binary = octoprint_bin()
    if not Path(binary).exists():
        pytest.skip(f"no OctoPrint at {binary} (run tests/bootstrap, or set OCTOPRINT_BIN)")
    workdir = tmp_path_factory.mktemp("octoprint")
    # Only the test's ports live here, so the glob below matches nothing else.
    ports_dir = workdir / "ports"
    ports_dir.mkdir()
    dead_port: Path | None = ports_dir / "ttyDEAD0"
    try:
        # ttyACM's major with a minor no driver has: opening it fails with ENXIO, like
        # the static node an LXC container keeps after the device is gone.
        os.mknod(ports_dir / "ttyDEAD0", 0o660 | stat.S_IFCHR, os.makedev(166, 99))
    except PermissionError:
        dead_port = None
    with OctoPrintInstance(workdir, additional_ports=[f"{ports_dir}/tty*"]) as octoprint:
        api = OctoPrintApi(octoprint.url, octoprint.api_key, 5)
        yield Rig(octoprint, api, ports_dir, ports_dir / "ttyFAKE0", dead_port)
        api.close()


@pytest.fixture
def marlin(rig: Rig) -> Iterator[FakeMarlin]:
    fake = FakeMarlin(open_pty_port(rig.fake_port))
    yield fake
    rig.octoprint.reset()
    fake.stop()


@pytest.fixture
def dead_port(rig: Rig) -> Iterator[Path]:
    if rig.dead_port is None:
        pytest.skip("mknod needs root")
    yield rig.dead_port
    rig.octoprint.reset()


def read_view(api: OctoPrintApi) -> HostView:
    result: ReadResult = api.read()
    assert isinstance(result, HostView), result
    return result


def watch(
    rig: Rig, until: Callable[[HostView], bool], timeout: float
) -> tuple[HostView, list[str]]:
    """Read until ``until`` holds; return the last view and every state seen on the way."""
    deadline = time.monotonic() + timeout
    states: list[str] = []
    while True:
        view = read_view(rig.api)
        if not states or states[-1] != view.state:
            states.append(view.state)
        if until(view):
            return view, states
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not reached within {timeout:g} s; states seen {states}, last {view}\n"
                f"{rig.octoprint.log_tail(20)}"
            )
        time.sleep(POLL)


def stays(rig: Rig, phase: Phase, seconds: float) -> HostView:
    """Read for ``seconds`` and fail if the phase ever differs; return the last view."""
    deadline = time.monotonic() + seconds
    while True:
        view = read_view(rig.api)
        assert view.phase == phase, view
        if time.monotonic() > deadline:
            return view
        time.sleep(POLL)


def is_closed(view: HostView) -> bool:
    # The state itself, not the phase: for ~15 ms while closing after an error,
    # /api/connection says "Offline after error" (port still set, connection object
    # still there, a connect still ignored) before "Closed".
    return view.state == "Closed"


def is_operational(view: HostView) -> bool:
    return view.phase == Phase.OPERATIONAL


def connect_operational(rig: Rig, marlin: FakeMarlin) -> HostView:
    assert rig.api.connect(str(rig.fake_port), 115200, None) == Accepted()
    view, states = watch(rig, is_operational, 10)
    assert {phase_of(s) for s in states} <= {Phase.CLOSED, Phase.OPENING, Phase.CONNECTING} | {
        Phase.OPERATIONAL
    }, states
    return view


def assert_closed_with(view: HostView, error: str | None, kind: ErrorKind) -> None:
    assert view.state == "Closed"
    assert view.port is None
    assert view.error == error
    assert classify_error(view.error) == kind, f"{view.error!r} read as {view.error_kind}"


@octoprint_tests
def test_real_closed_lists_the_port(rig: Rig, marlin: FakeMarlin) -> None:
    view = read_view(rig.api)
    assert view.state == "Closed"
    assert phase_of(view.state) == Phase.CLOSED
    assert view.error is None
    assert str(rig.fake_port) in view.ports
    assert 115200 in view.baudrates
    # A fresh OctoPrint has no port or baudrate preference; the profile is "_default".
    assert (view.port_preference, view.baudrate_preference, view.profile_preference) == (
        None,
        None,
        "_default",
    )
    assert rig.octoprint.job()["state"] == "Offline"


@octoprint_tests
def test_real_connect_reaches_operational(rig: Rig, marlin: FakeMarlin) -> None:
    view = connect_operational(rig, marlin)
    assert view.state == "Operational"
    assert view.port == str(rig.fake_port)
    assert view.error is None
    assert rig.octoprint.connection()["current"]["baudrate"] == 115200
    # OctoPrint really opened the pty and talked to the firmware.
    assert marlin.opens >= 1
    marlin.wait_for(lambda m: m.firmware_queries >= 1, 5)


@octoprint_tests
def test_real_connect_while_operational_is_ignored(rig: Rig, marlin: FakeMarlin) -> None:
    connect_operational(rig, marlin)
    marlin.wait_for(lambda m: m.firmware_queries >= 1, 5)
    opens, hellos = marlin.opens, marlin.hellos
    # Accepted, and nothing happens: OctoPrint ignores a connect while connected.
    assert rig.api.connect(str(rig.fake_port), 115200, None) == Accepted()
    stays(rig, Phase.OPERATIONAL, 1.0)
    assert (marlin.opens, marlin.hellos) == (opens, hellos)


@octoprint_tests
def test_real_manual_disconnect_is_closed_without_error(rig: Rig, marlin: FakeMarlin) -> None:
    connect_operational(rig, marlin)
    assert rig.api.disconnect() == Accepted()
    view, _ = watch(rig, is_closed, 5)
    assert_closed_with(view, None, ErrorKind.NONE)
    assert rig.octoprint.job()["state"] == "Offline"
    marlin.wait_for(lambda m: not m.host_open, 5)


@octoprint_tests
def test_real_vanished_device(rig: Rig, marlin: FakeMarlin) -> None:
    connect_operational(rig, marlin)
    started = time.monotonic()
    marlin.vanish()
    view, states = watch(rig, is_closed, 5)
    assert set(states) <= {"Operational", "Offline after error", "Closed"}
    assert time.monotonic() - started < 2
    assert_closed_with(
        view,
        "SerialException: device reports readiness to read but returned no data "
        "(device disconnected or multiple access on port?)",
        ErrorKind.TRANSPORT,
    )
    assert rig.octoprint.job()["state"] == "Offline after error"
    # A later Disconnect does not clear the error: it stays until the next connect.
    assert rig.api.disconnect() == Accepted()
    time.sleep(0.3)
    assert read_view(rig.api).error == view.error


@octoprint_tests
def test_real_firmware_kill(rig: Rig, marlin: FakeMarlin) -> None:
    connect_operational(rig, marlin)
    marlin.fatal_error()
    view, states = watch(rig, is_closed, 5)
    assert_closed_with(view, KILL_TEXT, ErrorKind.FATAL)
    assert set(states) <= {"Operational", "Error", "Offline after error", "Closed"}
    assert phase_of("Error") == Phase.ERROR
    assert rig.octoprint.job()["state"] == "Offline after error"


@octoprint_tests
def test_real_thermal_runaway(rig: Rig, marlin: FakeMarlin) -> None:
    connect_operational(rig, marlin)
    # Marlin splits it over two Error: lines; OctoPrint joins them with " - ".
    marlin.fatal_error(f"Thermal Runaway, system stopped! Heater_ID: bed\n{KILL_TEXT}")
    view, _ = watch(rig, is_closed, 5)
    assert_closed_with(
        view,
        "Thermal Runaway, system stopped! Heater_ID: bed - Printer halted. kill() called!",
        ErrorKind.FATAL,
    )


@octoprint_tests
def test_real_firmware_falls_silent_while_operational(rig: Rig, marlin: FakeMarlin) -> None:
    connect_operational(rig, marlin)
    started = time.monotonic()
    marlin.go_silent()
    # With the test timeouts (communication 1 s, temperature 1 s, idle maximum 1): ~3.5 s.
    view, _ = watch(rig, is_closed, 15)
    assert 2 < time.monotonic() - started < 10
    assert_closed_with(
        view,
        "Too many consecutive timeouts, printer still connected and alive?",
        ErrorKind.TRANSPORT,
    )


@octoprint_tests
def test_real_connect_to_a_silent_printer_closes_without_error(
    rig: Rig, marlin: FakeMarlin
) -> None:
    marlin.go_silent()
    started = time.monotonic()
    assert rig.api.connect(str(rig.fake_port), 115200, None) == Accepted()
    view, states = watch(rig, lambda v: v.phase == Phase.CONNECTING, 5)
    assert view.state == "Connecting"
    view, states = watch(rig, is_closed, 20)
    # Hello sent three times, each with the 2 s connection timeout: ~4 s here.
    assert 2 < time.monotonic() - started < 15
    assert states[0] == "Connecting"
    # No error at all: indistinguishable from a manual Disconnect by its error text.
    assert_closed_with(view, None, ErrorKind.NONE)
    assert rig.octoprint.job()["state"] == "Offline"
    assert marlin.hellos >= 2


@octoprint_tests
def test_real_unopenable_node_is_stuck_opening(rig: Rig, dead_port: Path) -> None:
    assert str(dead_port) in read_view(rig.api).ports
    assert rig.api.connect(str(dead_port), 115200, None) == Accepted()
    view, _ = watch(rig, lambda v: v.phase == Phase.OPENING, 5)
    assert view.state == "Opening serial connection"
    assert view.port == str(dead_port)
    stays(rig, Phase.OPENING, 2.5)
    # A connect does not get it out (nor in anywhere else)...
    assert rig.api.connect(str(dead_port), 115200, None) == Accepted()
    view = stays(rig, Phase.OPENING, 0.5)
    assert view.error is None
    # ...only a disconnect does.
    assert rig.api.disconnect() == Accepted()
    view, _ = watch(rig, is_closed, 5)
    assert_closed_with(view, None, ErrorKind.NONE)


@octoprint_tests
def test_real_unopenable_node_without_baudrate(rig: Rig, dead_port: Path) -> None:
    # Without a baudrate OctoPrint auto-detects, tries every baudrate and gives up.
    assert rig.api.connect(str(dead_port), None, None) == Accepted()
    view, states = watch(rig, is_closed, 15)
    assert_closed_with(
        view,
        "No more candidates to test, and no working port/baudrate combination detected.",
        ErrorKind.TRANSPORT,
    )
    assert {phase_of(s) for s in states} <= {Phase.CLOSED, Phase.CONNECTING, Phase.ERROR}


@octoprint_tests
def test_real_connect_without_baudrate_detects_it(rig: Rig, marlin: FakeMarlin) -> None:
    # No "baudrate" in the body and no serial.baudrate setting: OctoPrint starts with
    # baudrate 0 ("Detecting serial connection") and tries its list, 115200 first.
    assert rig.api.connect(str(rig.fake_port), None, None) == Accepted()
    view, states = watch(rig, is_operational, 15)
    assert {phase_of(s) for s in states} <= {Phase.CLOSED, Phase.CONNECTING, Phase.OPERATIONAL}
    assert view.port == str(rig.fake_port)
    assert rig.octoprint.connection()["current"]["baudrate"] == 115200
    assert "Performing autodetection" in rig.octoprint.serial_log_tail(200)


@octoprint_tests
def test_real_refusals(rig: Rig, marlin: FakeMarlin) -> None:
    unlisted = str(rig.ports_dir / "nottty0")
    assert rig.api.connect(unlisted, 115200, None) == Refused(400, "port is invalid")
    assert rig.api.connect(str(rig.fake_port), 1234, None) == Refused(400, "baudrate is invalid")
    assert rig.api.connect(str(rig.fake_port), 115200, "nope") == Refused(
        400, "printerProfile is invalid"
    )
    forbidden = Refused(403, "API key rejected or lacking permission", key_rejected=True)
    # A POST without an accepted key is answered 400 "CSRF validation failed" (OctoPrint
    # takes it for a browser's); the client reports what it means.
    for key in ("not-the-key", None):
        wrong = OctoPrintApi(rig.octoprint.url, key, 5)
        assert wrong.read() == forbidden
        assert wrong.connect(str(rig.fake_port), None, None) == forbidden
        assert wrong.disconnect() == forbidden
        wrong.close()
    # Nothing of it reached the printer.
    assert marlin.opens == 0
    assert read_view(rig.api).state == "Closed"


@octoprint_tests
def test_real_octoprint_down_then_back(rig: Rig) -> None:
    rig.octoprint.stop()
    try:
        result = rig.api.read()
        assert isinstance(result, Unreachable)
        assert result.reason.startswith("connection refused")
        assert isinstance(rig.api.disconnect(), Unreachable)
    finally:
        rig.octoprint.start()
    assert read_view(rig.api).state == "Closed"


def test_a_short_password_does_not_garble_the_url_in_a_reason(server: ScriptedServer) -> None:
    server.answer("GET", "/api/connection", Answer(502, b"bad gateway 1", "text/plain"))
    api = OctoPrintApi(server.url.replace("http://", "http://proxy:1@"), KEY, 1)
    result = api.read()
    api.close()
    shown = server.url.replace("http://", "http://proxy:***@")
    assert result == Unreachable(f"HTTP 502 (GET {shown}/api/connection)")
