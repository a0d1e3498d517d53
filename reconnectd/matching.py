"""Which printer a device belongs to: pure functions over plain values."""

from __future__ import annotations

from collections.abc import Sequence

from reconnectd.boards import known_board
from reconnectd.config import PrinterConfig, is_usb_path, toml_string
from reconnectd.devices import Device


def printer_matches(printer: PrinterConfig, device: Device) -> bool:
    """Given a printer's config and a device, return whether the device is that printer.

    A configured ``port`` matches the device it names (node or udev link); the
    USB ids match when vendor, product (if set), serial (if set) and USB path (if
    set) agree. Either is enough. A zero-config printer matches the boards of the
    built-in table that are its host's: Klipper's own id the Moonraker one's, every
    other board the OctoPrint one's.
    """
    if printer.port is not None and printer.port in (device.node, *device.links):
        return True
    if printer.known_boards:
        board = known_board(device.vendor_id, device.product_id)
        return board is not None and board.klipper == (printer.moonraker is not None)
    if printer.vendor_id is None or device.vendor_id != printer.vendor_id:
        return False
    if printer.product_id is not None and device.product_id != printer.product_id:
        return False
    if printer.serial is not None and device.serial != printer.serial:
        return False
    return printer.usb_path is None or device.usb_path == printer.usb_path


def matching_printers(printers: Sequence[PrinterConfig], device: Device) -> list[PrinterConfig]:
    """Given every printer and a device, return the printers that claim the device."""
    return [printer for printer in printers if printer_matches(printer, device)]


def stanza_for(device: Device, name: str) -> str:
    """Given a device, return a ``[[printer]]`` stanza a user can paste into the config.

    A device without a serial number gets its USB path instead, so that two
    identical boards (two CH340 printers) get stanzas that tell them apart. A board
    running Klipper (its USB id says so) gets ``[printer.moonraker]``.
    """
    lines = ["[[printer]]", f'name = "{name}"']
    if device.vendor_id is not None:
        lines.append(f'vendor_id = "{device.vendor_id}"')
        if device.product_id is not None:
            lines.append(f'product_id = "{device.product_id}"')
        usb_path = _stanza_usb_path(device)
        if device.serial:
            lines.append(f"serial = {toml_string(device.serial)}")
        elif usb_path is not None:
            lines.append(f"usb_path = {toml_string(usb_path)}")
    else:
        lines.append(f"port = {toml_string(device.paths[0])}")
    board = known_board(device.vendor_id, device.product_id)
    if board is not None and board.klipper:
        # Klipper's printer: its host is Klippy, through Moonraker (keys from [moonraker]).
        lines.append("[printer.moonraker]")
    return "\n".join(lines)


def suggested_name(device: Device) -> str:
    """Given a device, return a printer name a person would recognise.

    A board told apart by its USB path has the node name added to its model's,
    so that two identical boards do not get one name (which the config refuses).
    """
    node = device.node.rsplit("/", 1)[-1]
    source = device.model or node
    if device.model and _stanza_usb_path(device) is not None:
        source = f"{device.model}-{node}"
    name = "".join(c if c.isalnum() or c in "-_." else "-" for c in source.lower())
    return name.strip("-") or "printer"


def _stanza_usb_path(device: Device) -> str | None:
    # Only a USB device without a serial number needs its port to be told apart,
    # and only a path the config accepts may go into a stanza.
    if device.vendor_id is None or device.serial or not device.usb_path:
        return None
    return device.usb_path if is_usb_path(device.usb_path) else None
