"""``check --online`` decided against a scripted OctoPrint; the real one is in test_end_to_end,
and here for the printer profile."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconnectd import cli, online_check
from reconnectd.config import Config, OctoPrintConfig, PrinterConfig, parse_config
from reconnectd.devices import Device
from reconnectd.host import Accepted, CommandResult, ReadResult, Refused, Unreachable
from reconnectd.octoprint_state import octoprint_view
from tests.support.octoprint_instance import OctoPrintInstance, octoprint_bin
from tests.support.real import missing
from tests.support.scripted_octoprint import KEY, Answer, ScriptedServer, serve_state

BY_ID = "/dev/serial/by-id/usb-Prusa_Research_Original_Prusa_i3_MK3_CZPX1-if00"
MK3 = Device(
    devpath="/devices/usb1/1-1/1-1:1.0/tty/ttyACM0",
    node="/dev/ttyACM0",
    links=(BY_ID,),
    vendor_id="2c99",
    product_id="0002",
    serial="CZPX1",
)


class ScriptedOctoPrint:
    """Answers read() and connect() as told, and records what it was asked."""

    def __init__(self, read: ReadResult, connect: CommandResult) -> None:
        self._read, self._connect = read, connect
        self.connects: list[str] = []
        self.closed = False

    def read(self, *, detail: bool = True) -> ReadResult:
        return self._read

    def connect(self, port: str, baudrate: int | None, profile: str | None) -> CommandResult:
        self.connects.append(port)
        return self._connect

    def disconnect(self) -> CommandResult:
        raise AssertionError("check --online never disconnects")

    def close(self) -> None:
        self.closed = True


def config(text: str) -> Config:
    return parse_config(text, Path("/etc/reconnectd/reconnectd.toml"))


ONE_PRINTER = config('[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\n')
REFUSED_PROBE = Refused(400, "port is invalid")
OFFERED = octoprint_view("Closed", ports=(BY_ID,))


def run(cfg: Config, octoprint: ScriptedOctoPrint, devices: list[Device]) -> tuple[int, list[str]]:
    out = io.StringIO()

    def present(printer: PrinterConfig) -> list[Device]:
        return online_check.devices_of(printer, cfg, devices)

    def api_for(_: OctoPrintConfig) -> ScriptedOctoPrint:
        return octoprint

    code = online_check.check_online(cfg, api_for, present, out)
    assert octoprint.closed, "every client is closed"
    return code, out.getvalue().splitlines()


def test_a_present_printer_offered_by_its_link_is_ok() -> None:
    api = ScriptedOctoPrint(octoprint_view("Closed", ports=("/dev/ttyACM0", BY_ID)), REFUSED_PROBE)
    code, lines = run(ONE_PRINTER, api, [MK3])
    assert code == 0
    assert lines == [
        f"http://127.0.0.1:5000: OK: state Closed; ports offered: /dev/ttyACM0, {BY_ID}",
        f"mk3s: /dev/ttyACM0 is offered as {BY_ID}",
    ]
    assert api.connects == [online_check.PERMISSION_PROBE_PORT], "only the harmless probe"


def test_a_present_printer_octoprint_does_not_offer_is_reported_with_the_fix() -> None:
    api = ScriptedOctoPrint(octoprint_view("Closed", ports=("/dev/ttyS0",)), REFUSED_PROBE)
    code, lines = run(ONE_PRINTER, api, [MK3])
    assert code == online_check.PORT_NOT_OFFERED == 1
    assert lines[1] == (
        "mk3s: /dev/ttyACM0 is present but http://127.0.0.1:5000 does not offer it"
        f" (nor {BY_ID}); in OctoPrint's serial settings add /dev/serial/by-id/* to the"
        " additional ports, or take it off the blacklisted ports"
    )


def test_a_configured_port_is_the_one_to_add() -> None:
    cfg = config('[[printer]]\nname = "lxc"\nport = "/dev/ttyACM0"\n')
    api = ScriptedOctoPrint(octoprint_view("Closed", ports=()), REFUSED_PROBE)
    code, lines = run(cfg, api, [MK3])
    assert code == 1
    assert "add /dev/ttyACM0 to the additional ports" in lines[1]


def test_no_device_present_is_not_a_problem() -> None:
    api = ScriptedOctoPrint(octoprint_view("Closed", ports=()), REFUSED_PROBE)
    code, lines = run(ONE_PRINTER, api, [])
    assert code == 0
    assert lines[1] == "mk3s: no device present now; nothing to match"


def test_a_device_claimed_by_an_earlier_printer_is_not_checked_for_a_later_one() -> None:
    cfg = config(
        '[[printer]]\nname = "first"\nvendor_id = "2c99"\n\n'
        '[[printer]]\nname = "second"\nvendor_id = "2c99"\nproduct_id = "0002"\n'
        '[printer.octoprint]\nurl = "http://127.0.0.1:5001"\n'
    )
    api = ScriptedOctoPrint(octoprint_view("Closed", ports=(BY_ID,)), REFUSED_PROBE)
    _, lines = run(cfg, api, [MK3])
    assert lines[2:] == [
        f"first: /dev/ttyACM0 is offered as {BY_ID}",
        "second: no device present now; nothing to match",
    ]


@pytest.mark.parametrize(
    ("read", "probe", "code", "says"),
    [
        (Unreachable("connection refused"), REFUSED_PROBE, 69, "unreachable: connection refused"),
        (
            Refused(403, "Forbidden", key_rejected=True),
            REFUSED_PROBE,
            77,
            "may not read the connection: Forbidden",
        ),
        (OFFERED, Refused(403, "Forbidden", key_rejected=True), 77, "may read but not change"),
        (OFFERED, Unreachable("timed out"), 69, "unreachable: timed out"),
        (OFFERED, Accepted(), 0, "OK: state Closed"),
    ],
)
def test_what_the_key_may_do_decides_the_exit_code_and_skips_the_ports(
    read: ReadResult, probe: CommandResult, code: int, says: str
) -> None:
    api = ScriptedOctoPrint(read, probe)
    got, lines = run(ONE_PRINTER, api, [MK3])
    assert got == code
    assert says in lines[0]
    # Ports are checked only against an OctoPrint the key may use.
    assert len(lines) == (2 if code == 0 else 1)


@pytest.mark.parametrize(
    ("codes", "expected"),
    [([], 0), ([0, 1], 1), ([1, 77], 77), ([77, 69, 1], 69), ([69, 0], 69)],
)
def test_the_worst_finding_sets_the_exit_code(codes: list[int], expected: int) -> None:
    assert online_check.worst(online_check.Finding(c, "") for c in codes) == expected


# -- the printer's profile must be one OctoPrint has ------------------------------------

PROFILES = octoprint_view(
    "Closed",
    ports=(BY_ID,),
    profiles=("_default", "prusa_mk3s"),
    profile_names=("Default", "Original Prusa i3 MK3S"),
)


def with_profile(profile: str) -> Config:
    return config(f'[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\nprofile = "{profile}"\n')


def test_a_profile_octoprint_does_not_have_fails_and_says_what_it_has() -> None:
    code, lines = run(with_profile("mk3s"), ScriptedOctoPrint(PROFILES, REFUSED_PROBE), [MK3])
    assert code == online_check.PROFILE_NOT_OFFERED == 1
    assert lines[1] == (
        'mk3s: profile "mk3s" is not a printer profile of OctoPrint at http://127.0.0.1:5000,'
        ' which offers "_default" (Default), "prusa_mk3s" (Original Prusa i3 MK3S);'
        " OctoPrint refuses to connect with a profile it does not have"
    )
    # The port is still checked: both problems are worth knowing at once.
    assert lines[2] == f"mk3s: /dev/ttyACM0 is offered as {BY_ID}"


def test_a_profile_written_as_its_name_is_told_its_id() -> None:
    code, lines = run(
        with_profile("original prusa i3 mk3s"), ScriptedOctoPrint(PROFILES, REFUSED_PROBE), []
    )
    assert code == 1
    assert lines[1].endswith(
        '; "original prusa i3 mk3s" is the name of the profile whose id is "prusa_mk3s":'
        ' write profile = "prusa_mk3s"'
    )


@pytest.mark.parametrize(
    ("profile", "view"),
    [
        pytest.param("prusa_mk3s", PROFILES, id="offered"),
        pytest.param("anything", octoprint_view("Closed", ports=(BY_ID,)), id="none-listed"),
    ],
)
def test_a_profile_octoprint_has_or_cannot_judge_is_ok(profile: str, view: ReadResult) -> None:
    code, lines = run(with_profile(profile), ScriptedOctoPrint(view, REFUSED_PROBE), [MK3])
    assert code == 0, lines
    assert lines[1:] == [f"mk3s: /dev/ttyACM0 is offered as {BY_ID}"]


def test_a_wrong_profile_fails_check_online_against_a_scripted_octoprint(
    server: ScriptedServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Through the real client and command: the profiles come from /api/connection."""
    serve_state(server)  # OctoPrint 1.11.8's answer: the "_default" profile only
    server.answer("POST", "/api/connection", Answer(400, {"error": "Invalid port"}))
    monkeypatch.setattr(cli, "list_serial_devices", list)
    path = tmp_path / "reconnectd.toml"
    path.write_text(
        f'[octoprint]\nurl = "{server.url}"\napi_key = "{KEY}"\n'
        '[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\nprofile = "prusa"\n'
    )
    path.chmod(0o600)
    assert cli.main(["--config", str(path), "check", "--online"], {}) == 1
    assert capsys.readouterr().out.splitlines()[1:] == [
        f"{server.url}: OK: state Closed; ports offered: /dev/ttyACM0,"
        " /dev/serial/by-id/usb-Prusa_MK3-if00",
        f'mk3s: profile "prusa" is not a printer profile of OctoPrint at {server.url}, which'
        ' offers "_default" (Default); OctoPrint refuses to connect with a profile it does not'
        " have",
        "mk3s: no device present now; nothing to match",
    ]


@pytest.fixture(scope="module")
def octoprint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OctoPrintInstance]:
    if not Path(octoprint_bin()).exists():
        missing(f"no OctoPrint at {octoprint_bin()} (tests/bootstrap installs it)")
    with OctoPrintInstance(tmp_path_factory.mktemp("octoprint-profiles")) as instance:
        yield instance


@pytest.mark.octoprint
@pytest.mark.parametrize(("profile", "code"), [("_default", 0), ("prusa_mk3s", 1)])
def test_the_profile_against_a_real_octoprint(
    octoprint: OctoPrintInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    profile: str,
    code: int,
) -> None:
    monkeypatch.setattr(cli, "list_serial_devices", list)
    path = tmp_path / "reconnectd.toml"
    path.write_text(
        f'[octoprint]\nurl = "{octoprint.url}"\napi_key = "{octoprint.api_key}"\n'
        '[[printer]]\nname = "mk3s"\nport = "/dev/reconnectd-test-no-such-node"\n'
        f'profile = "{profile}"\n'
    )
    path.chmod(0o600)
    assert cli.main(["--config", str(path), "check", "--online"], {}) == code
    out = capsys.readouterr().out
    wrong = (
        f'mk3s: profile "prusa_mk3s" is not a printer profile of OctoPrint at {octoprint.url},'
        ' which offers "_default" ('
    )
    assert (wrong in out) == (code == 1), out
    assert f"{octoprint.url}: OK: state Closed" in out
