"""Which printer a device belongs to, and the stanza `devices` prints."""

from __future__ import annotations

import sys
from pathlib import Path

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
# Two identical serial-less CH340 boards, on ports 1.2 and 1.3 of one hub.
LEFT_PATH = "pci-0000:00:14.0-usb-0:1.2:1.0"
RIGHT_PATH = "pci-0000:00:14.0-usb-0:1.3:1.0"
LEFT = Device(
    devpath="/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.2/1-1.2:1.0/ttyUSB0/tty/ttyUSB0",
    node="/dev/ttyUSB0",
    links=(f"/dev/serial/by-path/{LEFT_PATH}-port0",),
    vendor_id="1a86",
    product_id="7523",
    usb_path=LEFT_PATH,
    model="CH340 serial converter",
)
RIGHT = Device(
    devpath="/devices/pci0000:00/0000:00:14.0/usb1/1-1/1-1.3/1-1.3:1.0/ttyUSB1/tty/ttyUSB1",
    node="/dev/ttyUSB1",
    links=(f"/dev/serial/by-path/{RIGHT_PATH}-port0",),
    vendor_id="1a86",
    product_id="7523",
    usb_path=RIGHT_PATH,
    model="CH340 serial converter",
)


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
        (printer(vendor_id="1a86", usb_path=LEFT_PATH), LEFT, True),
        (printer(vendor_id="1a86", usb_path=LEFT_PATH), RIGHT, False),
        (printer(vendor_id="1a86", usb_path=RIGHT_PATH), RIGHT, True),
        (printer(vendor_id="1a86", usb_path=RIGHT_PATH), LEFT, False),
        (printer(vendor_id="1a86", product_id="7523", usb_path=LEFT_PATH), LEFT, True),
        (printer(vendor_id="1a86", product_id="0001", usb_path=LEFT_PATH), LEFT, False),
        (printer(vendor_id="2c99", usb_path=LEFT_PATH), LEFT, False),
        (printer(vendor_id="1a86", usb_path=LEFT_PATH), CH340, False),  # no ID_PATH known
        (printer(vendor_id="1a86"), LEFT, True),
        (printer(vendor_id="1a86"), RIGHT, True),
        (printer(vendor_id="1a86", serial="X", usb_path=LEFT_PATH), LEFT, False),
        (printer(port="/dev/ttyUSB1", vendor_id="1a86", usb_path=LEFT_PATH), RIGHT, True),
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


def test_each_identical_board_is_claimed_by_its_own_printer_only() -> None:
    left = PrinterConfig(name="left", octoprint=OCTOPRINT, vendor_id="1a86", usb_path=LEFT_PATH)
    right = PrinterConfig(name="right", octoprint=OCTOPRINT, vendor_id="1a86", usb_path=RIGHT_PATH)
    assert [p.name for p in matching_printers([left, right], LEFT)] == ["left"]
    assert [p.name for p in matching_printers([left, right], RIGHT)] == ["right"]


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
        (
            LEFT,
            '[[printer]]\nname = "ch340-serial-converter-ttyusb0"\nvendor_id = "1a86"\n'
            f'product_id = "7523"\nusb_path = "{LEFT_PATH}"',
        ),
        (
            # A serial number is enough: the USB path would tie the printer to a port.
            Device(
                devpath="/d",
                node="/dev/ttyACM0",
                vendor_id="2c99",
                serial="CZPX1",
                usb_path=LEFT_PATH,
            ),
            '[[printer]]\nname = "ttyacm0"\nvendor_id = "2c99"\nserial = "CZPX1"',
        ),
        (
            # No vendor id: usb_path would need one, so the port names the device.
            Device(devpath="/d", node="/dev/ttyS1", usb_path="platform-serial8250"),
            '[[printer]]\nname = "ttys1"\nport = "/dev/ttyS1"',
        ),
    ],
)
def test_stanza_is_ready_to_paste(device: Device, expected: str) -> None:
    stanza = stanza_for(device, suggested_name(device))
    assert stanza == expected
    tomllib.loads(stanza)  # valid TOML


def test_stanza_round_trips_through_the_config_parser_and_matches(tmp_path: object) -> None:
    for device in (MK3, CH340, UART, LEFT, RIGHT):
        text = stanza_for(device, suggested_name(device))
        config = parse_config(text, Path("/etc/reconnectd/reconnectd.toml"))
        assert printer_matches(config.printers[0], device)
        assert config.printers[0].usb_path == (device.usb_path if not device.serial else None)


def test_stanzas_of_two_identical_boards_differ_and_each_claims_its_own_board() -> None:
    assert stanza_for(LEFT, "p") != stanza_for(RIGHT, "p")
    names = [suggested_name(LEFT), suggested_name(RIGHT)]
    assert names == ["ch340-serial-converter-ttyusb0", "ch340-serial-converter-ttyusb1"]
    # Both stanzas pasted as `reconnectd devices` prints them make a valid config, once
    # the second printer has an OctoPrint of its own (one instance, one printer).
    own = '[printer.octoprint]\nurl = "http://127.0.0.1:5001"'
    text = "\n".join(
        [stanza_for(LEFT, suggested_name(LEFT)), stanza_for(RIGHT, suggested_name(RIGHT)), own]
    )
    config = parse_config(text, Path("/etc/reconnectd/reconnectd.toml"))
    assert [p.usb_path for p in config.printers] == [LEFT_PATH, RIGHT_PATH]
    assert [p.name for p in matching_printers(config.printers, LEFT)] == [names[0]]
    assert [p.name for p in matching_printers(config.printers, RIGHT)] == [names[1]]


@pytest.mark.parametrize(
    "usb_path",
    [pytest.param("", id="empty"), pytest.param("a b", id="space"), pytest.param("a\n", id="nl")],
)
def test_stanza_leaves_out_a_usb_path_the_config_would_refuse(usb_path: str) -> None:
    odd = Device(devpath="/d", node="/dev/ttyUSB9", vendor_id="1a86", usb_path=usb_path)
    stanza = stanza_for(odd, "odd")
    assert "usb_path" not in stanza
    parse_config(stanza, Path("/etc/reconnectd/reconnectd.toml"))


def test_stanza_escapes_quotes_in_serials() -> None:
    odd = Device(
        devpath="/d", node="/dev/ttyUSB9", vendor_id="0403", product_id="6001", serial='A"B\\C'
    )
    assert tomllib.loads(stanza_for(odd, "odd"))["printer"][0]["serial"] == 'A"B\\C'


def test_a_board_running_klipper_gets_a_moonraker_stanza() -> None:
    klipper = Device(
        devpath="/devices/usb1/1-1/1-1:1.0/tty/ttyACM0",
        node="/dev/ttyACM0",
        vendor_id="1d50",
        product_id="614e",
        serial="3A0033000851363131363530",
        model="stm32f446xx",
    )
    assert stanza_for(klipper, "voron") == (
        "[[printer]]\n"
        'name = "voron"\n'
        'vendor_id = "1d50"\n'
        'product_id = "614e"\n'
        'serial = "3A0033000851363131363530"\n'
        "[printer.moonraker]"
    )
    marlin = Device(devpath="/x", node="/dev/ttyACM1", vendor_id="1d50", product_id="6029")
    assert "[printer.moonraker]" not in stanza_for(marlin, "skr")
