"""The built-in table of USB ids that common 3D-printer boards present.

Used only in zero-config (no ``[[printer]]``): then any serial device whose
vendor/product id is listed here is taken for the printer of the single
``[octoprint]`` (Klipper's own id: of ``[moonraker]``). Every id is one we found
documented; ``source`` says where, so that an entry can be checked, and one without a
source does not get in.

Why generic USB-serial bridges are in the table: many printers (Creality,
Anycubic, older RAMPS and Melzi boards, Ultimaker Original) have no USB id of
their own, only that of the CH340, FTDI or CP210x chip between USB and the
board's serial line. Leaving the bridges out would leave most of those printers
unwatched in zero-config. The cost: *any* adapter built on such a chip (a GPS
receiver with a CH340, an FTDI cable to a router console, a Zigbee stick on a
CP2102) is taken for a printer and gets a connect request once it reappears.
The cure is one ``[[printer]]`` entry naming the real printer, which turns the
table off.
"""

from __future__ import annotations

from dataclasses import dataclass

from reconnectd.devices import normalize_usb_id


@dataclass(frozen=True)
class Board:
    """One USB id (vendor, product) that a printer board presents, and where it is documented."""

    vendor_id: str
    product_id: str
    name: str
    source: str
    # Klipper's firmware: its host is Klippy, reached through Moonraker, not OctoPrint.
    klipper: bool = False


_USB_IDS = "usb.ids (linux-usb.org USB ID repository)"
_ARDUINO_BOARDS = "ArduinoCore-avr boards.txt (mega.vid.N / mega.pid.N)"
_PRUSASLICER = "PrusaSlicer src/slic3r/GUI/FirmwareDialog.cpp (USB_VID_PRUSA, USB_PID_*)"
_BUDDY = "Prusa-Firmware-Buddy usb_device.cpp (USBD_VID 0x2C99, USBD_PID per printer)"

KNOWN_BOARDS: tuple[Board, ...] = (
    # --- Prusa Research (vendor 2c99) ---
    # usb.ids lists only 0001; PrusaSlicer's firmware flasher looks MK2 and MK3
    # up by these ids (its 0003/0004 MMU and 0007/0008 CW1 are not printers).
    Board("2c99", "0001", "Original Prusa i3 MK2/MK2S", f"{_USB_IDS}; {_PRUSASLICER}"),
    Board("2c99", "0002", "Original Prusa i3 MK3/MK3S (Einsy)", _PRUSASLICER),
    # The 32-bit Buddy boards set their product id per printer model.
    Board("2c99", "000c", "Original Prusa MINI/MINI+", _BUDDY),
    Board("2c99", "000d", "Original Prusa MK4 (also MK3.9)", _BUDDY),
    Board("2c99", "0010", "Original Prusa iX", _BUDDY),
    Board("2c99", "0011", "Original Prusa XL", _BUDDY),
    Board("2c99", "0017", "Original Prusa MK3.5", _BUDDY),
    # --- Arduino Mega 2560 and compatibles (RAMPS, RUMBA-style boards) ---
    Board("2341", "0010", "Arduino Mega 2560", f"{_USB_IDS}; {_ARDUINO_BOARDS}"),
    Board("2341", "0042", "Arduino Mega 2560 R3", f"{_USB_IDS}; {_ARDUINO_BOARDS}"),
    Board("2341", "0210", "Arduino Mega 2560", _ARDUINO_BOARDS),
    Board("2341", "0242", "Arduino Mega 2560 R3", _ARDUINO_BOARDS),
    # 2a03 is the id of the other "Arduino" (dog hunter AG, arduino.org) boards.
    Board("2a03", "0010", "Arduino Mega 2560 (arduino.org)", _ARDUINO_BOARDS),
    Board("2a03", "0042", "Arduino Mega 2560 Rev3 (arduino.org)", f"{_USB_IDS}; {_ARDUINO_BOARDS}"),
    # --- 32-bit boards with native USB ---
    # LPC176x Marlin 2 (SKR 1.x, MKS SGen) and Smoothieware, on OpenMoko's shared
    # vendor id, which hands out product ids to open hardware projects.
    Board(
        "1d50", "6029", "Marlin 2.0 serial (LPC176x)", f"{_USB_IDS}: 1d50 6029 Marlin 2.0 (Serial)"
    ),
    Board("1d50", "6015", "Smoothieboard", f"{_USB_IDS}: 1d50 6015 Smoothieboard"),
    Board("1d50", "60ec", "Duet 2 WiFi/Ethernet", f"{_USB_IDS}: 1d50 60ec"),
    Board("1d50", "60ed", "Duet 2 Maestro", f"{_USB_IDS}: 1d50 60ed"),
    Board("1d50", "60ee", "Duet 3", f"{_USB_IDS}: 1d50 60ee"),
    # STM32 firmware that keeps ST's default USB CDC descriptor (32-bit Marlin on
    # STM32 boards). Also generic: any STM32 virtual COM port has this id.
    Board(
        "0483",
        "5740",
        "STM32 virtual COM port (32-bit Marlin on STM32)",
        f"{_USB_IDS}: 0483 5740 Virtual COM Port",
    ),
    Board("28c7", "0001", "Ultimaker 3D printer serial interface", f"{_USB_IDS}: 28c7 0001"),
    # Klipper's own id on every board it runs on (its USB_VENDOR_ID/USB_DEVICE_ID
    # defaults), whatever the board: the printer is Klipper's, its host Moonraker.
    Board(
        "1d50",
        "614e",
        "Klipper firmware",
        f"{_USB_IDS}: 1d50 614e Klipper 3d-Printer Firmware; Klipper src/Kconfig",
        klipper=True,
    ),
    # --- generic USB-serial bridges (see the module docstring for the cost) ---
    Board(
        "1a86",
        "7523",
        "CH340 USB-serial bridge",
        f"{_USB_IDS}: 1a86 7523; Linux drivers/usb/serial/ch341.c",
    ),
    Board(
        "1a86",
        "5523",
        "CH341 USB-serial bridge (serial mode)",
        f"{_USB_IDS}: 1a86 5523; Linux drivers/usb/serial/ch341.c",
    ),
    Board(
        "0403",
        "6001",
        "FTDI FT232 USB-serial bridge",
        f"{_USB_IDS}: 0403 6001 FT232 Serial (UART) IC",
    ),
    Board(
        "10c4",
        "ea60",
        "Silicon Labs CP210x USB-serial bridge",
        "Linux drivers/usb/serial/cp210x.c: 10C4:EA60 Silicon Labs factory default",
    ),
)

_BY_ID = {(board.vendor_id, board.product_id): board for board in KNOWN_BOARDS}


def known_board(vendor_id: str | None, product_id: str | None) -> Board | None:
    """Given a vendor and product id as udev or a user wrote them, return the known board.

    Return ``None`` when either id is missing or malformed, or the pair is not in
    :data:`KNOWN_BOARDS`.
    """
    vendor, product = normalize_usb_id(vendor_id), normalize_usb_id(product_id)
    if vendor is None or product is None:
        return None
    return _BY_ID.get((vendor, product))
