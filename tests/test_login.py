"""``reconnectd login``: the Application Keys workflow, the key file, the command end to end.

The workflow runs against a real OctoPrint 1.11.8. The person who clicks Allow or
Deny in the web UI is played by :class:`Approver`, which decides through the very
endpoint the UI's dialog posts to (``POST /plugin/appkeys/decision/<user_token>``,
as OctoPrint's admin); it acts from the injected sleep of the polling loop, so the
decision lands between two polls with no thread and no real waiting. Where OctoPrint
cannot take part (a closed port, a server without the workflow) a loopback server
of our own answers as OctoPrint would.
"""

from __future__ import annotations

import base64
import io
import os
import pwd
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests

from reconnectd import login
from reconnectd.cli import (
    EXIT_CANTCREAT,
    EXIT_CONFIG,
    EXIT_INTERRUPTED,
    EXIT_NOPERM,
    EXIT_OK,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    main,
)
from reconnectd.config import load_config
from reconnectd.login import (
    Failure,
    Granted,
    LoginFailed,
    Pacing,
    request_api_key,
    store_key,
)
from tests.support.octoprint_instance import OctoPrintInstance, free_port, octoprint_bin
from tests.support.real import missing
from tests.support.scripted_octoprint import Answer as ScriptedAnswer
from tests.support.scripted_octoprint import ScriptedServer

REPO = Path(__file__).resolve().parents[1]
KEY = "Ab3dE5gH1jK2mN4pQ6rS8tU0vW9xY7zA1bC3dE5fG7h"


def _service_user_here() -> bool:
    """Whether login, run by this test, gives key files to the ``reconnectd`` user."""
    if os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam(login.SERVICE_USER)
    except KeyError:
        return False
    return True


# Marked, and the fixtures skip (or fail under RECONNECTD_REQUIRE_REAL=1) without it.
real_octoprint = pytest.mark.octoprint


# -- helpers ---------------------------------------------------------------------


class FakeClock:
    """A monotonic clock that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Approver:
    """The person in OctoPrint's web UI: allows or denies reconnectd's pending request.

    Decides after the polling loop has slept ``after`` times (None: never), through
    the endpoint the UI's "Access Request" dialog uses, as OctoPrint's admin. Only
    requests made after it was created count: one a test left undecided stays in
    OctoPrint for 5 s.
    """

    def __init__(self, octoprint: OctoPrintInstance, allow: bool, after: int | None = 1) -> None:
        self.octoprint = octoprint
        self.allow = allow
        self.after = after
        self.clock = FakeClock()
        self.seen: list[dict[str, Any]] = []
        self._headers = {"X-Api-Key": octoprint.api_key}
        self._earlier = set(self._all_pending())

    @property
    def pacing(self) -> Pacing:
        return Pacing(clock=self.clock.clock, sleep=self.sleep)

    def pending(self) -> dict[str, dict[str, Any]]:
        """Return reconnectd's requests made since and still undecided, by user token."""
        pending = self._all_pending()
        return {token: p for token, p in pending.items() if token not in self._earlier}

    def _all_pending(self) -> dict[str, dict[str, Any]]:
        # What the web UI reads when a user logs in, to show its dialogs.
        answer = requests.get(
            f"{self.octoprint.url}/api/plugin/appkeys", headers=self._headers, timeout=10
        )
        answer.raise_for_status()
        pending: dict[str, dict[str, Any]] = answer.json()["pending"]
        return {token: p for token, p in pending.items() if p["app_id"] == login.APP_NAME}

    def decide(self) -> None:
        pending = self.pending()
        assert pending, "no pending request from reconnectd to decide"
        for token, request in pending.items():
            self.seen.append(request)
            answer = requests.post(
                f"{self.octoprint.url}/plugin/appkeys/decision/{token}",
                json={"decision": self.allow},
                headers=self._headers,
                timeout=10,
            )
            assert answer.status_code == 204, answer.text

    def sleep(self, seconds: float) -> None:
        self.clock.sleep(seconds)
        if self.after is not None and len(self.clock.sleeps) == self.after:
            self.decide()


def key_works(url: str, key: str) -> int:
    """Return the status of ``GET /api/connection`` with ``key``."""
    return requests.get(f"{url}/api/connection", headers={"X-Api-Key": key}, timeout=10).status_code


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


class NotOctoPrint(ThreadingHTTPServer):
    """A loopback server answering every request as OctoPrint does a path it does not know.

    OctoPrint 1.11.8 with the appkeys plugin disabled answers the probe exactly so:
    404, text/html, Flask's stock page. It records each request line.
    """

    def __init__(self) -> None:
        self.requests: list[str] = []
        super().__init__(("127.0.0.1", 0), _NotFoundHandler)
        self.url = f"http://127.0.0.1:{self.server_address[1]}"


class _NotFoundHandler(BaseHTTPRequestHandler):
    server: NotOctoPrint
    PAGE = (
        b"<!doctype html>\n<html lang=en>\n<title>404 Not Found</title>\n<h1>Not Found</h1>\n"
        b"<p>The requested URL was not found on the server. If you entered the URL manually"
        b" please check your spelling and try again.</p>\n"
    )

    def _answer(self) -> None:
        self.server.requests.append(f"{self.command} {self.path}")
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.send_response(404)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(self.PAGE)))
        self.end_headers()
        self.wfile.write(self.PAGE)

    do_GET = do_POST = _answer

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def not_octoprint() -> Iterator[NotOctoPrint]:
    server = NotOctoPrint()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class _OctoPrintForLogin(OctoPrintInstance):
    """OctoPrint with its rate limiter off: these tests ask for more than 3 keys a minute."""

    def _write_basedir(self) -> None:
        super()._write_basedir()
        setting = ["--bool", "devel.enableRateLimiter", "false"]
        subprocess.run(
            [self.octoprint_bin, "--basedir", str(self.basedir), "config", "set", *setting],
            check=True,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=60,
        )


def _require_octoprint() -> None:
    if not Path(octoprint_bin()).exists():
        missing(f"no OctoPrint at {octoprint_bin()} (tests/bootstrap installs it)")


@pytest.fixture(scope="module")
def octoprint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OctoPrintInstance]:
    _require_octoprint()
    with _OctoPrintForLogin(tmp_path_factory.mktemp("octoprint-login")) as instance:
        yield instance


@pytest.fixture(scope="module")
def limited_octoprint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OctoPrintInstance]:
    """OctoPrint as shipped: 3 key requests a minute from one address, then 429."""
    _require_octoprint()
    with OctoPrintInstance(tmp_path_factory.mktemp("octoprint-limited")) as instance:
        yield instance


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reconnectd.toml"
    path.write_text(text)
    return path


# -- the workflow against a real OctoPrint ----------------------------------------------


@real_octoprint
def test_approved_request_gives_a_key_that_works(octoprint: OctoPrintInstance) -> None:
    approver = Approver(octoprint, allow=True, after=2)
    out = io.StringIO()
    result = request_api_key(octoprint.url, out, pacing=approver.pacing)
    assert isinstance(result, Granted)
    assert key_works(octoprint.url, result.api_key) == 200
    assert result.api_key != octoprint.api_key
    # One request, from us, for no user in particular; polled once a second.
    assert [(r["app_id"], r["user_id"], r["remote_address"]) for r in approver.seen] == [
        ("reconnectd", None, "127.0.0.1")
    ]
    assert approver.clock.sleeps == [1.0, 1.0]
    text = out.getvalue()
    assert f"Open OctoPrint at {octoprint.url} in a browser" in text
    assert 'whether "reconnectd" may access it ("Access Request"). Click Allow.' in text
    assert "Waiting for the decision: 5:00 left\n" in text
    assert result.api_key not in text
    assert result.api_key not in repr(result)


@real_octoprint
def test_request_for_a_named_user(octoprint: OctoPrintInstance) -> None:
    approver = Approver(octoprint, allow=True)
    out = io.StringIO()
    result = request_api_key(octoprint.url, out, user="admin", pacing=approver.pacing)
    assert isinstance(result, Granted)
    assert [r["user_id"] for r in approver.seen] == ["admin"]
    assert 'logged in as "admin"' in out.getvalue()
    assert key_works(octoprint.url, result.api_key) == 200


@real_octoprint
def test_denied_request(octoprint: OctoPrintInstance) -> None:
    approver = Approver(octoprint, allow=False)
    result = request_api_key(octoprint.url, io.StringIO(), pacing=approver.pacing)
    assert result == LoginFailed(
        Failure.DENIED,
        f"the request was denied in OctoPrint at {octoprint.url} (or OctoPrint dropped it:"
        " it forgets a request after 10 minutes, and when it restarts)",
    )


@real_octoprint
def test_no_decision_times_out_on_the_injected_clock(octoprint: OctoPrintInstance) -> None:
    approver = Approver(octoprint, allow=True, after=None)
    pacing = Pacing(clock=approver.clock.clock, sleep=approver.sleep, timeout=65)
    out = io.StringIO()
    result = request_api_key(octoprint.url, out, pacing=pacing)
    assert result == LoginFailed(
        Failure.TIMED_OUT,
        "no decision within 65 s; the request is withdrawn."
        " Run reconnectd login again when you can approve it",
    )
    # Polled once a fake second until the deadline, and OctoPrint still waits for a
    # decision then: the timeout is ours, not OctoPrint's.
    assert approver.clock.sleeps == [1.0] * 65
    assert len(approver.pending()) >= 1
    # Without a terminal, a line every 30 s rather than one per poll.
    progress = [line for line in out.getvalue().splitlines() if line.startswith("Waiting")]
    assert progress == [
        "Waiting for the decision: 1:05 left",
        "Waiting for the decision: 0:35 left",
        "Waiting for the decision: 0:05 left",
    ]


@real_octoprint
def test_progress_is_one_line_redrawn_on_a_terminal(octoprint: OctoPrintInstance) -> None:
    approver = Approver(octoprint, allow=True, after=3)
    out = FakeTty()
    result = request_api_key(octoprint.url, out, pacing=approver.pacing)
    assert isinstance(result, Granted)
    text = out.getvalue()
    assert (
        "\rWaiting for the decision: 5:00 left \rWaiting for the decision: 4:59 left "
        "\rWaiting for the decision: 4:58 left \rWaiting for the decision: approved."
    ) in text
    # Padded to cover the one character more of the line it replaces.
    assert text.endswith("\rWaiting for the decision: approved. \n")


@real_octoprint
def test_polling_keeps_the_request_alive_past_octoprints_5_s(
    octoprint: OctoPrintInstance,
) -> None:
    # OctoPrint drops a request nobody polls for 5 s; its clock cannot be injected,
    # so this one waits for real: approved after 7 s of polling once a second.
    decided: list[float] = []
    start = time.monotonic()
    approver = Approver(octoprint, allow=True, after=None)

    def sleep(seconds: float) -> None:
        time.sleep(seconds)
        if not decided and time.monotonic() - start >= 7:
            decided.append(time.monotonic() - start)
            approver.decide()

    result = request_api_key(octoprint.url, io.StringIO(), pacing=Pacing(sleep=sleep))
    assert decided, "the loop ended before the approval"
    assert isinstance(result, Granted)


@real_octoprint
def test_too_many_requests(
    limited_octoprint: OctoPrintInstance, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for _ in range(3):
        answer = requests.post(
            f"{limited_octoprint.url}/plugin/appkeys/request", json={"app": "other"}, timeout=10
        )
        assert answer.status_code == 201
    argv = ["--config", str(tmp_path / "none.toml"), "login", "--url", limited_octoprint.url]
    assert main(argv, {}) == EXIT_UNAVAILABLE
    err = capsys.readouterr().err
    assert err == (
        f"reconnectd login: OctoPrint at {limited_octoprint.url} refuses more key requests for"
        " now (it takes 3 a minute, 5 in ten minutes and 10 an hour); try again in a few"
        " minutes\n"
    )
    assert not (tmp_path / "octoprint.key").exists()
    assert not (tmp_path / "none.toml").exists()


# -- the command, end to end ----------------------------------------------------------


@real_octoprint
def test_login_stores_the_key_and_points_the_config_at_it(
    octoprint: OctoPrintInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    old_key = "0ld-k3y-that-no-longer-works"
    config = write_config(
        tmp_path,
        "# my printer farm\n"
        "[octoprint]\n"
        f'url = "{octoprint.url}"   # the local one\n'
        f'api_key = "{old_key}"  # pasted by hand\n'
        "timeout = 5\n",
    )
    approver = Approver(octoprint, allow=True)
    monkeypatch.setattr(login, "PACING", approver.pacing)
    assert main(["--config", str(config), "login"], {}) == EXIT_OK

    key_file = tmp_path / "octoprint.key"
    key = key_file.read_text()
    assert key.endswith("\n") and key.count("\n") == 1
    key = key.strip()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert key_works(octoprint.url, key) == 200
    assert config.read_text() == (
        "# my printer farm\n"
        "[octoprint]\n"
        f'url = "{octoprint.url}"   # the local one\n'
        f'api_key_file = "{key_file}"  # pasted by hand\n'
        "timeout = 5\n"
    )
    loaded = load_config(str(config), {})
    assert loaded.octoprint.api_key == key
    assert loaded.octoprint.api_key_file == key_file
    captured = capsys.readouterr()
    owner = ", owner reconnectd" if _service_user_here() else ""
    assert captured.out.endswith(
        f"Stored the key in {key_file} (mode 0600{owner}).\n"
        f"Updated {config}: the [octoprint] table reads the key from the file"
        " (its api_key line is gone).\n"
        "Then: sudo systemctl reload reconnectd; reconnectd check --online tells whether"
        " the key may connect the printer.\n"
    )
    assert captured.err == ""
    assert key not in captured.out + captured.err
    assert old_key not in captured.out + captured.err


@real_octoprint
def test_login_denied_changes_nothing(
    octoprint: OctoPrintInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    text = f'[octoprint]\nurl = "{octoprint.url}"\napi_key = "0ld-k3y"\n'
    config = write_config(tmp_path, text)
    monkeypatch.setattr(login, "PACING", Approver(octoprint, allow=False).pacing)
    assert main(["--config", str(config), "login"], {}) == EXIT_NOPERM
    assert capsys.readouterr().err.startswith(
        f"reconnectd login: the request was denied in OctoPrint at {octoprint.url}"
    )
    assert config.read_text() == text
    assert not (tmp_path / "octoprint.key").exists()


@real_octoprint
def test_login_timed_out_exits_77(
    octoprint: OctoPrintInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    approver = Approver(octoprint, allow=True, after=None)
    pacing = Pacing(clock=approver.clock.clock, sleep=approver.sleep, timeout=3)
    monkeypatch.setattr(login, "PACING", pacing)
    argv = ["--config", str(tmp_path / "reconnectd.toml"), "login", "--url", octoprint.url]
    assert main(argv, {}) == EXIT_NOPERM
    assert "reconnectd login: no decision within 3 s" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def _ctrl_c_as_at_a_terminal() -> None:
    # A command typed at a terminal has Ctrl-C's default disposition. A test run started
    # in the background by a shell without job control inherits SIGINT ignored, and
    # Python then installs no KeyboardInterrupt for it.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _reconnectd(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reconnectd", *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_ctrl_c_as_at_a_terminal,
    )


def _wait_for_pending(approver: Approver, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while not approver.pending():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "reconnectd login never asked OctoPrint"
        time.sleep(0.05)


@real_octoprint
def test_login_process_with_a_person_clicking_allow(
    octoprint: OctoPrintInstance, tmp_path: Path
) -> None:
    # No config file yet: login creates one that points at the key.
    config = tmp_path / "etc" / "reconnectd.toml"
    process = _reconnectd(tmp_path, "--config", str(config), "login", "--url", octoprint.url)
    approver = Approver(octoprint, allow=True)
    _wait_for_pending(approver, process)
    approver.decide()
    out, err = process.communicate(timeout=60)
    assert process.returncode == EXIT_OK, err
    key_file = tmp_path / "etc" / "octoprint.key"
    key = key_file.read_text().strip()
    assert key_works(octoprint.url, key) == 200
    assert key not in out + err
    loaded = load_config(str(config), {})
    assert (loaded.octoprint.url, loaded.octoprint.api_key) == (octoprint.url, key)
    assert loaded.zero_config


@real_octoprint
def test_ctrl_c_while_waiting(octoprint: OctoPrintInstance, tmp_path: Path) -> None:
    config = tmp_path / "reconnectd.toml"
    process = _reconnectd(tmp_path, "--config", str(config), "login", "--url", octoprint.url)
    _wait_for_pending(Approver(octoprint, allow=True), process)
    process.send_signal(signal.SIGINT)
    out, err = process.communicate(timeout=30)
    assert process.returncode == EXIT_INTERRUPTED
    assert err == "reconnectd login: interrupted; no key was stored.\n"
    assert "Traceback" not in out
    assert list(tmp_path.iterdir()) == []


# -- the command without OctoPrint ------------------------------------------------------


def test_unreachable_octoprint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["--config", str(tmp_path / "reconnectd.toml"), "login", "--url", url]
    assert main(argv, {}) == EXIT_UNAVAILABLE
    captured = capsys.readouterr()
    assert (
        captured.err == f"reconnectd login: cannot reach OctoPrint at {url}: connection refused\n"
    )
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_the_configs_url_is_the_default(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    config = write_config(tmp_path, f'[octoprint]\nurl = "{url}/"\n')
    assert main(["--config", str(config), "login"], {}) == EXIT_UNAVAILABLE
    assert f"cannot reach OctoPrint at {url}: connection refused" in capsys.readouterr().err


def test_no_workflow_tells_how_to_copy_a_key_by_hand(
    not_octoprint: NotOctoPrint, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f'[octoprint]\nurl = "{not_octoprint.url}"\n')
    assert main(["--config", str(config), "login"], {}) == EXIT_UNAVAILABLE
    key_file = tmp_path / "octoprint.key"
    assert capsys.readouterr().err == (
        f"reconnectd login: OctoPrint at {not_octoprint.url} does not offer the Application"
        " Keys workflow (GET /plugin/appkeys/probe answered HTTP 404, not 204)\n"
        "Copy a key by hand instead: in OctoPrint open User Settings > Application Keys,"
        ' generate a key for "reconnectd" and copy it. Then write it to the key file with\n'
        f"    sudo sh -c 'umask 077 && cat > {key_file}'\n"
        "paste the key, press Enter and then Ctrl-D.\n"
        + (
            f"Let the service read it: sudo chown reconnectd: {key_file}\n"
            if _service_user_here()
            else ""
        )
        + f'Point the config at it: api_key_file = "{key_file}" in the [octoprint] table of'
        f" {config}.\n"
    )
    # Asked once whether the workflow is there, and nothing else.
    assert not_octoprint.requests == ["GET /plugin/appkeys/probe"]
    assert not key_file.exists()


@pytest.mark.parametrize("url", ["ftp://127.0.0.1:5000", "127.0.0.1:5000", "http://"])
def test_a_bad_url_is_a_usage_error(
    url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(tmp_path / "c.toml"), "login", "--url", url]
    assert main(argv, {}) == EXIT_USAGE
    assert capsys.readouterr().err == (
        "reconnectd login: --url: expected an http:// or https:// URL with a host like"
        ' "http://127.0.0.1:5000"\n'
    )


def test_a_config_that_is_not_toml_needs_url(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, "[octoprint\n")
    assert main(["--config", str(config), "login"], {}) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert err.startswith(f"{config}: not valid TOML: ")
    assert err.endswith("\nFix the file, or name OctoPrint with --url.\n")


def test_an_unwritable_key_file_is_refused_before_asking(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    key_file = tmp_path / "file" / "octoprint.key"
    # A closed port: had login asked OctoPrint first, it would exit 69.
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["--config", str(tmp_path / "c.toml"), "login", "--url", url]
    assert main([*argv, "--key-file", str(key_file)], {}) == EXIT_CANTCREAT
    assert capsys.readouterr().err == (
        f'reconnectd login: cannot write the key to "{key_file}":'
        f" {tmp_path / 'file'} is not a directory\n"
    )


# -- a user name and password in the URL (basic auth in front of OctoPrint) -------------

PASSWORD = "Pr0xy-pa55word"


def test_the_url_password_is_never_printed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"http://proxy:{PASSWORD}@127.0.0.1:{free_port()}"
    argv = ["--config", str(tmp_path / "reconnectd.toml"), "login", "--url", url]
    assert main(argv, {}) == EXIT_UNAVAILABLE
    captured = capsys.readouterr()
    assert captured.err == (
        "reconnectd login: cannot reach OctoPrint at"
        f" {url.replace(PASSWORD, '***')}: connection refused\n"
    )
    assert PASSWORD not in captured.out + captured.err


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        (
            f"http://:{PASSWORD}@127.0.0.1:5000",
            'the user name before ":" is empty; HTTP basic auth needs one,'
            ' got "http://:***@127.0.0.1:5000"',
        ),
        (
            f"http://proxy:{PASSWORD}%E2%82%AC@127.0.0.1:5000",
            "the password holds a character outside Latin-1, which requests cannot send in"
            ' HTTP basic auth, got "http://proxy:***@127.0.0.1:5000"',
        ),
    ],
)
def test_a_url_whose_credentials_basic_auth_cannot_carry_is_a_usage_error(
    url: str, problem: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--config", str(tmp_path / "c.toml"), "login", "--url", url]
    assert main(argv, {}) == EXIT_USAGE
    assert capsys.readouterr().err == f"reconnectd login: --url: {problem}\n"


def test_the_configs_url_with_unusable_credentials_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path, f'[octoprint]\nurl = "http://proxy:{PASSWORD}%zz@h"\n')
    assert main(["--config", str(config), "login"], {}) == EXIT_CONFIG
    assert capsys.readouterr().err == (
        f'{config}: octoprint.url: the password has an invalid percent-escape: "%" must be'
        ' followed by two hex digits (a "%" itself is written %25), got "http://proxy:***@h"\n'
        "Fix the file, or name OctoPrint with --url.\n"
    )


def test_every_request_carries_the_urls_credentials_also_to_the_absolute_poll_url(
    server: ScriptedServer,
) -> None:
    """OctoPrint answers the key request with an absolute Location of its own, without
    the user name and password: the proxy in front would refuse every poll."""
    server.answer("GET", login.PROBE_PATH, ScriptedAnswer(204))
    poll = f"{login.REQUEST_PATH}/T0KEN"
    server.answer(
        "POST",
        login.REQUEST_PATH,
        ScriptedAnswer(201, {"app_token": "T0KEN"}, headers={"Location": server.url + poll}),
    )
    server.answer("GET", poll, ScriptedAnswer(200, {"api_key": KEY}))
    url = server.url.replace("http://", f"http://proxy:{PASSWORD}@")
    out = io.StringIO()
    assert request_api_key(url, out, pacing=Pacing(clock=FakeClock().clock)) == Granted(KEY)
    basic = "Basic " + base64.b64encode(f"proxy:{PASSWORD}".encode()).decode()
    assert [(s.method, s.path, s.headers.get("Authorization")) for s in server.script.seen] == [
        ("GET", login.PROBE_PATH, basic),
        ("POST", login.REQUEST_PATH, basic),
        ("GET", poll, basic),
    ]
    assert PASSWORD not in out.getvalue()
    assert f"Open OctoPrint at {url.replace(PASSWORD, '***')} in a browser" in out.getvalue()


def test_a_poll_url_on_another_server_gets_no_credentials(server: ScriptedServer) -> None:
    server.answer("GET", login.PROBE_PATH, ScriptedAnswer(204))
    elsewhere = f"http://localhost:{server.url.rsplit(':', 1)[1]}{login.REQUEST_PATH}/T0KEN"
    server.answer("POST", login.REQUEST_PATH, ScriptedAnswer(201, headers={"Location": elsewhere}))
    server.answer("GET", f"{login.REQUEST_PATH}/T0KEN", ScriptedAnswer(200, {"api_key": KEY}))
    url = server.url.replace("http://", f"http://proxy:{PASSWORD}@")
    assert request_api_key(url, io.StringIO(), pacing=Pacing(clock=FakeClock().clock)) == Granted(
        KEY
    )
    assert [s.headers.get("Authorization") is not None for s in server.script.seen] == [
        True,
        True,
        False,
    ]


# -- the key file ------------------------------------------------------------------


def test_key_file_mode_0600_and_content(tmp_path: Path) -> None:
    old_umask = os.umask(0)  # nothing may rely on the umask for the mode
    try:
        key_file = tmp_path / "new" / "dir" / "octoprint.key"
        assert store_key(key_file, KEY, service_user=None) is None
    finally:
        os.umask(old_umask)
    assert key_file.read_text() == KEY + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(key_file.parent.stat().st_mode) == 0o755
    assert [p.name for p in key_file.parent.iterdir()] == ["octoprint.key"]


def test_key_file_replaces_a_readable_old_one(tmp_path: Path) -> None:
    key_file = tmp_path / "octoprint.key"
    key_file.write_text("old\n")
    key_file.chmod(0o644)
    store_key(key_file, KEY, service_user=None)
    assert key_file.read_text() == KEY + "\n"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["octoprint.key"]


def test_key_file_goes_to_the_service_user(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("giving a file away needs root")
    nobody = pwd.getpwnam("nobody")
    key_file = tmp_path / "octoprint.key"
    assert store_key(key_file, KEY, service_user="nobody") == "nobody"
    info = key_file.stat()
    assert (info.st_uid, info.st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert stat.S_IMODE(info.st_mode) == 0o600
    # A service user that does not exist: the file stays the caller's.
    other = tmp_path / "other.key"
    assert store_key(other, KEY, service_user="no-such-user-reconnectd") is None
    assert other.stat().st_uid == os.geteuid()
