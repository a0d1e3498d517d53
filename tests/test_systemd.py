"""The sd_notify client, against a real datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconnectd.systemd import Notifier


class FakeSystemd:
    """A bound ``AF_UNIX`` datagram socket, read the way systemd reads it."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        self.sock = sock
        self.notify_socket = notify_socket

    def receive(self) -> str:
        """Return the next datagram as text; fail the test if none arrives."""
        return self.sock.recv(65536).decode("utf-8")

    def nothing_pending(self) -> bool:
        """Return whether no datagram is waiting."""
        self.sock.setblocking(False)
        try:
            self.sock.recv(65536)
        except BlockingIOError:
            return True
        finally:
            self.sock.settimeout(2.0)
        return False


def _bound(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(2.0)
    return sock


@pytest.fixture
def systemd(tmp_path: Path) -> Iterator[FakeSystemd]:
    path = tmp_path / "notify"
    sock = _bound(str(path))
    yield FakeSystemd(sock, str(path))
    sock.close()


@pytest.fixture
def abstract_systemd() -> Iterator[FakeSystemd]:
    name = f"reconnectd-test-{uuid.uuid4().hex}"
    sock = _bound("\0" + name)
    yield FakeSystemd(sock, "@" + name)
    sock.close()


def test_ready_sends_ready_and_status(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.notify_socket})
    notifier.ready("mk3s: operational")
    assert systemd.receive() == "READY=1\nSTATUS=mk3s: operational"


def test_abstract_socket(abstract_systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": abstract_systemd.notify_socket})
    notifier.ready("up")
    notifier.watchdog_ping()
    assert abstract_systemd.receive() == "READY=1\nSTATUS=up"
    assert abstract_systemd.receive() == "WATCHDOG=1"


def test_status_is_one_line_and_utf8(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.notify_socket})
    notifier.status("mk3s: operational\n  ender: holding…\r\nprusa")
    assert systemd.receive() == "STATUS=mk3s: operational ender: holding… prusa"


def test_status_unchanged_is_not_sent_again(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.notify_socket})
    notifier.ready("a")
    notifier.status("a")
    notifier.status("b")
    notifier.status("b")
    notifier.status("a")
    assert systemd.receive() == "READY=1\nSTATUS=a"
    assert systemd.receive() == "STATUS=b"
    assert systemd.receive() == "STATUS=a"
    assert systemd.nothing_pending()


def test_reloading_carries_monotonic_usec(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.notify_socket})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", systemd.receive())
    assert match is not None
    assert before <= int(match.group(1)) <= after


def test_stopping_and_watchdog(systemd: FakeSystemd) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": systemd.notify_socket})
    notifier.stopping()
    notifier.watchdog_ping()
    assert systemd.receive() == "STOPPING=1"
    assert systemd.receive() == "WATCHDOG=1"


def test_without_notify_socket_nothing_happens() -> None:
    notifier = Notifier({})
    assert not notifier.enabled
    notifier.ready("x")
    notifier.status("y")
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog_ping()


def test_default_environment_is_os_environ(
    systemd: FakeSystemd, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", systemd.notify_socket)
    Notifier().stopping()
    assert systemd.receive() == "STOPPING=1"


def test_unsupported_address_warns_and_sends_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    notifier.ready("x")
    assert "not a unix socket" in caplog.text


def test_send_failure_warns_once_and_rearms(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify"
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    with caplog.at_level(logging.INFO, logger="reconnectd.systemd"):
        notifier.status("a")  # nobody listening: must not raise
        notifier.status("a")  # not recorded as sent, so tried again
        notifier.watchdog_ping()
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        assert re.search(r"cannot notify systemd \(.*notify\)", warnings[0].getMessage())

        sock = _bound(str(path))
        try:
            notifier.status("a")
            assert sock.recv(100) == b"STATUS=a"
        finally:
            sock.close()
        assert "works again" in caplog.records[-1].getMessage()

        path.unlink()
        notifier.status("b")
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 2


def test_survives_systemd_rebinding(tmp_path: Path) -> None:
    path = tmp_path / "notify"
    first = _bound(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    notifier.status("a")
    assert first.recv(100) == b"STATUS=a"
    first.close()
    path.unlink()
    second = _bound(str(path))
    try:
        notifier.status("b")
        assert second.recv(100) == b"STATUS=b"
    finally:
        second.close()


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{pid}"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "{other}"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "nope"}, None),
        ({"WATCHDOG_PID": "{pid}"}, None),
        ({}, None),
        ({"WATCHDOG_USEC": ""}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "1.5"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    pid = os.getpid()
    env = {k: v.format(pid=pid, other=pid + 1) for k, v in environ.items()}
    assert Notifier(env).watchdog_interval == expected


def test_a_full_notify_queue_never_blocks_and_the_status_is_sent_again(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """systemd slow to read: sends fail at once instead of stalling the main loop."""
    path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    notifier = Notifier({"NOTIFY_SOCKET": str(path)})
    started = time.monotonic()
    for n in range(2000):  # far more than an unread datagram queue holds
        notifier.status(f"printer {n}")
    assert time.monotonic() - started < 1.0, "sending must not wait for systemd"
    full = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    # The queue filled (so the re-send below is real), and that was logged once per
    # run of failures, never once per failed message.
    assert 1 <= len(full) <= 10, len(full)
    receiver.setblocking(False)
    while True:  # systemd catches up
        try:
            receiver.recv(65536)
        except BlockingIOError:
            break
    notifier.status("printer 1999")  # the same line again: it did not get through before
    receiver.settimeout(2.0)
    assert receiver.recv(65536) == b"STATUS=printer 1999"
    receiver.close()
