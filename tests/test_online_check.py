"""``check --online`` decided against a scripted OctoPrint; the real one is in test_end_to_end."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from reconnectd import online_check
from reconnectd.config import Config, OctoPrintConfig, PrinterConfig, parse_config
from reconnectd.devices import Device
from reconnectd.host import Accepted, CommandResult, ReadResult, Refused, Unreachable
from reconnectd.octoprint_state import octoprint_view

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
    )
    api = ScriptedOctoPrint(octoprint_view("Closed", ports=(BY_ID,)), REFUSED_PROBE)
    _, lines = run(cfg, api, [MK3])
    assert lines[1:] == [
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
