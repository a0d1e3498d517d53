"""Serial devices as plain values, and the pure rules that match them to printers.

Everything udev tells us is turned into a :class:`Device` at the boundary (see
``udev.py``), so that matching and deciding never touch pyudev and can be tested
with tables of plain values.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union


@dataclass(frozen=True)
class Device:
    """One serial device node as udev described it when it appeared.

    ``instance`` changes every time the device (re)appears: it is udev's
    ``USEC_INITIALIZED`` stamp, or the USB device number, which the kernel assigns
    anew on every enumeration. Comparing instances tells whether a device vanished
    and came back while nobody was watching (the daemon was stopped).
    """

    devpath: str
    node: str
    links: tuple[str, ...] = ()
    vendor_id: str | None = None
    product_id: str | None = None
    serial: str | None = None
    usb_path: str | None = None
    vendor: str | None = None
    model: str | None = None
    driver: str | None = None
    instance: str = ""

    @property
    def usb_id(self) -> str | None:
        """Given a USB device, return ``"vvvv:pppp"``; ``None`` for a non-USB tty."""
        if self.vendor_id is None or self.product_id is None:
            return None
        return f"{self.vendor_id}:{self.product_id}"

    @property
    def paths(self) -> tuple[str, ...]:
        """Every path that names this device: the by-id links first, then the rest."""
        by_id = tuple(link for link in self.links if link.startswith("/dev/serial/by-id/"))
        others = tuple(link for link in self.links if link not in by_id)
        return (*by_id, self.node, *others)


@dataclass(frozen=True)
class DeviceAdded:
    """A tty appeared (udev ``add``), or was present when the daemon enumerated."""

    device: Device
    enumerated: bool = False


@dataclass(frozen=True)
class DeviceRemoved:
    """A tty vanished. Only the devpath is reliable: a remove may carry no ids."""

    devpath: str


DeviceEvent = Union[DeviceAdded, DeviceRemoved]


# What udev keeps of a USB serial number in ID_SERIAL_SHORT (systemd's
# allow_listed_char_for_devnode(), used by udev_replace_chars()): ASCII letters and
# digits, these, and valid UTF-8 beyond ASCII; everything else becomes "_".
_SERIAL_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789#+-.:=@_")
# C's isspace() in the "C" locale, which udev_replace_whitespace() uses.
_C_SPACE = " \t\n\v\f\r"


def udev_serial(raw: str) -> str:
    """Given a USB serial number as the device reports it, return it as udev's
    ``ID_SERIAL_SHORT`` writes it.

    As systemd's usb_id builtin does: white space at either end is dropped and each
    run of it inside becomes one "_" (``udev_replace_whitespace``); then every
    character but ASCII letters, digits, ``#+-.:=@_``, a ``\\x`` pair and a valid
    character beyond ASCII becomes "_" (``udev_replace_chars``). A Unicode
    replacement character stands for a byte that was not UTF-8, which udev replaces.
    """
    words = [word for word in re.split(f"[{re.escape(_C_SPACE)}]+", raw) if word]
    text = "_".join(words)
    kept: list[str] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\\" and text[index + 1 : index + 2] == "x":
            kept.append("\\x")
            index += 2
            continue
        kept.append(char if char in _SERIAL_ASCII or _valid_beyond_ascii(char) else "_")
        index += 1
    return "".join(kept)


def _valid_beyond_ascii(char: str) -> bool:
    # systemd's unichar_is_valid(): no surrogates, no noncharacters.
    point = ord(char)
    return (
        point >= 0x80
        and not 0xD800 <= point <= 0xDFFF
        and not 0xFDD0 <= point <= 0xFDEF
        and point & 0xFFFE != 0xFFFE
        and char != "\ufffd"
    )


def normalize_usb_id(value: str | None) -> str | None:
    """Given a vendor or product id as udev or a user wrote it, return 4 lowercase hex digits."""
    if value is None:
        return None
    text = value.strip().lower()
    if text.startswith("0x"):
        text = text[2:]
    if len(text) != 4 or any(c not in "0123456789abcdef" for c in text):
        return None
    return text
