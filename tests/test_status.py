"""The status document: its paths, its summary line, its table, and reading it back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconnectd.jsonfiles import write_json_atomic
from reconnectd.status import (
    SUMMARY_MAX,
    StatusUnavailable,
    iso_utc,
    load_status,
    render_table,
    state_dir,
    status_path,
    summary_line,
)

MK3S: dict[str, object] = {
    "name": "mk3s",
    "state": "operational",
    "device": "/dev/ttyACM0",
    "octoprint": "http://127.0.0.1:5000",
    "decision": "connect",
    "reason": "device came back",
    "at": "2026-11-23T12:04:58Z",
    "holds": [],
    "attempts": 1,
}
ENDER: dict[str, object] = {
    "name": "ender",
    "state": "closed",
    "device": "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0",
    "octoprint": "http://127.0.0.1:5001",
    "decision": "none",
    "reason": "OctoPrint was disconnected by hand",
    "at": "2026-11-23T12:01:10Z",
    "holds": ["manual disconnect"],
    "attempts": 0,
}


def _document(pid: int, printers: list[dict[str, object]]) -> dict[str, object]:
    return {
        "version": 1,
        "pid": pid,
        "started": "2026-11-23T12:00:00Z",
        "updated": "2026-11-23T12:05:00Z",
        "dry_run": False,
        "printers": printers,
    }


def _dead_pid() -> int:
    """Return the pid of a process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "/run/reconnectd/status.json"),
        ({"RUNTIME_DIRECTORY": ""}, "/run/reconnectd/status.json"),
        ({"RUNTIME_DIRECTORY": "/run/other"}, "/run/other/status.json"),
        ({"RUNTIME_DIRECTORY": "/run/a:/run/b"}, "/run/a/status.json"),
    ],
)
def test_status_path(environ: dict[str, str], expected: str) -> None:
    assert status_path(environ) == Path(expected)


def test_status_path_defaults_to_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/x")
    assert status_path() == Path("/run/x/status.json")


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "/var/lib/reconnectd"),
        ({"STATE_DIRECTORY": "/var/lib/private/reconnectd"}, "/var/lib/private/reconnectd"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a"),
    ],
)
def test_state_dir(environ: dict[str, str], expected: str) -> None:
    assert state_dir(environ) == Path(expected)


def test_iso_utc() -> None:
    assert iso_utc(0) == "1970-01-01T00:00:00Z"
    assert iso_utc(1795435200.7) == "2026-11-23T12:00:00Z"


def test_summary_line() -> None:
    assert (
        summary_line([MK3S, ENDER]) == "mk3s: operational · ender: holding after manual disconnect"
    )


def test_summary_line_without_printers() -> None:
    assert summary_line([]) == "no printers configured"


def test_summary_line_shows_retries_and_survives_odd_values() -> None:
    retrying = {"name": "prusa", "state": "closed", "attempts": 3}
    odd = {"name": "odd\nname", "holds": "not a list", "attempts": True}
    assert summary_line([retrying, odd, {}]) == (
        "prusa: closed (attempt 3) · odd name: unknown · ?: unknown"
    )


def test_summary_line_several_holds() -> None:
    printer = {"name": "p", "state": "closed", "holds": ["manual disconnect", "firmware error"]}
    assert summary_line([printer]) == "p: holding after manual disconnect, firmware error"


def test_summary_line_is_truncated_with_a_count() -> None:
    printers = [{"name": f"printer-{i:02d}", "state": "operational"} for i in range(20)]
    line = summary_line(printers)
    assert len(line) <= SUMMARY_MAX
    assert line.startswith("printer-00: operational · printer-01: operational")
    shown = line.count(": operational")
    assert line.endswith(f" · … +{20 - shown} more")
    assert shown >= 5


def test_summary_line_cuts_one_huge_entry() -> None:
    huge = {"name": "x" * 500, "state": "operational"}
    line = summary_line([huge, MK3S])
    assert len(line) <= SUMMARY_MAX
    assert line.endswith("… · mk3s: operational")


def test_render_table() -> None:
    table = render_table(_document(1234, [MK3S, ENDER]))
    by_id = "/dev/serial/by-id/usb-1a86_USB_Serial-if00-port0"
    assert table.splitlines() == [
        "reconnectd pid 1234, started 2026-11-23T12:00:00Z, updated 2026-11-23T12:05:00Z",
        "",
        "PRINTER  STATE                            DEVICE" + " " * 44 + "DECISION  REASON"
        "                              AT",
        "mk3s     operational                      /dev/ttyACM0" + " " * 38 + "connect   "
        "device came back                    2026-11-23T12:04:58Z",
        f"ender    closed, held: manual disconnect  {by_id}  none      "
        "OctoPrint was disconnected by hand  2026-11-23T12:01:10Z",
    ]
    assert table.endswith("Z\n")


def test_render_table_columns_align() -> None:
    lines = render_table(_document(1, [MK3S, ENDER])).splitlines()
    header, rows = lines[2], lines[3:]
    for column in ("STATE", "DEVICE", "DECISION", "REASON", "AT"):
        start = header.index("  " + column) + 2
        for row in rows:
            assert row[start - 2 : start] == "  "
            assert row[start] != " "


def test_render_table_dry_run_missing_fields_and_no_printers() -> None:
    document = {"version": 1, "pid": 7, "dry_run": True, "printers": [{"name": "p"}]}
    lines = render_table(document).splitlines()
    assert lines[0] == (
        "reconnectd pid 7, started ?, updated ? (dry run: no connect or disconnect is sent)"
    )
    assert lines[3].split() == ["p", "-", "-", "-", "-", "-"]
    held = render_table({"printers": [{"name": "p", "holds": ["firmware error"]}]})
    assert held.splitlines()[3].startswith("p        held: firmware error  -")
    assert render_table(_document(7, [])).endswith("\nno printers configured\n")
    assert render_table({}).endswith("\nno printers configured\n")


def test_load_status_of_a_running_daemon(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    document = _document(os.getpid(), [MK3S])
    write_json_atomic(path, document)
    assert load_status(path) == document


def test_load_status_of_another_process(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    write_json_atomic(path, _document(1, []))  # init: always alive
    assert load_status(path)["pid"] == 1


def test_load_status_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    with pytest.raises(StatusUnavailable, match=r"^reconnectd is not running \(no status file at "):
        load_status(path)


def test_load_status_missing_runtime_directory(tmp_path: Path) -> None:
    with pytest.raises(StatusUnavailable, match=r"is not running"):
        load_status(tmp_path / "reconnectd" / "status.json")


def test_load_status_stale_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    pid = _dead_pid()
    write_json_atomic(path, _document(pid, [MK3S]))
    with pytest.raises(
        StatusUnavailable,
        match=(
            rf"^reconnectd is not running: .*status\.json is stale \(pid {pid} has exited, "
            r"last update 2026-11-23T12:05:00Z\)$"
        ),
    ):
        load_status(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"version": 1, "pid"', r"cannot read the status of reconnectd: .*: not JSON: "),
        ("", r"cannot read the status of reconnectd: .*: is empty, not JSON"),
        ("[1, 2]", r"corrupt status file \(not a JSON object\)"),
        ('{"version": 1}', r"corrupt status file \(no valid pid\)"),
        ('{"version": 1, "pid": "12"}', r"corrupt status file \(no valid pid\)"),
        ('{"version": 1, "pid": true}', r"corrupt status file \(no valid pid\)"),
        ('{"version": 1, "pid": -1}', r"corrupt status file \(no valid pid\)"),
        ('{"version": 2, "pid": 1}', r"status file version 2, this reconnectd reads version 1"),
        ('{"pid": 1}', r"status file version None"),
    ],
)
def test_load_status_corrupt(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "status.json"
    path.write_text(content)
    with pytest.raises(StatusUnavailable, match=message):
        load_status(path)
