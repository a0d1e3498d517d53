"""OctoPrint over https with a private CA: real TLS on loopback, real certificates.

A CA and a server certificate are made with the ``openssl`` command; a fake
OctoPrint answers over a real TLS socket, so every certificate check here is
OpenSSL's own. Without ``ca_file`` the certificate is refused, before the key is
sent, with a reason a person can read; with it, the same server works. The last
test runs the real daemon against it under umockdev.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconnectd.cli import EXIT_OK, EXIT_UNAVAILABLE, main
from reconnectd.host import Accepted, HostView, Unreachable
from reconnectd.octoprint_api import OctoPrintApi
from tests.support.daemon_process import DaemonProcess
from tests.support.fake_octoprint import FakeOctoPrint, ports_under, printer_under
from tests.support.printers import SimulatedPrinters
from tests.support.real import missing
from tests.support.testbed import Testbed, unavailable_reason
from tests.support.tls import HttpsServer, Pki, https_octoprint, make_pki

KEY = "TLS-k3y-0123456789abcdef0123456789"
PORT = "/dev/ttyACM0"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def other_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("other-pki"))


@pytest.fixture
def fake() -> Iterator[FakeOctoPrint]:
    with FakeOctoPrint(lambda: [PORT], lambda port: port, api_key=KEY) as octoprint:
        yield octoprint


@pytest.fixture
def server(fake: FakeOctoPrint, pki: Pki) -> Iterator[HttpsServer]:
    with https_octoprint(fake, pki) as https:
        yield https


def reason_of(result: object) -> str:
    assert isinstance(result, Unreachable), result
    return result.reason


# --- the client ------------------------------------------------------------------------


def test_private_ca_without_ca_file_is_refused_before_the_key_is_sent(
    server: HttpsServer, fake: FakeOctoPrint
) -> None:
    api = OctoPrintApi(server.url, KEY, 5.0)
    try:
        read = api.read()
        connect = api.connect(PORT, 115200, None)
    finally:
        api.close()
    assert reason_of(read) == (
        "certificate verify failed: unable to get local issuer certificate;"
        f" a certificate from a private CA needs ca_file (GET {server.url}/api/connection)"
    )
    assert reason_of(connect).startswith("certificate verify failed: ")
    assert fake.posts == []


def test_with_ca_file_the_same_server_works(
    server: HttpsServer, fake: FakeOctoPrint, pki: Pki
) -> None:
    api = OctoPrintApi(server.url, KEY, 5.0, ca_file=pki.ca)
    try:
        read = api.read()
        connect = api.connect(PORT, 115200, None)
    finally:
        api.close()
    assert isinstance(read, HostView), read
    assert (read.state, read.ports) == ("Closed", (PORT,))
    assert connect == Accepted()
    assert [post.port for post in fake.connects] == [PORT]


def test_ca_file_of_another_ca_says_so(server: HttpsServer, other_pki: Pki) -> None:
    api = OctoPrintApi(server.url, KEY, 5.0, ca_file=other_pki.ca)
    try:
        reason = reason_of(api.read())
    finally:
        api.close()
    assert reason == (
        "certificate verify failed: unable to get local issuer certificate;"
        f" not signed by a CA in {other_pki.ca} (GET {server.url}/api/connection)"
    )


def test_certificate_for_another_name_is_refused(fake: FakeOctoPrint, tmp_path: Path) -> None:
    named = make_pki(tmp_path / "pki", san="DNS:octopi.invalid")
    with https_octoprint(fake, named) as server:
        api = OctoPrintApi(server.url, KEY, 5.0, ca_file=named.ca)
        try:
            reason = reason_of(api.read())
        finally:
            api.close()
    assert reason == (
        "certificate verify failed: IP address mismatch, certificate is not valid for"
        f" '127.0.0.1'. (GET {server.url}/api/connection)"
    )


def test_https_to_a_plain_http_port_reads_plainly(fake: FakeOctoPrint, pki: Pki) -> None:
    url = fake.url.replace("http://", "https://")
    api = OctoPrintApi(url, KEY, 5.0, ca_file=pki.ca)
    try:
        reason = reason_of(api.read())
    finally:
        api.close()
    # OpenSSL's wording of the failure differs between versions; ours around it not.
    assert reason.startswith("TLS failed: ") and reason.endswith(f"(GET {url}/api/connection)")
    assert "_ssl.c" not in reason and "Pool" not in reason and "[SSL" not in reason
    assert len(reason) < 150


def test_requests_ca_bundle_does_not_replace_ca_file(
    server: HttpsServer, pki: Pki, other_pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    # requests lets $REQUESTS_CA_BUNDLE override a session's CA bundle.
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(other_pki.ca))
    api = OctoPrintApi(server.url, KEY, 5.0, ca_file=pki.ca)
    try:
        assert isinstance(api.read(), HostView)
    finally:
        api.close()


def test_ca_file_gone_after_start_is_unreachable_not_a_crash(
    server: HttpsServer, pki: Pki, tmp_path: Path
) -> None:
    ca_file = tmp_path / "ca.pem"
    shutil.copy(pki.ca, ca_file)
    api = OctoPrintApi(server.url, KEY, 5.0, ca_file=ca_file)
    ca_file.unlink()
    try:
        reason = reason_of(api.read())
    finally:
        api.close()
    # requests' own words, which name the file.
    assert reason.startswith("request failed: ") and str(ca_file) in reason


# --- check --online, with ca_file from the config ------------------------------------------


def test_check_online_verifies_with_ca_file_relative_to_the_config(
    server: HttpsServer, pki: Pki, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copy(pki.ca, tmp_path / "ca.pem")
    (tmp_path / "octoprint.key").write_text(KEY)
    (tmp_path / "octoprint.key").chmod(0o600)
    base = f'[octoprint]\nurl = "{server.url}"\napi_key_file = "octoprint.key"\n'
    printer = '\n[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\nproduct_id = "0002"\n'
    config = tmp_path / "reconnectd.toml"
    env = {"RECONNECTD_CONFIG": str(config)}

    config.write_text(base + printer)
    assert main(["check", "--online"], env) == EXIT_UNAVAILABLE
    out = capsys.readouterr().out
    assert f"{server.url}: unreachable: certificate verify failed: " in out

    config.write_text(base + 'ca_file = "ca.pem"\n' + printer)
    assert main(["check", "--online"], env) == EXIT_OK
    captured = capsys.readouterr()
    assert f"{server.url}: OK: state Closed; ports offered: {PORT}" in captured.out
    assert captured.err == ""


# --- the daemon -------------------------------------------------------------------------


@pytest.mark.umockdev
def test_daemon_connects_over_tls_and_warns_about_the_key_file_at_start_and_reload(
    pki: Pki, tmp_path: Path
) -> None:
    reason = unavailable_reason()
    if reason is not None:
        missing(reason)
    workdir = tmp_path / "daemon"
    workdir.mkdir()
    shutil.copy(pki.ca, workdir / "ca.pem")
    key_file = workdir / "octoprint.key"
    key_file.write_text(KEY)
    key_file.chmod(0o644)
    warning = f"{key_file}: readable by other users; run: chmod 600 {key_file}"
    with Testbed(tmp_path / "testbed") as testbed:
        printers = SimulatedPrinters(testbed)
        fake = FakeOctoPrint(ports_under(testbed.root), printer_under(testbed.root), api_key=KEY)
        try:
            with https_octoprint(fake, pki) as server:
                config = (
                    f'[octoprint]\nurl = "{server.url}"\n'
                    'api_key_file = "octoprint.key"\nca_file = "ca.pem"\n\n'
                    '[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\nsettle = 0.2\n'
                )
                printers.switch_on("TLS0001", firmware=False)
                with DaemonProcess(workdir, config, env=testbed.env) as daemon:
                    # The start-up reconciliation connects the present printer.
                    wait_for(lambda: len(fake.connects) == 1, "a connect", daemon)
                    assert daemon.log().count(warning) == 1, daemon.log()
                    daemon.signal(signal.SIGHUP)
                    wait_for(lambda: "reloading the config" in daemon.log(), "a reload", daemon)
                    assert daemon.log().count(warning) == 2, daemon.log()
                    assert "certificate verify failed" not in daemon.log()
                    assert KEY not in daemon.log()
        finally:
            printers.clear()
            fake.close()


def wait_for(
    condition: Callable[[], bool], what: str, daemon: DaemonProcess, timeout: float = 20
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert daemon.running(), daemon.log()
        assert time.monotonic() < deadline, f"no {what}\n{daemon.log()}"
        time.sleep(0.05)
