"""URLs of printer hosts: shown with the password masked, checked, compared by instance;
and, end to end, no channel of the real command and daemon showing a URL's password."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from reconnectd.urls import instance_of, mask_urls, shown_url, url_password, url_problem
from tests.support.daemon_process import DaemonProcess
from tests.support.scripted_octoprint import KEY, Answer, ScriptedServer, serve_state

REPO = Path(__file__).resolve().parents[1]
PASSWORD = "Pr0xy-pa55word"
EXAMPLE = "http://127.0.0.1:5000"


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        pytest.param("http://127.0.0.1:5000", "http://127.0.0.1:5000", id="no-credentials"),
        pytest.param("http://u:secret@h:5000/", "http://u:***@h:5000/", id="password"),
        pytest.param("https://u:@h", "https://u:***@h", id="empty-password"),
        pytest.param("http://T0KEN@h", "http://***@h", id="user-alone-masked-whole"),
        pytest.param("http://u:pa/ss@h", "http://u:***@h", id="slash-in-password"),
        pytest.param("http://u:p@ss@h/x", "http://u:***@h/x", id="at-in-password"),
        pytest.param("http://u:p?ss@h", "http://u:***@h", id="question-mark-in-password"),
        pytest.param("u:secret@h:5000", "u:***@h:5000", id="no-scheme"),
        pytest.param("gopher://u:secret@h", "gopher://u:***@h", id="other-scheme"),
    ],
)
def test_shown_url_masks_the_password_even_of_a_url_that_does_not_parse(
    url: str, shown: str
) -> None:
    assert shown_url(url) == shown
    assert shown_url(shown) == shown, "masking twice changes nothing"


def test_mask_urls_leaves_a_text_without_credentials_alone() -> None:
    text = "GET http://127.0.0.1:5000/api/connection: HTTP 200 (root@host said hi)"
    assert mask_urls(text) is text


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("http://u:p%2Fw@h", ["p%2Fw", "p/w"]),
        ("http://u:plain@h", ["plain"]),
        ("http://u:@h", []),
        ("http://u@h", []),
        ("http://h:5000", []),
    ],
)
def test_url_password_as_written_and_as_sent(url: str, password: list[str]) -> None:
    assert url_password(url) == password


@pytest.mark.parametrize(
    ("a", "b", "same"),
    [
        ("http://OctoPi.local", "http://octopi.local:80/", True),
        ("https://h/octoprint/", "https://h:443/octoprint", True),
        ("HTTP://u:p@h:5000", "http://h:5000", True),
        ("http://[::1]:5000", "http://[::1]:5000/", True),
        ("http://h:5000", "http://h:5001", False),
        ("http://h", "https://h", False),
        ("http://h/a", "http://h/A", False),
    ],
)
def test_instance_of_ignores_what_does_not_change_the_server(a: str, b: str, same: bool) -> None:
    assert (instance_of(a) == instance_of(b)) == same


def test_url_problem_prefers_the_credentials_problem_and_accepts_good_urls() -> None:
    assert url_problem("http://u:p%zz@h:99999", EXAMPLE) == (
        'the password has an invalid percent-escape: "%" must be followed by two hex'
        ' digits (a "%" itself is written %25)'
    )
    assert url_problem("ftp://u:p@h", EXAMPLE) == (
        f'expected an http:// or https:// URL with a host like "{EXAMPLE}"'
    )
    for good in ("http://h", "https://u:p%40w@h:8443/octoprint", "http://[::1]:5000"):
        assert url_problem(good, EXAMPLE) is None, good


# -- every channel, for real -----------------------------------------------------------


def reconnectd(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Given arguments, run ``python -m reconnectd`` from this checkout; return what it did."""
    return subprocess.run(
        [sys.executable, "-m", "reconnectd", *args],
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_no_output_shows_the_password_of_the_octoprint_url(
    server: ScriptedServer, tmp_path: Path
) -> None:
    """A reverse proxy's password in the URL: the check, the daemon's debug log, its
    status file and both forms of `status` show the URL with the password masked,
    while every request the daemon and the check send carries it."""
    serve_state(server)
    server.answer("POST", "/api/connection", Answer(400, {"error": "Invalid port"}))
    server.answer("GET", "/api/settings", Answer(200, {"plugins": {}}))
    url = server.url.replace("http://", f"http://proxy:{PASSWORD}@")
    shown = server.url.replace("http://", "http://proxy:***@")
    printer = '[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\nserial = "RECONNECTD_TEST_NONE"\n'
    config = f'[octoprint]\nurl = "{url}"\napi_key = "{KEY}"\n{printer}'
    path = tmp_path / "reconnectd.toml"
    path.write_text(config)
    path.chmod(0o600)
    keyless = tmp_path / "keyless.toml"
    keyless.write_text(f'[octoprint]\nurl = "{url}"\n{printer}')
    keyless.chmod(0o600)
    outputs: dict[str, str] = {}

    checked = reconnectd("--config", str(path), "check", "--online")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"{shown}: OK: state Closed" in checked.stdout
    outputs["check --online"] = checked.stdout + checked.stderr

    missing = reconnectd("--config", str(keyless), "check")
    assert missing.returncode == 78
    assert f"no API key for the OctoPrint at {shown}, which printer" in missing.stderr
    outputs["check without a key"] = missing.stdout + missing.stderr

    seen_by_check = len(server.script.seen)
    with DaemonProcess(tmp_path / "daemon", config) as daemon:
        deadline = time.monotonic() + 20
        while "runs no reconnect plugin" not in daemon.log() or not daemon.printer("mk3s"):
            assert daemon.running() and time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        status_env = {"RUNTIME_DIRECTORY": str(daemon.runtime_dir)}
        table = reconnectd("status", env=status_env)
        as_json = reconnectd("status", "--json", env=status_env)
        status_file = (daemon.runtime_dir / "status.json").read_text()
    outputs["debug log"] = daemon.log()
    assert table.returncode == 0 and as_json.returncode == 0, table.stderr + as_json.stderr
    outputs["status"] = table.stdout + table.stderr
    outputs["status --json"] = as_json.stdout + as_json.stderr

    for channel, text in outputs.items():
        assert PASSWORD not in text, f"{channel} shows the password:\n{text}"
    assert f"OctoPrint at {shown} runs no reconnect plugin" in outputs["debug log"]
    (row,) = json.loads(outputs["status --json"])["printers"]
    assert row["octoprint"] == shown
    # Masked where shown, sent where it belongs: every request carried it.
    basic = "Basic " + base64.b64encode(f"proxy:{PASSWORD}".encode()).decode()
    assert len(server.script.seen) > seen_by_check
    assert all(s.headers.get("Authorization") == basic for s in server.script.seen)
    # The file itself (mode 0644, for every user to read) holds the URL as shown.
    assert PASSWORD not in status_file, status_file
    (row,) = json.loads(status_file)["printers"]
    assert row["octoprint"] == shown
