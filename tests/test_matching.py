"""Which printer a device belongs to, and the stanza `devices` prints."""

from __future__ import annotations

import sys

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.9 and 3.10
    import tomli as tomllib

from reconnectd.config import OctoPrintConfig, PrinterConfig, parse_config
from reconnectd.devices import Device
from reconnectd.matching import matching_printers, printer_matches, stanza_for, suggested_name

OCTOPRINT = OctoPrintConfig()
MK3 = Device(
    devpath="/devices/usb1/1-1/1-1:1.0/tty/ttyACM0",
    node="/dev/ttyACM0",
    links=("/dev/serial/by-id/usb-Prusa_MK3_CZPX1-if00", "/dev/serial/by-path/p-usb-0:1:1.0"),
    vendor_id="2c99",
    product_id="0002",
    serial="CZPX1",
    model="Original Prusa i3 MK3",
)
CH340 = Device(
    devpath="/devices/usb1/1-2/1-2:1.0/ttyUSB0/tty/ttyUSB0",
    node="/dev/ttyUSB0",
    links=("/dev/serial/by-path/p-usb-0:2:1.0-port0",),
    vendor_id="1a86",
    product_id="7523",
)
UART = Device(devpath="/devices/platform/serial8250/tty/ttyS0", node="/dev/ttyS0")


def printer(**kw: object) -> PrinterConfig:
    return PrinterConfig(name="p", octoprint=OCTOPRINT, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("config", "device", "matches"),
    [
        (printer(vendor_id="2c99"), MK3, True),
        (printer(vendor_id="2c99", product_id="0002"), MK3, True),
        (printer(vendor_id="2c99", product_id="0001"), MK3, False),
        (printer(vendor_id="2c99", serial="CZPX1"), MK3, True),
        (printer(vendor_id="2c99", serial="OTHER"), MK3, False),
        (printer(vendor_id="1a86", product_id="7523"), MK3, False),
        (printer(vendor_id="1a86", product_id="7523"), CH340, True),
        (printer(vendor_id="1a86", serial="X"), CH340, False),
        (printer(port="/dev/ttyACM0"), MK3, True),
        (printer(port="/dev/serial/by-id/usb-Prusa_MK3_CZPX1-if00"), MK3, True),
        (printer(port="/dev/ttyACM1"), MK3, False),
        (printer(port="/dev/ttyS0"), UART, True),
        (printer(vendor_id="2c99"), UART, False),
        (printer(known_boards=True), MK3, True),
        (printer(known_boards=True), CH340, True),
        (printer(known_boards=True), UART, False),
    ],
)
def test_printer_matches(config: PrinterConfig, device: Device, matches: bool) -> None:
    assert printer_matches(config, device) is matches


def test_matching_printers_returns_every_claim_in_config_order() -> None:
    a = PrinterConfig(name="a", octoprint=OCTOPRINT, vendor_id="2c99")
    b = PrinterConfig(name="b", octoprint=OCTOPRINT, vendor_id="2c99", serial="CZPX1")
    c = PrinterConfig(name="c", octoprint=OCTOPRINT, vendor_id="1a86")
    assert [p.name for p in matching_printers([a, b, c], MK3)] == ["a", "b"]
    assert matching_printers([c], UART) == []


@pytest.mark.parametrize(
    ("device", "expected"),
    [
        (
            MK3,
            '[[printer]]\nname = "original-prusa-i3-mk3"\nvendor_id = "2c99"\n'
            'product_id = "0002"\nserial = "CZPX1"',
        ),
        (CH340, '[[printer]]\nname = "ttyusb0"\nvendor_id = "1a86"\nproduct_id = "7523"'),
        (UART, '[[printer]]\nname = "ttys0"\nport = "/dev/ttyS0"'),
    ],
)
def test_stanza_is_ready_to_paste(device: Device, expected: str) -> None:
    stanza = stanza_for(device, suggested_name(device))
    assert stanza == expected
    tomllib.loads(stanza)  # valid TOML


def test_stanza_round_trips_through_the_config_parser_and_matches(tmp_path: object) -> None:
    from pathlib import Path

    for device in (MK3, CH340, UART):
        text = stanza_for(device, suggested_name(device))
        config = parse_config(text, Path("/etc/reconnectd/reconnectd.toml"))
        assert printer_matches(config.printers[0], device)


def test_stanza_escapes_quotes_in_serials() -> None:
    odd = Device(
        devpath="/d", node="/dev/ttyUSB9", vendor_id="0403", product_id="6001", serial='A"B\\C'
    )
    assert tomllib.loads(stanza_for(odd, "odd"))["printer"][0]["serial"] == 'A"B\\C'
