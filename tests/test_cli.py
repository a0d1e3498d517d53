"""The command line: exit codes, messages, and commands that need no hardware.

`devices` (needs udev) and `check --online` (needs OctoPrint) are tested for real in
the umockdev and end-to-end suites.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reconnectd import __version__, cli, exit_codes, online_check
from reconnectd.cli import EXIT_CONFIG, EXIT_NOT_RUNNING, EXIT_OK, EXIT_USAGE, main
from reconnectd.config import parse_config
from reconnectd.devices import Device

REPO = Path(__file__).resolve().parents[1]
KEY = "K3Y-of-test-cli-0123456789abcdef"


def env_for(tmp_path: Path, config: str | None = None) -> dict[str, str]:
    env = {"RUNTIME_DIRECTORY": str(tmp_path / "run"), "STATE_DIRECTORY": str(tmp_path / "st")}
    if config is not None:
        path = tmp_path / "reconnectd.toml"
        path.write_text(config)
        env["RECONNECTD_CONFIG"] = str(path)
    return env


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["--version"], {})
    assert stopped.value.code == 0
    assert capsys.readouterr().out.strip() == f"reconnectd {__version__}"


@pytest.mark.parametrize(
    "argv",
    [["frobnicate"], ["run", "--bogus"], ["status", "extra"], ["--config"], ["check", "-x"]],
)
def test_usage_errors_exit_64(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(argv, {})
    assert stopped.value.code == EXIT_USAGE
    assert "reconnectd" in capsys.readouterr().err


def test_check_accepts_a_good_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = env_for(
        tmp_path,
        f'[octoprint]\napi_key = "{KEY}"\n[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\n',
    )
    (tmp_path / "reconnectd.toml").chmod(0o600)  # an inline key others may not read
    assert main(["check"], env) == EXIT_OK
    out = capsys.readouterr().out
    assert out == f"config OK: {tmp_path / 'reconnectd.toml'}; printers: mk3s\n"


def test_check_reports_every_problem_one_line_each_and_exits_78(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = env_for(
        tmp_path,
        '[octoprint]\nurl = "ftp://x"\n[[printer]]\nname = "a"\nvendor_id = "2c9"\n'
        'settle = -1\n[[printer]]\nname = "a"\nvendorid = "2c99"\n',
    )
    assert main(["check"], env) == EXIT_CONFIG
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert captured.out == ""
    path = str(tmp_path / "reconnectd.toml")
    assert all(line.startswith(f"{path}: ") for line in lines), lines
    joined = "\n".join(lines)
    for key in (
        "octoprint.url",
        "printer[0].vendor_id",
        "printer[0].settle",
        "printer[1].name",
        "printer[1].vendorid",
    ):
        assert f": {key}: " in joined, (key, joined)
    assert "Traceback" not in captured.err


HOW_TO_GET_A_KEY = (
    'run "reconnectd login" to get one from OctoPrint (it stores the key and sets'
    " api_key_file), or set api_key_file to a file holding one"
)


def test_check_without_a_config_file_says_the_key_is_missing_and_exits_78(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    default = tmp_path / "etc" / "reconnectd.toml"  # the default path, missing
    monkeypatch.setattr("reconnectd.config.DEFAULT_CONFIG_PATH", default)
    assert main(["check"], env_for(tmp_path)) == EXIT_CONFIG
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == (
        f"{default}: octoprint: no API key for the OctoPrint at http://127.0.0.1:5000, which"
        f" every known printer board uses (there is no [[printer]]); {HOW_TO_GET_A_KEY}\n"
    )


def test_check_names_every_printer_whose_octoprint_has_no_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = env_for(
        tmp_path,
        '[octoprint]\nurl = "http://proxy:Secr3t@octopi.local"\n'
        '[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\n'
        '[[printer]]\nname = "mini"\nport = "/dev/ttyACM1"\n'
        f'[printer.octoprint]\nurl = "http://octopi.local:5001"\napi_key = "{KEY}"\n'
        '[[printer]]\nname = "xl"\nport = "/dev/ttyACM2"\n'
        '[printer.octoprint]\nurl = "http://octopi.local:5002"\n',
    )
    (tmp_path / "reconnectd.toml").chmod(0o600)
    assert main(["check", "--online"], env) == EXIT_CONFIG  # not even trying OctoPrint
    captured = capsys.readouterr()
    path = tmp_path / "reconnectd.toml"
    assert captured.out == ""
    assert captured.err.splitlines() == [
        f"{path}: octoprint: no API key for the OctoPrint at http://proxy:***@octopi.local,"
        f' which printer "mk3s" uses; {HOW_TO_GET_A_KEY}',
        f"{path}: printer[2].octoprint: no API key for the OctoPrint at"
        f' http://octopi.local:5002, which printer "xl" uses; {HOW_TO_GET_A_KEY}',
    ]


def test_missing_named_config_is_a_config_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "check"], {}) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert str(missing) in err and "no such file" in err


def test_run_with_a_bad_config_exits_78_without_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_for(tmp_path, "this is not toml"))
    done = subprocess.run(
        [sys.executable, "-m", "reconnectd", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == EXIT_CONFIG
    assert "Traceback" not in done.stderr
    assert str(tmp_path / "reconnectd.toml") in done.stderr


def test_status_without_a_daemon_says_so_and_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"], env_for(tmp_path)) == EXIT_NOT_RUNNING
    err = capsys.readouterr().err
    assert err.startswith("reconnectd status: ")
    assert "not running" in err


def test_status_prints_the_table_and_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = env_for(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    document = {
        "version": 1,
        "pid": os.getpid(),
        "started": "2026-11-23T12:00:00Z",
        "updated": "2026-11-23T12:05:00Z",
        "dry_run": False,
        "printers": [
            {
                "name": "mk3s",
                "state": "operational",
                "device": "/dev/ttyACM0",
                "octoprint": "http://127.0.0.1:5000",
                "decision": "connected",
                "reason": "OctoPrint is Operational",
                "at": "2026-11-23T12:04:58Z",
                "holds": [],
                "attempts": 0,
                "connects": 1,
            },
        ],
    }
    (run_dir / "status.json").write_text(json.dumps(document))
    assert main(["status"], env) == EXIT_OK
    table = capsys.readouterr().out
    assert "mk3s" in table and "operational" in table and "/dev/ttyACM0" in table
    assert main(["status", "--json"], env) == EXIT_OK
    assert json.loads(capsys.readouterr().out) == document


def test_status_masks_a_password_in_any_url_of_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A status file written before URLs were shown masked may hold a reverse proxy's
    password: neither the table nor --json shows it."""
    env = env_for(tmp_path)
    (tmp_path / "run").mkdir()
    document = {
        "version": 1,
        "pid": os.getpid(),
        "updated": "2026-11-23T12:05:00Z",
        "printers": [
            {
                "name": "mk3s",
                "state": "octoprint unreachable",
                "octoprint": "http://proxy:Secr3t@octopi.local:5000",
                "decision": "waiting",
                "reason": "HTTP 502 (GET http://proxy:Secr3t@octopi.local:5000/api/connection)",
            },
        ],
    }
    (tmp_path / "run" / "status.json").write_text(json.dumps(document))
    assert main(["status"], env) == EXIT_OK
    table = capsys.readouterr().out
    assert "HTTP 502 (GET http://proxy:***@octopi.local:5000/api/connection)" in table
    assert "Secr3t" not in table
    assert main(["status", "--json"], env) == EXIT_OK
    shown = json.loads(capsys.readouterr().out)
    (row,) = shown["printers"]
    assert row["octoprint"] == "http://proxy:***@octopi.local:5000"
    assert row["reason"] == "HTTP 502 (GET http://proxy:***@octopi.local:5000/api/connection)"
    assert "Secr3t" not in json.dumps(shown)


def test_python_dash_m_runs_the_same_command(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "reconnectd", "--version"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and done.stdout.strip() == f"reconnectd {__version__}"


# Two identical serial-less CH340 boards on ports 1.2 and 1.3 of one hub.
TWIN_PATHS = ("pci-0000:00:14.0-usb-0:1.2:1.0", "pci-0000:00:14.0-usb-0:1.3:1.0")
TWINS = [
    Device(
        devpath=f"/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.{port}/tty/ttyUSB{index}",
        node=f"/dev/ttyUSB{index}",
        vendor_id="1a86",
        product_id="7523",
        usb_path=TWIN_PATHS[index],
        vendor="QinHeng Electronics",
        model="CH340 serial converter",
    )
    for index, port in enumerate((2, 3))
]
TWINS_CONFIG = (
    '[[printer]]\nname = "left"\nvendor_id = "1a86"\n'
    f'usb_path = "{TWIN_PATHS[0]}"\n'
    '[[printer]]\nname = "right"\nvendor_id = "1a86"\n'
    f'usb_path = "{TWIN_PATHS[1]}"\n'
    # Each printer has an OctoPrint instance of its own.
    '[printer.octoprint]\nurl = "http://127.0.0.1:5001"\n'
)


def test_devices_tells_identical_boards_apart_by_usb_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "list_serial_devices", lambda: list(TWINS))
    env = env_for(tmp_path, TWINS_CONFIG)
    assert main(["devices"], env) == EXIT_OK
    blocks = capsys.readouterr().out.split("\n\n")
    for index, (name, printer) in enumerate((("ttyusb0", "left"), ("ttyusb1", "right"))):
        lines = blocks[index].splitlines()
        assert f"    usb path: {TWIN_PATHS[index]}" in lines
        assert f"    printer:  {printer}" in lines
        assert "    config:" in lines
        stanza = lines[lines.index("    config:") + 1 :]
        assert stanza == [
            "        [[printer]]",
            f'        name = "ch340-serial-converter-{name}"',
            '        vendor_id = "1a86"',
            '        product_id = "7523"',
            f'        usb_path = "{TWIN_PATHS[index]}"',
        ]


def test_devices_json_has_the_usb_path_and_stanzas_that_make_a_valid_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(cli, "list_serial_devices", lambda: list(TWINS))
    env = env_for(tmp_path, TWINS_CONFIG)
    assert main(["devices", "--json"], env) == EXIT_OK
    rows = json.loads(capsys.readouterr().out)
    assert [row["usb_path"] for row in rows] == list(TWIN_PATHS)
    assert [row["printers"] for row in rows] == [["left"], ["right"]]
    own = '[printer.octoprint]\nurl = "http://127.0.0.1:5001"'
    pasted = "\n".join([*(row["stanza"] for row in rows), own])
    config = parse_config(pasted, tmp_path / "pasted.toml")
    assert [p.usb_path for p in config.printers] == list(TWIN_PATHS)


def test_the_exit_codes_are_the_contracts() -> None:
    # Scripts rely on these (contract, "Command line"); one module holds them for all.
    codes = (exit_codes.OK, exit_codes.USAGE, exit_codes.CONFIG)
    assert codes == (0, 64, 78)
    assert (exit_codes.UNAVAILABLE, exit_codes.NOPERM) == (69, 77)
    assert (cli.EXIT_CONFIG, online_check.UNREACHABLE) == (78, 69)
