"""The shipped systemd unit, checked by systemd's own tools (no running systemd needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "reconnectd.service"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed"
)


def parse_unit(text: str) -> list[tuple[str, str, str]]:
    """Given a unit file's text, return its (section, key, value) entries in order.

    Keys may repeat (``SystemCallFilter=``), so this is a list, not a mapping.
    """
    entries: list[tuple[str, str, str]] = []
    section = ""
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, sep, value = line.partition("=")
        assert sep, f"not a key=value line: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries


def values(entries: list[tuple[str, str, str]], section: str, key: str) -> list[str]:
    return [v for s, k, v in entries if s == section and k == key]


def executable_command() -> str:
    """Return a command that runs reconnectd on this machine, without arguments."""
    script = Path(sys.executable).parent / "reconnectd"
    if script.is_file():
        return str(script)
    return f"{sys.executable} -m reconnectd"


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """A copy of the unit whose ExecStart= and ExecReload= name an installed executable.

    ``systemd-analyze verify`` checks that each command exists; the shipped
    /usr/local/bin/reconnectd does not exist here.
    """
    text = UNIT.read_text(encoding="utf-8")
    text, count = re.subn(
        r"^(Exec\w+=)/usr/local/bin/reconnectd\b",
        lambda match: match.group(1) + executable_command(),
        text,
        flags=re.MULTILINE,
    )
    assert count == 2
    path = tmp_path / "reconnectd.service"
    path.write_text(text, encoding="utf-8")
    return path


def verify(path: Path) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE is not None
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(path)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_contract_keys() -> None:
    entries = parse_unit(UNIT.read_text(encoding="utf-8"))
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "ExecStart": ["/usr/local/bin/reconnectd run"],
        # The config is checked as the service user before the daemon is signalled.
        "ExecReload": ["/usr/local/bin/reconnectd check", "/bin/kill -HUP $MAINPID"],
        "WatchdogSec": ["30"],
        "Restart": ["on-failure"],
        "RestartSec": ["5"],
        "RestartPreventExitStatus": ["78"],
        "RuntimeDirectory": ["reconnectd"],
        "StateDirectory": ["reconnectd"],
    }
    for key, value in expected.items():
        assert values(entries, "Service", key) == value, key
    assert values(entries, "Unit", "Wants") == ["network-online.target"]
    assert values(entries, "Unit", "After") == ["network-online.target octoprint.service"]
    assert values(entries, "Install", "WantedBy") == ["multi-user.target"]


def test_hardening_keeps_what_the_daemon_needs() -> None:
    entries = parse_unit(UNIT.read_text(encoding="utf-8"))
    service = {k: v for s, k, v in entries if s == "Service"}
    # An unprivileged user of its own with no capabilities; its group reads the keys.
    assert service["User"] == "reconnectd" and service["Group"] == "reconnectd"
    assert "DynamicUser" not in service
    assert service["CapabilityBoundingSet"] == "" and service["AmbientCapabilities"] == ""
    families = service["RestrictAddressFamilies"].split()
    assert sorted(families) == ["AF_INET", "AF_INET6", "AF_NETLINK", "AF_UNIX"]
    # Each would cut the daemon off from /sys, /run/udev, udev's netlink or /etc.
    for key in ("PrivateNetwork", "PrivateUsers", "InaccessiblePaths", "TemporaryFileSystem"):
        assert key not in service, key
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"


def test_every_hardening_line_has_a_reason() -> None:
    """Each setting, or each small group of related ones, sits under its comment."""
    text = UNIT.read_text(encoding="utf-8")
    lines = text.split("\n# --- Hardening", 1)[1].split("\n[Install]", 1)[0].splitlines()[1:]
    group = 0
    for line in lines:
        if not line:
            group = -1  # a blank line ends the group its comment covered
        elif line.startswith("#"):
            group = 0
        else:
            key = line.split("=", 1)[0]
            assert group >= 0, f"{key}= has no comment saying why"
            group += 1
            assert group <= 5, f"{key}= shares one comment with too many others"


def test_parse_unit_joins_continuations_and_keeps_repeats() -> None:
    text = "[Service]\n# c\nA=1 \\\n  2\nB=x\nB=y\n"
    assert parse_unit(text) == [
        ("Service", "A", "1 2"),
        ("Service", "B", "x"),
        ("Service", "B", "y"),
    ]


@needs_systemd_analyze
def test_systemd_analyze_verify(testable_unit: Path) -> None:
    result = verify(testable_unit)
    print(result.stdout, result.stderr, sep="\n")
    assert result.returncode == 0
    about_unit = [line for line in result.stderr.splitlines() if testable_unit.name in line]
    assert about_unit == []


@needs_systemd_analyze
def test_systemd_analyze_verify_would_see_a_mistake(testable_unit: Path) -> None:
    """The check above means something: a bad key is reported on stderr."""
    text = testable_unit.read_text(encoding="utf-8")
    testable_unit.write_text(text.replace("WatchdogSec=30", "WatchdogSecs=30"), encoding="utf-8")
    result = verify(testable_unit)
    assert re.search(r"reconnectd\.service:\d+: Unknown key 'WatchdogSecs'", result.stderr)


@needs_systemd_analyze
def test_systemd_analyze_security(testable_unit: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=yes", str(testable_unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    rating = re.search(
        r"Overall exposure level for reconnectd\.service: (\d+\.\d+) (\w+)", result.stdout
    )
    assert result.returncode == 0, result.stderr
    assert rating is not None, result.stdout + result.stderr
    # The bar: 2.0 or lower, which systemd itself calls "OK".
    assert float(rating.group(1)) <= 2.0, rating.group(0)
    assert rating.group(2) == "OK", rating.group(0)
