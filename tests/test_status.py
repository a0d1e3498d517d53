"""The status document: its paths, its summary line, its table, and reading it back."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconnectd.cli import EXIT_NOT_RUNNING, EXIT_OK, EXIT_STATUS_INVALID, main
from reconnectd.jsonfiles import write_json_atomic
from reconnectd.status import (
    PID_MAX,
    SUMMARY_MAX,
    StatusUnavailable,
    _pid_alive,
    iso_utc,
    load_status,
    render_table,
    state_dir,
    status_path,
    summary_line,
    validate_status,
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


def test_load_status_returns_not_running_for_a_missing_or_stale_file(tmp_path: Path) -> None:
    with pytest.raises(StatusUnavailable) as missing:
        load_status(tmp_path / "status.json")
    assert missing.value.not_running
    write_json_atomic(tmp_path / "status.json", _document(_dead_pid(), []))
    with pytest.raises(StatusUnavailable) as stale:
        load_status(tmp_path / "status.json")
    assert stale.value.not_running


# --- odd status files, through the command --------------------------------------
#
# Each case is a file the daemon would never write. `reconnectd status` either says
# in one line what is wrong with it (exit 1), or shows what it can (exit 0); never
# a traceback.

HUGE_DIGITS = "9" * 100_000


def _int_refusal(digits: str) -> str | None:
    """Return why this Python refuses to read the integer, or None if it reads it.

    Python 3.9.14+, 3.10.7+ and 3.11+ refuse over 4300 digits (CVE-2020-10735), each
    in its own words.
    """
    try:
        int(digits)
    except ValueError as refused:
        return str(refused)
    return None


HUGE_REFUSED = _int_refusal(HUGE_DIGITS)


def _status_text(pid: int | None = None, **fields: object) -> str:
    """Return a valid status file's text (pid: this process, alive), with ``fields`` set."""
    document = _document(os.getpid() if pid is None else pid, [MK3S, ENDER])
    document.update(fields)
    return json.dumps(document)


def _file(tmp_path: Path, content: str | bytes) -> Path:
    path = tmp_path / "run" / "status.json"
    path.parent.mkdir(exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8")
    return path


def _status(capsys: pytest.CaptureFixture[str], tmp_path: Path, *args: str) -> tuple[int, str, str]:
    """Run ``reconnectd status ARGS`` on tmp_path/run; return exit code, stdout, stderr."""
    code = main(["status", *args], {"RUNTIME_DIRECTORY": str(tmp_path / "run")})
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def _with(key: str, value: str) -> str:
    """Return a valid status file's text with ``key`` given the JSON text ``value``."""
    document = _document(os.getpid(), [MK3S, ENDER])
    document[key] = "@"
    return json.dumps(document).replace('"@"', value)


def _in_printer(key: str, value: str) -> str:
    """Return a valid status file's text with mk3s's ``key`` given the JSON text ``value``."""
    printer = dict(MK3S, **{key: "@"})
    return json.dumps(_document(os.getpid(), [printer, ENDER])).replace('"@"', value)


INVALID = "{path}: invalid status file: "
VERSION = (
    "{path}: status file version {shown}, this reconnectd reads version 1 "
    "(is the daemon from another release?)"
)
CANNOT_READ = "cannot read the status of reconnectd: {path}: "
BIG_PID = "a huge integer is not a process id (1 to 2147483647)"


INVALID_FILES: list[tuple[str | bytes, str]] = [
    # pid: must be a pid_t that names one process.
    (
        _with("pid", str(2**31)),
        INVALID + "pid: 2147483648 is not a process id (1 to 2147483647)",
    ),
    (_with("pid", str(2**63)), INVALID + f"pid: {2**63} is not a process id (1 to 2147483647)"),
    (_with("pid", str(2**70)), INVALID + "pid: " + BIG_PID),
    (_with("pid", "0"), INVALID + "pid: 0 is not a process id (1 to 2147483647)"),
    (_with("pid", "-1"), INVALID + "pid: -1 is not a process id (1 to 2147483647)"),
    (
        _with("pid", "-2147483648"),
        INVALID + "pid: -2147483648 is not a process id (1 to 2147483647)",
    ),
    (_with("pid", "NaN"), INVALID + "pid: NaN is not a process id (1 to 2147483647)"),
    (_with("pid", "Infinity"), INVALID + "pid: Infinity is not a process id (1 to 2147483647)"),
    (
        _with("pid", "-Infinity"),
        INVALID + "pid: -Infinity is not a process id (1 to 2147483647)",
    ),
    (_with("pid", "1e400"), INVALID + "pid: Infinity is not a process id (1 to 2147483647)"),
    (_with("pid", "1.0"), INVALID + "pid: 1.0 is not a process id (1 to 2147483647)"),
    (_with("pid", '"12"'), INVALID + 'pid: "12" is not a process id (1 to 2147483647)'),
    (_with("pid", "true"), INVALID + "pid: true is not a process id (1 to 2147483647)"),
    (_with("pid", "null"), INVALID + "pid: null is not a process id (1 to 2147483647)"),
    (_with("pid", "[1]"), INVALID + "pid: [1] is not a process id (1 to 2147483647)"),
    (
        _with("pid", '{"pid": 1}'),
        INVALID + 'pid: {"pid": 1} is not a process id (1 to 2147483647)',
    ),
    (
        _with("pid", json.dumps("x" * 1000)),
        INVALID + 'pid: "' + "x" * 40 + '"… is not a process id (1 to 2147483647)',
    ),
    (
        _with("pid", '"1\\n\\u001b[2J\\ud800"'),
        INVALID + r'pid: "1\n\u001b[2J\ud800" is not a process id (1 to 2147483647)',
    ),
    ('{"version": 1}', INVALID + "pid: missing"),
    # version: only the one this reader knows.
    (_with("version", "2"), VERSION.replace("{shown}", "2")),
    (_with("version", "0"), VERSION.replace("{shown}", "0")),
    (_with("version", '"1"'), VERSION.replace("{shown}", '"1"')),
    (_with("version", "true"), VERSION.replace("{shown}", "true")),
    (_with("version", "1.0"), VERSION.replace("{shown}", "1.0")),
    (_with("version", "NaN"), VERSION.replace("{shown}", "NaN")),
    (_with("version", "null"), VERSION.replace("{shown}", "null")),
    (_with("version", "[1]"), VERSION.replace("{shown}", "[1]")),
    (_with("version", str(10**30)), VERSION.replace("{shown}", "a huge integer")),
    ('{"pid": 1}', INVALID + "version: missing"),
    # The document: an object.
    ("[1, 2]", INVALID + "the document is [1, 2], not a JSON object"),
    ("null", INVALID + "the document is null, not a JSON object"),
    ('"status"', INVALID + 'the document is "status", not a JSON object'),
    ("3", INVALID + "the document is 3, not a JSON object"),
    ("NaN", INVALID + "the document is NaN, not a JSON object"),
    # printers: a list of objects, or a printer would go unseen.
    (_with("printers", '"mk3s"'), INVALID + 'printers: "mk3s" is not a list'),
    (_with("printers", "{}"), INVALID + "printers: {} is not a list"),
    (_with("printers", "null"), INVALID + "printers: null is not a list"),
    (_with("printers", "3"), INVALID + "printers: 3 is not a list"),
    (
        _with("printers", json.dumps([MK3S, 3])),
        INVALID + "printers[1]: 3 is not an object",
    ),
    (_with("printers", "[null]"), INVALID + "printers[0]: null is not an object"),
    (_with("printers", '["mk3s"]'), INVALID + 'printers[0]: "mk3s" is not an object'),
    (
        _with("printers", json.dumps([[MK3S]])),
        INVALID + 'printers[0]: [{"name": "mk3s", "state": "operational… is not an object',
    ),
    # Not JSON, or not JSON Python can read.
    ("", CANNOT_READ + "is empty, not JSON"),
    (
        '{"version": 1, "pid"',
        CANNOT_READ + "not JSON: Expecting ':' delimiter at line 1 column 21",
    ),
    (
        b'{"version": 1, "pid": 1, "printers": [{"name": "\xff\xfe"}]}',
        CANNOT_READ + "not JSON: not valid UTF-8 at byte 48",
    ),
    (b"\x80" + _status_text().encode(), CANNOT_READ + "not JSON: not valid UTF-8 at byte 0"),
    ("[" * 100_000 + "]" * 100_000, CANNOT_READ + "not JSON we can read: nested too deeply"),
    (
        '{"version": 1, "pid": 1, "x": ' + '{"a": ' * 50_000 + "1" + "}" * 50_001,
        CANNOT_READ + "not JSON we can read: nested too deeply",
    ),
    (
        _with("pid", HUGE_DIGITS),
        INVALID + "pid: " + BIG_PID
        if HUGE_REFUSED is None
        else CANNOT_READ + "not JSON we can read: " + HUGE_REFUSED,
    ),
]


@pytest.mark.parametrize(
    ("content", "message"),
    INVALID_FILES,
    # The files run to 200,000 characters; the messages tell the cases apart.
    ids=[message.split("{path}: ")[-1][:70] for _, message in INVALID_FILES],
)
def test_status_says_what_is_wrong_with_the_file_in_one_line_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | bytes, message: str
) -> None:
    path = _file(tmp_path, content)
    for args in ((), ("--json",)):
        code, out, err = _status(capsys, tmp_path, *args)
        assert (code, out) == (EXIT_STATUS_INVALID, "")
        assert err == "reconnectd status: " + message.replace("{path}", str(path)) + "\n"


def test_status_of_a_file_it_cannot_read_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run" / "status.json"
    path.mkdir(parents=True)
    assert _status(capsys, tmp_path) == (
        EXIT_STATUS_INVALID,
        "",
        f"reconnectd status: cannot read the status of reconnectd: {path}: "
        "is a directory, not a file\n",
    )


def test_status_of_no_daemon_or_a_stale_file_still_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "run" / "status.json"
    assert _status(capsys, tmp_path) == (
        EXIT_NOT_RUNNING,
        "",
        f"reconnectd status: reconnectd is not running (no status file at {path})\n",
    )
    pid = _dead_pid()
    _file(tmp_path, _status_text(pid=pid))
    assert _status(capsys, tmp_path, "--json") == (
        EXIT_NOT_RUNNING,
        "",
        f"reconnectd status: reconnectd is not running: {path} is stale (pid {pid} has"
        " exited, last update 2026-11-23T12:05:00Z)\n",
    )


@pytest.mark.parametrize("pid", [0, -1, -2, 2**31, 2**63, 2**70])
def test_a_pid_that_is_no_process_id_is_never_signalled(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, pid: int
) -> None:
    # kill(0, sig) signals our process group, kill(-1, sig) every process we may;
    # kill(2**31, 0) raises OverflowError.
    signalled: list[tuple[int, int]] = []
    monkeypatch.setattr(os, "kill", lambda pid, signal: signalled.append((pid, signal)))
    _file(tmp_path, _status_text(pid=pid))
    assert _status(capsys, tmp_path)[0] == EXIT_STATUS_INVALID
    assert signalled == []
    # The same spy sees the check of a valid pid: the one above was never made.
    _file(tmp_path, _status_text(pid=PID_MAX))
    assert _status(capsys, tmp_path)[0] == EXIT_OK
    assert signalled == [(PID_MAX, 0)]


@pytest.mark.parametrize("pid", [0, -1, PID_MAX + 1])
def test_pid_alive_refuses_a_pid_kill_would_misread(pid: int) -> None:
    with pytest.raises(ValueError, match=rf"^not a process id: {pid}$"):
        _pid_alive(pid)


def test_pid_alive_at_the_bounds() -> None:
    assert _pid_alive(1)  # init: always there, not ours to signal
    assert _pid_alive(os.getpid())
    assert not _pid_alive(PID_MAX)  # above any pid_max Linux allows (2**22)


DROPPED = object()


@pytest.mark.parametrize(
    ("key", "value", "expected", "shown"),
    [
        # Times are text, shown as written and never computed from a number.
        ("started", "-1e308", DROPPED, "started ?"),
        ("started", "1e400", DROPPED, "started ?"),
        ("started", "-5", DROPPED, "started ?"),
        ("started", "NaN", DROPPED, "started ?"),
        ("updated", "Infinity", DROPPED, "updated ?"),
        ("updated", "1795435200", DROPPED, "updated ?"),
        ("updated", '"-99999-13-45T99:99:99Z"', "-99999-13-45T99:99:99Z", "-99999-13-45T99:99:99Z"),
        ("updated", '["2026-11-23T12:05:00Z"]', DROPPED, "updated ?"),
        ("updated", '{"at": 1}', DROPPED, "updated ?"),
        ("started", "null", None, "started ?"),
        ("dry_run", '"yes"', DROPPED, "updated 2026-11-23T12:05:00Z\n"),
        ("dry_run", "1", DROPPED, "updated 2026-11-23T12:05:00Z\n"),
        ("dry_run", "[true]", DROPPED, "updated 2026-11-23T12:05:00Z\n"),
        ("dry_run", "true", True, "(dry run: no connect or disconnect is sent)"),
        ("holds_unsaved", "3", DROPPED, "reconnectd pid"),
        ("holds_unsaved", '"disk full"', "disk full", "reconnectd pid"),
        # Fields this reader does not know: kept for --json if plain JSON.
        ("future", '{"a": [1, "b", null, 1.5]}', {"a": [1, "b", None, 1.5]}, "reconnectd pid"),
        ("future", "NaN", DROPPED, "reconnectd pid"),
        ("future", "[1, -Infinity]", DROPPED, "reconnectd pid"),
        ("future", "[" * 33 + "]" * 33, DROPPED, "reconnectd pid"),
        ("future", "[" * 32 + "]" * 32, json.loads("[" * 32 + "]" * 32), "reconnectd pid"),
        ("future", str(10**4000), 10**4000, "reconnectd pid"),
        ("future", '"\\ud800"', "\ud800", "reconnectd pid"),
    ],
)
def test_odd_document_fields_are_dropped_and_the_rest_shown(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: str,
    expected: object,
    shown: str,
) -> None:
    _file(tmp_path, _with(key, value))
    code, out, err = _status(capsys, tmp_path)
    assert (code, err) == (EXIT_OK, "")
    assert shown in out
    assert "mk3s" in out and "ender" in out
    code, out, err = _status(capsys, tmp_path, "--json")
    assert (code, err) == (EXIT_OK, "")
    document = json.loads(out, parse_constant=_not_json)
    if expected is DROPPED:
        assert key not in document
    else:
        assert document[key] == expected
    assert document["printers"] == [MK3S, ENDER]


def _not_json(constant: str) -> object:
    raise AssertionError(f"{constant} is not JSON")


@pytest.mark.parametrize(
    ("key", "value", "expected", "cell"),
    [
        # Numbers, lists, objects where text goes: as if missing.
        ("name", "42", DROPPED, "?"),
        ("name", "1e400", DROPPED, "?"),
        ("name", '{"first": "mk3s"}', DROPPED, "?"),
        ("name", "[" * 500 + "]" * 500, DROPPED, "?"),
        ("state", "3.5", DROPPED, "-"),
        ("state", "NaN", DROPPED, "-"),
        ("device", '["/dev/ttyACM0"]', DROPPED, "-"),
        ("device", "null", None, "-"),
        ("at", "-1e308", DROPPED, "-"),
        ("at", "Infinity", DROPPED, "-"),
        ("at", "1795435200", DROPPED, "-"),
        ("at", '"9999999-01-01T00:00:00Z"', "9999999-01-01T00:00:00Z", "9999999-01-01T00:00:00Z"),
        ("reason", "true", DROPPED, "-"),
        # Text that would move the cursor, break the line, or not encode.
        ("name", '"evil\\u001b[2J\\u0007name"', "evil\x1b[2J\x07name", "evil\ufffd[2J\ufffdname"),
        ("name", '"lone \\ud800 surrogate"', "lone \ud800 surrogate", "lone \ufffd surrogate"),
        ("reason", '"two\\r\\nlines"', "two\r\nlines", "two lines"),
        ("reason", '"c1 \\u009b control"', "c1 \x9b control", "c1 \ufffd control"),
        # Counts: an int from 0 to 10**9.
        ("attempts", '"3"', DROPPED, "connect"),
        ("attempts", "true", DROPPED, "connect"),
        ("attempts", "-1", DROPPED, "connect"),
        ("attempts", "3.0", DROPPED, "connect"),
        ("attempts", "Infinity", DROPPED, "connect"),
        ("attempts", str(10**4000), DROPPED, "connect"),
        ("attempts", str(10**9 + 1), DROPPED, "connect"),
        ("attempts", str(10**9), 10**9, f"connect (attempt {10**9})"),
        ("connects", "NaN", DROPPED, "connect"),
        # Holds: a list of strings.
        ("holds", '"manual disconnect"', DROPPED, "operational"),
        ("holds", '{"manual": true}', DROPPED, "operational"),
        ("holds", '[1, null, ["x"], "manual disconnect"]', ["manual disconnect"], "held: manual"),
        # A field this reader does not know.
        ("future", "NaN", DROPPED, "mk3s"),
        ("future", '{"a": 1}', {"a": 1}, "mk3s"),
    ],
)
def test_odd_printer_fields_are_dropped_and_the_rest_shown(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    key: str,
    value: str,
    expected: object,
    cell: str,
) -> None:
    _file(tmp_path, _in_printer(key, value))
    code, out, err = _status(capsys, tmp_path)
    assert (code, err) == (EXIT_OK, "")
    row = out.splitlines()[3]
    assert cell in row
    assert "ender" in out.splitlines()[4]
    assert not any(c < " " for c in out.replace("\n", ""))
    code, out, err = _status(capsys, tmp_path, "--json")
    assert (code, err) == (EXIT_OK, "")
    printers = json.loads(out, parse_constant=_not_json)["printers"]
    want = {k: v for k, v in MK3S.items() if k != key}
    if expected is not DROPPED:
        want[key] = expected
    assert printers == [want, ENDER]


def test_a_printer_entry_of_nothing_but_odd_fields_is_still_a_row(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _file(tmp_path, _with("printers", '[{"name": 1, "state": [], "holds": 3, "attempts": -3}]'))
    code, out, _ = _status(capsys, tmp_path)
    assert code == EXIT_OK
    assert out.splitlines()[3].split() == ["?", "-", "-", "-", "-", "-"]
    assert _status(capsys, tmp_path, "--json")[1].count("{}") == 1


def test_no_printers_field_means_no_printers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _file(tmp_path, json.dumps({"version": 1, "pid": os.getpid()}))
    code, out, _ = _status(capsys, tmp_path)
    assert (code, out) == (
        EXIT_OK,
        f"reconnectd pid {os.getpid()}, started ?, updated ?\nno printers configured\n",
    )


def test_validate_status_keeps_a_valid_document_whole() -> None:
    document = _document(1234, [MK3S, ENDER])
    document["holds_unsaved"] = None
    document["printers"][0]["connects"] = 2  # type: ignore[index]
    assert validate_status(json.loads(json.dumps(document)), Path("s.json")) == document


@pytest.mark.parametrize(
    "content",
    [
        "[" * 200_000 + "]" * 200_000,
        '{"version": 1, "pid": ' + HUGE_DIGITS + "}",
        _with("pid", str(2**31)),
        b'{"version": 1, "pid": 1, "printers": [{"name": "\xff"}]}',
    ],
    ids=["deep", "100000-digits", "pid-2**31", "invalid-utf8"],
)
def test_the_real_command_prints_no_traceback(tmp_path: Path, content: str | bytes) -> None:
    path = _file(tmp_path, content)
    done = subprocess.run(
        [sys.executable, "-m", "reconnectd", "status"],
        env=dict(os.environ, RUNTIME_DIRECTORY=str(path.parent)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in done.stderr
    assert done.returncode == EXIT_STATUS_INVALID
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1
    assert done.stderr.startswith("reconnectd status: ")
    assert str(path) in done.stderr


def test_holds_not_yet_on_disk_are_said_under_the_header() -> None:
    document = _document(1234, [MK3S])
    document["holds_unsaved"] = (
        "cannot store holds in /var/lib/reconnectd/state.json: No space left on device"
    )
    lines = render_table(document).splitlines()
    assert lines[1] == (
        "holds not yet on disk: cannot store holds in /var/lib/reconnectd/state.json: "
        "No space left on device"
    )
    assert "holds not yet on disk" not in render_table(_document(1234, [MK3S]))
