"""The process that owns a umockdev testbed of simulated USB serial devices.

Run by Debian's ``/usr/bin/python3`` (which has ``gi``) under
``LD_PRELOAD=libumockdev-preload.so.0``, because ``UMockdev.Testbed.uevent()``
only reaches listeners when its caller is itself under the preload. The test
process drives it through :mod:`tests.support.testbed`; nothing else should.

Protocol: ``argv[1]`` is the number of an inherited ``SOCK_SEQPACKET`` socket.
Each command is one JSON object, each answer one JSON object (``{"ok": true,
...}`` or ``{"ok": false, "error": "..."}``). The answer to ``plug`` carries the
pty master as ``SCM_RIGHTS``. The first message, sent unasked, is
``{"ok": true, "root": "<testbed dir>"}``. End of file on the socket ends the
process, so a test that dies takes its testbed with it.

Why the ptys are made here rather than by umockdev (an ``N:`` line): umockdev
0.17.16 keeps every tty name it created in a table it never shrinks and aborts
when a name comes back, and it holds a master copy nobody can close safely.
Owning the pty lets a name be reused as the kernel reuses it, and lets an
unplug close the master so whoever holds the port sees a hang-up.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import struct
import sys
import termios
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import GLib, UMockdev  # noqa: E402

PCI_DEVPATH = "/devices/pci0000:00/0000:00:14.0"
PCI_ID_PATH = "pci-0000:00:14.0"
MAX_MESSAGE = 65536
MAX_DGRAM_QLEN = "/proc/sys/net/unix/max_dgram_qlen"
WANTED_DGRAM_QLEN = 1000
# What a USB CDC device or serial chip reports with nothing asserted by the host.
IDLE_MODEM_LINES = termios.TIOCM_DSR | termios.TIOCM_CTS | termios.TIOCM_CAR
MODEM_IOCTLS = frozenset({termios.TIOCMGET, termios.TIOCMBIS, termios.TIOCMBIC, termios.TIOCMSET})


@dataclass(frozen=True)
class Kind:
    """What one model of USB device looks like to the kernel and udev."""

    vendor_id: str
    product_id: str
    revision: str
    manufacturer: str | None
    product: str
    default_serial: str | None
    tty_prefix: str
    interface_driver: str
    serial_driver: str | None  # the usb-serial port driver; None for CDC ACM
    interfaces: str  # ID_USB_INTERFACES: class/subclass/protocol of each interface
    vendor_from_database: str | None = None
    model_from_database: str | None = None
    device_class: str = "00"


KINDS: dict[str, Kind] = {
    "prusa_mk3": Kind(
        vendor_id="2c99",
        product_id="0002",
        revision="0130",
        manufacturer="Prusa Research (prusa3d.com)",
        product="Original Prusa i3 MK3",
        default_serial="CZPX1017X004XK12345",
        tty_prefix="ttyACM",
        interface_driver="cdc_acm",
        serial_driver=None,
        interfaces=":020201:0a0000:",
        device_class="02",
    ),
    "ch340": Kind(
        vendor_id="1a86",
        product_id="7523",
        revision="0264",
        manufacturer=None,
        product="USB Serial",
        default_serial=None,
        tty_prefix="ttyUSB",
        interface_driver="ch341",
        serial_driver="ch341-uart",
        interfaces=":ff0102:",
        vendor_from_database="QinHeng Electronics",
        model_from_database="CH340 serial converter",
        device_class="ff",
    ),
    "ftdi": Kind(
        vendor_id="0403",
        product_id="6001",
        revision="0600",
        manufacturer="FTDI",
        product="FT232R USB UART",
        default_serial="A50285BI",
        tty_prefix="ttyUSB",
        interface_driver="ftdi_sio",
        serial_driver="ftdi_sio",
        interfaces=":ffffff:",
        vendor_from_database="Future Technology Devices International, Ltd",
        model_from_database="FT232 Serial (UART) IC",
    ),
    "mega2560": Kind(
        vendor_id="2341",
        product_id="0042",
        revision="0001",
        manufacturer="Arduino (www.arduino.cc)",
        product="0042",
        default_serial="55739323637351F0C1E1",
        tty_prefix="ttyACM",
        interface_driver="cdc_acm",
        serial_driver=None,
        interfaces=":020201:0a0000:",
        vendor_from_database="Arduino SA",
        model_from_database="Mega 2560 R3 (CDC ACM)",
        device_class="02",
    ),
    # A board running Klipper's own USB stack (src/generic/usb_cdc.c): the
    # OpenMoko-granted id, CDC ACM, bcdDevice 0x0100, the MCU model as product and
    # the chip's unique id as serial, so its by-id link reads like a real one:
    # usb-Klipper_stm32f446xx_<serial>-if00. Klippy itself talks to a Linux-process
    # MCU instead (tests/support/klipper_stack.py, SimulatedKlipperBoard).
    "klipper": Kind(
        vendor_id="1d50",
        product_id="614e",
        revision="0100",
        manufacturer="Klipper",
        product="stm32f446xx",
        default_serial="3A0033000851363131363530",
        tty_prefix="ttyACM",
        interface_driver="cdc_acm",
        serial_driver=None,
        interfaces=":020201:0a0000:",
        vendor_from_database="OpenMoko, Inc.",
        model_from_database="Klipper 3d-Printer Firmware",
        device_class="02",
    ),
    "gps": Kind(
        vendor_id="1546",
        product_id="01a7",
        revision="0100",
        manufacturer="u-blox AG - www.u-blox.com",
        product="u-blox 7 - GPS/GNSS Receiver",
        default_serial=None,
        tty_prefix="ttyACM",
        interface_driver="cdc_acm",
        serial_driver=None,
        interfaces=":020201:0a0000:",
        vendor_from_database="U-Blox AG",
        model_from_database="[u-blox 7]",
        device_class="02",
    ),
}

TTY_MAJORS = {"ttyACM": 166, "ttyUSB": 188}
PORT_PATTERN = re.compile(r"^([1-9][0-9]*)-([1-9][0-9]*(?:\.[1-9][0-9]*)*)$")


def udev_encode(text: str) -> str:
    """Given a USB descriptor string, return it as udev's usb_id writes ID_VENDOR/ID_MODEL."""
    collapsed = "_".join(text.split())
    return "".join(
        c if (c.isalnum() and c.isascii()) or c in "#+-.:=@_" else "_" for c in collapsed
    )


def udev_encode_hex(text: str) -> str:
    """Given a USB descriptor string, return it as udev's ``*_ENC`` properties write it."""
    return "".join(c if c.isalnum() and c.isascii() else f"\\x{ord(c):02x}" for c in text)


def driver_link(devpath: str, bus: str, driver: str) -> str:
    """Given a device path, return the relative sysfs ``driver`` link to ``bus``'s ``driver``."""
    depth = devpath.strip("/").count("/") + 1
    return "../" * depth + f"bus/{bus}/drivers/{driver}"


def block(devpath: str, lines: list[str]) -> str:
    """Given a devpath and its record lines, return one umockdev-record block."""
    return "\n".join([f"P: {devpath}", *lines]) + "\n\n"


@dataclass
class Present:
    """A plugged device, as the owner remembers it until it is unplugged."""

    tty: str
    tty_syspath: str
    # Every device the plug added, parents first; removed in reverse.
    syspaths: list[str]
    links: list[str]
    pts: str
    master_fd: int


@dataclass
class Bench:
    """The testbed and what is plugged into it."""

    testbed: Any
    root: str
    present: dict[str, Present] = field(default_factory=dict)  # by tty devpath
    devnums: dict[int, int] = field(default_factory=dict)  # last devnum per bus
    used_names: set[str] = field(default_factory=set)

    def exists(self, devpath: str) -> bool:
        """Given a devpath, return whether the testbed has that device."""
        return os.path.exists(os.path.join(self.root, "sys" + devpath.rstrip("/"), "uevent"))

    def next_devnum(self, bus: int) -> int:
        """Given a bus number, return the next USB device number on it."""
        # The kernel hands out device numbers 1..127 round robin; 1 is the root hub.
        last = self.devnums.get(bus, 1)
        devnum = 2 if last >= 127 else last + 1
        self.devnums[bus] = devnum
        return devnum

    def pick_tty(self, prefix: str, wanted: str | None) -> str:
        """Given a name prefix and maybe a wanted name, return the name to use.

        Raise ValueError if the wanted name is malformed or still plugged.
        """
        present = {p.tty for p in self.present.values()}
        if wanted is not None:
            if not wanted.startswith(prefix) or not wanted[len(prefix) :].isdigit():
                raise ValueError(f"tty {wanted!r} is not a {prefix}N name")
            if wanted in present:
                raise ValueError(f"{wanted} is still plugged")
            return wanted
        # A name never used in this testbed: what the kernel does while the old
        # node is still held open by someone (OctoPrint).
        index = 0
        while f"{prefix}{index}" in self.used_names or f"{prefix}{index}" in present:
            index += 1
        return f"{prefix}{index}"


def make_pty() -> tuple[int, str]:
    """Given nothing, return a new pty master fd and its slave's path, set up as umockdev does."""
    master, slave = os.openpty()
    try:
        name = os.ttyname(slave)
    finally:
        os.close(slave)
    attrs = termios.tcgetattr(master)
    # Raw enough for firmware emulation: no echo, no line editing, no CR/LF mangling.
    attrs[0] &= ~(termios.IGNCR | termios.INLCR | termios.ICRNL)
    attrs[1] &= ~(termios.ONLCR | termios.OCRNL)
    attrs[3] &= ~(termios.ICANON | termios.ECHO)
    termios.tcsetattr(master, termios.TCSANOW, attrs)
    return master, name


def remove_path(path: str) -> None:
    """Given a path, remove it if it exists (file or symlink)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def plug(bench: Bench, request: dict[str, Any]) -> tuple[dict[str, Any], int | None]:
    """Given a plug request, add the device, its node and links; return its data and pty master."""
    kind_name = str(request["kind"])
    kind = KINDS.get(kind_name)
    if kind is None:
        raise ValueError(f"unknown kind {kind_name!r}; known: {', '.join(sorted(KINDS))}")
    usb_port = str(request.get("usb_port") or "1-1")
    match = PORT_PATTERN.match(usb_port)
    if match is None:
        raise ValueError(f"usb_port {usb_port!r} is not like '1-1' or '1-1.2'")
    serial = request.get("serial")
    if serial is None:
        serial = kind.default_serial
    tty = bench.pick_tty(kind.tty_prefix, request.get("tty"))
    bus = int(match.group(1))
    chain = match.group(2).split(".")
    tty_index = int(tty[len(kind.tty_prefix) :])
    major = TTY_MAJORS[kind.tty_prefix]

    records: list[tuple[str, str]] = []  # (devpath, block), parents first
    added: list[str] = []

    def want(devpath: str, lines: list[str], owned: bool) -> None:
        if owned or not bench.exists(devpath):
            records.append((devpath, block(devpath, lines)))
            if owned:
                added.append(devpath)

    want(
        PCI_DEVPATH,
        [
            "E: SUBSYSTEM=pci",
            "E: DRIVER=xhci_hcd",
            "E: PCI_CLASS=C0330",
            "E: PCI_ID=8086:A36D",
            f"L: driver={driver_link(PCI_DEVPATH, 'pci', 'xhci_hcd')}",
            "A: vendor=0x8086",
            "A: device=0xa36d",
            "A: class=0x0c0330",
        ],
        owned=False,
    )
    parent = f"{PCI_DEVPATH}/usb{bus}"
    want(
        parent,
        usb_device_lines(
            parent,
            bus,
            1,
            "1d6b",
            "0002",
            "0601",
            "Linux Foundation",
            "xHCI Host Controller",
            "0000:00:14.0",
            "09",
            None,
            1,
        ),
        owned=False,
    )
    for depth in range(1, len(chain)):
        hub_port = f"{bus}-{'.'.join(chain[:depth])}"
        hub_path = f"{parent}/{hub_port}"
        if not bench.exists(hub_path):
            want(
                hub_path,
                usb_device_lines(
                    hub_path,
                    bus,
                    bench.next_devnum(bus),
                    "05e3",
                    "0610",
                    "9226",
                    "GenesysLogic",
                    "USB2.1 Hub",
                    None,
                    "09",
                    ".".join(chain[:depth]),
                    1,
                ),
                owned=False,
            )
        parent = hub_path

    if bench.exists(f"{parent}/{usb_port}"):
        raise ValueError(f"USB port {usb_port} already has a device plugged in")
    devnum = bench.next_devnum(bus)
    usb_devpath = f"{parent}/{usb_port}"
    n_interfaces = 2 if kind.serial_driver is None else 1
    want(
        usb_devpath,
        usb_device_lines(
            usb_devpath,
            bus,
            devnum,
            kind.vendor_id,
            kind.product_id,
            kind.revision,
            kind.manufacturer,
            kind.product,
            serial,
            kind.device_class,
            ".".join(chain),
            n_interfaces,
        ),
        owned=True,
    )
    interface = f"{usb_devpath}/{usb_port}:1.0"
    first_class = kind.interfaces.strip(":").split(":")[0]
    want(interface, interface_lines(interface, kind, 0, first_class), owned=True)
    if kind.serial_driver is None:
        data_interface = f"{usb_devpath}/{usb_port}:1.1"
        want(data_interface, interface_lines(data_interface, kind, 1, "0a0000"), owned=True)
        tty_parent = interface
        device_link = f"../../../{usb_port}:1.0"
    else:
        tty_parent = f"{interface}/{tty}"
        want(
            tty_parent,
            [
                "E: SUBSYSTEM=usb-serial",
                f"E: DRIVER={kind.serial_driver}",
                f"L: driver={driver_link(tty_parent, 'usb-serial', kind.serial_driver)}",
                "A: port_number=0",
            ],
            owned=True,
        )
        device_link = f"../../../{tty}"

    id_path = f"{PCI_ID_PATH}-usb-0:{'.'.join(chain)}:1.0"
    port_suffix = "" if kind.serial_driver is None else "-port0"
    vendor = udev_encode(kind.manufacturer) if kind.manufacturer else kind.vendor_id
    model = udev_encode(kind.product)
    id_serial = f"{vendor}_{model}" + (f"_{serial}" if serial else "")
    # Like 60-serial.rules: by-id needs only ID_SERIAL, which udev builds from
    # vendor and model when the device has no serial number (so a CH340 gets a
    # by-id link that every other CH340 shares).
    by_id = f"/dev/serial/by-id/usb-{id_serial}-if00{port_suffix}"
    by_path = f"/dev/serial/by-path/{id_path}{port_suffix}"
    links = [by_id, by_path]
    tty_devpath = f"{tty_parent}/tty/{tty}"
    usec = time.monotonic_ns() // 1000
    tty_lines = [
        "E: SUBSYSTEM=tty",
        f"E: DEVNAME=/dev/{tty}",
        f"E: MAJOR={major}",
        f"E: MINOR={tty_index}",
        f"E: USEC_INITIALIZED={usec}",
        "E: ID_BUS=usb",
        f"E: ID_VENDOR_ID={kind.vendor_id}",
        f"E: ID_MODEL_ID={kind.product_id}",
        f"E: ID_VENDOR={vendor}",
        f"E: ID_VENDOR_ENC={udev_encode_hex(kind.manufacturer or kind.vendor_id)}",
        f"E: ID_MODEL={model}",
        f"E: ID_MODEL_ENC={udev_encode_hex(kind.product)}",
        f"E: ID_REVISION={kind.revision}",
        f"E: ID_SERIAL={id_serial}",
        *([f"E: ID_SERIAL_SHORT={serial}"] if serial else []),
        "E: ID_TYPE=generic",
        f"E: ID_USB_INTERFACES={kind.interfaces}",
        "E: ID_USB_INTERFACE_NUM=00",
        f"E: ID_USB_DRIVER={kind.interface_driver}",
        *(
            [f"E: ID_VENDOR_FROM_DATABASE={kind.vendor_from_database}"]
            if kind.vendor_from_database
            else []
        ),
        *(
            [f"E: ID_MODEL_FROM_DATABASE={kind.model_from_database}"]
            if kind.model_from_database
            else []
        ),
        f"E: ID_PATH={id_path}",
        f"E: ID_PATH_TAG={re.sub(r'[^0-9A-Za-z-]', '_', id_path)}",
        *(["E: ID_MM_CANDIDATE=1"] if kind.serial_driver is None else []),
        f"E: DEVLINKS={' '.join(links)}",
        "E: TAGS=:systemd:",
        "E: CURRENT_TAGS=:systemd:",
        f"A: dev={major}:{tty_index}",
        f"L: device={device_link}",
    ]
    records.append((tty_devpath, block(tty_devpath, tty_lines)))
    added.append(tty_devpath)

    master, pts = make_pty()
    try:
        # Node first, then the records: add_from_string() sends the "add"
        # uevents, and a listener may open the node as soon as it hears one.
        node_path = os.path.join(bench.root, "dev", tty)
        remove_path(node_path)
        os.makedirs(os.path.dirname(node_path), exist_ok=True)
        os.symlink(pts, node_path)
        ptymap = os.path.join(bench.root, "dev", ".ptymap")
        os.makedirs(ptymap, exist_ok=True)
        # A stale entry for a reused /dev/pts number would be wrong: replace it.
        ptymap_entry = os.path.join(ptymap, pts.replace("/", "_"))
        remove_path(ptymap_entry)
        os.symlink(f"{major}:{tty_index}", ptymap_entry)
        for link in links:
            link_path = os.path.join(bench.root, link.lstrip("/"))
            os.makedirs(os.path.dirname(link_path), exist_ok=True)
            # A shared link (two CH340s) points at the newest device, as udev does.
            remove_path(link_path)
            os.symlink(os.path.relpath(f"/dev/{tty}", os.path.dirname(link)), link_path)
        for devpath, text in records:
            if not bench.testbed.add_from_string(text):
                raise RuntimeError(f"umockdev refused the record for {devpath}")
    except BaseException:
        os.close(master)
        raise

    bench.used_names.add(tty)
    bench.present[tty_devpath] = Present(
        tty=tty,
        tty_syspath="/sys" + tty_devpath,
        syspaths=["/sys" + p for p in added],
        links=links,
        pts=pts,
        master_fd=master,
    )
    description = {
        "kind": kind_name,
        "node": f"/dev/{tty}",
        "devpath": tty_devpath,
        "tty": tty,
        "by_id": by_id,
        "by_path": by_path,
        "usb_path": id_path,
        "vendor_id": kind.vendor_id,
        "product_id": kind.product_id,
        "serial": serial,
        "busnum": bus,
        "devnum": devnum,
        "usec_initialized": str(usec),
        "pts": pts,
    }
    return description, master


def usb_device_lines(
    devpath: str,
    bus: int,
    devnum: int,
    vendor_id: str,
    product_id: str,
    revision: str,
    manufacturer: str | None,
    product: str,
    serial: str | None,
    device_class: str,
    port_path: str | None,
    n_interfaces: int,
) -> list[str]:
    """Given a USB device's descriptors, return its record lines (a usb_device)."""
    lines = [
        "E: SUBSYSTEM=usb",
        "E: DEVTYPE=usb_device",
        "E: DRIVER=usb",
        f"E: PRODUCT={int(vendor_id, 16):x}/{int(product_id, 16):x}/{int(revision, 16):x}",
        f"E: TYPE={int(device_class, 16)}/0/0",
        f"E: BUSNUM={bus:03d}",
        f"E: DEVNUM={devnum:03d}",
        f"L: driver={driver_link(devpath, 'usb', 'usb')}",
        f"A: idVendor={vendor_id}",
        f"A: idProduct={product_id}",
        f"A: bcdDevice={revision}",
        f"A: bDeviceClass={device_class}",
        f"A: bNumInterfaces={n_interfaces:2d}",
        "A: bConfigurationValue=1",
        f"A: busnum={bus}",
        f"A: devnum={devnum}",
        f"A: product={product}",
        "A: speed=12",
        "A: version= 2.00",
    ]
    if port_path is not None:
        lines.append(f"A: devpath={port_path}")
    if manufacturer is not None:
        lines.append(f"A: manufacturer={manufacturer}")
    if serial is not None:
        lines.append(f"A: serial={serial}")
    return lines


def interface_lines(devpath: str, kind: Kind, number: int, klass: str) -> list[str]:
    """Given an interface number and its class triple, return its record lines."""
    cls, sub, proto = klass[0:2], klass[2:4], klass[4:6]
    return [
        "E: SUBSYSTEM=usb",
        "E: DEVTYPE=usb_interface",
        f"E: DRIVER={kind.interface_driver}",
        f"E: INTERFACE={int(cls, 16)}/{int(sub, 16)}/{int(proto, 16)}",
        f"E: MODALIAS=usb:v{kind.vendor_id.upper()}p{kind.product_id.upper()}"
        f"d{kind.revision}dc{kind.device_class.upper()}dsc00dp00"
        f"ic{cls.upper()}isc{sub.upper()}ip{proto.upper()}in{number:02X}",
        f"L: driver={driver_link(devpath, 'usb', kind.interface_driver)}",
        f"A: bInterfaceNumber={number:02x}",
        f"A: bInterfaceClass={cls}",
        f"A: bInterfaceSubClass={sub}",
        f"A: bInterfaceProtocol={proto}",
        "A: bAlternateSetting= 0",
    ]


def unplug(bench: Bench, request: dict[str, Any]) -> dict[str, Any]:
    """Given an unplug request, hang up, send the remove uevents and remove the device tree."""
    devpath = str(request["devpath"])
    present = bench.present.pop(devpath, None)
    if present is None:
        raise ValueError(f"{devpath} is not plugged")
    # The holder of the port sees the hang-up first, then udev hears of it, as on
    # real hardware; the test closes its own copy of the master before asking.
    os.close(present.master_fd)
    for syspath in reversed(present.syspaths):
        # 0.17.16's remove_device() sends nothing, and the uevent needs the
        # sysfs entry to still exist.
        bench.testbed.uevent(syspath, "remove")
    for syspath in reversed(present.syspaths):
        bench.testbed.remove_device(syspath)
    remove_path(os.path.join(bench.root, "dev", present.tty))
    remove_path(os.path.join(bench.root, "dev", ".ptymap", present.pts.replace("/", "_")))
    for link in present.links:
        link_path = os.path.join(bench.root, link.lstrip("/"))
        others = [p for p in bench.present.values() if link in p.links]
        if others:
            # Another device claims the same (shared) link: it takes it over.
            remove_path(link_path)
            os.symlink(os.path.relpath(f"/dev/{others[-1].tty}", os.path.dirname(link)), link_path)
        else:
            remove_path(link_path)
    return {}


def uevent(bench: Bench, request: dict[str, Any]) -> dict[str, Any]:
    """Given a devpath and an action, send that uevent for a plugged tty."""
    devpath = str(request["devpath"])
    action = str(request["action"])
    present = bench.present.get(devpath)
    if present is None:
        raise ValueError(f"{devpath} is not plugged")
    bench.testbed.uevent(present.tty_syspath, action)
    return {}


def add_record(bench: Bench, request: dict[str, Any]) -> dict[str, Any]:
    """Given raw umockdev-record text (odd devices: virtual ttys, ttys with no node), add it."""
    text = str(request["record"])
    for line in text.splitlines():
        if line.startswith("P: ") and bench.exists(line[3:].strip()):
            # add_from_string() would abort the whole process on this.
            raise ValueError(f"{line[3:].strip()} already exists")
    if not bench.testbed.add_from_string(text):
        raise RuntimeError("umockdev refused the record")
    return {}


class ModemLines(UMockdev.IoctlBase):  # type: ignore[misc]
    """The ``_default`` ioctl handler: real ioctls, plus the modem lines a pty lacks.

    umockdev 0.17.16 routes every ioctl on a testbed node to its owner and its own
    default answers ENOTTY, which breaks ``TIOCINQ`` (pyserial's ``in_waiting``)
    and DTR toggling. Each ioctl is executed for real on the client's own fd,
    except ``TIOCM*``, which a pty does not implement, kept per open file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, int] = {}

    def do_handle_ioctl(self, client: Any) -> bool:
        try:
            request = client.get_request()
            if request in MODEM_IOCTLS:
                self._modem(client, request)
            else:
                result, error = client.execute()
                client.complete(result, error)
        except GLib.Error as e:
            # The client went away mid-call; nothing left to answer.
            print(f"testbed owner: ioctl client lost: {e.message}", file=sys.stderr)
        return True

    def _modem(self, client: Any, request: int) -> None:
        for gone in [c for c in self.lines if not c.get_connected()]:
            del self.lines[gone]
        data = client.get_arg().resolve(0, 4)
        if data is None:
            client.complete(-1, 14)  # EFAULT: a NULL argument
            return
        current = self.lines.get(client, IDLE_MODEM_LINES)
        if request == termios.TIOCMGET:
            data.update(0, list(struct.pack("i", current)))
        else:
            (value,) = struct.unpack("i", bytes(data.retrieve()))
            if request == termios.TIOCMBIS:
                current |= value
            elif request == termios.TIOCMBIC:
                current &= ~value
            else:
                current = value
            self.lines[client] = current
        client.complete(0, 0)


def raise_dgram_qlen() -> None:
    """Given root, let a monitor queue 1000 uevents instead of 10 (the emulated netlink)."""
    try:
        with open(MAX_DGRAM_QLEN) as f:
            current = int(f.read().strip() or 0)
        if current < WANTED_DGRAM_QLEN:
            with open(MAX_DGRAM_QLEN, "w") as f:
                f.write(str(WANTED_DGRAM_QLEN))
    except (OSError, ValueError) as e:
        print(f"testbed owner: cannot raise {MAX_DGRAM_QLEN}: {e}", file=sys.stderr)


def send(channel: socket.socket, message: dict[str, Any], fd: int | None = None) -> None:
    """Given a message and maybe an fd, send them as one packet."""
    data = json.dumps(message).encode()
    if fd is None:
        channel.sendall(data)
    else:
        socket.send_fds(channel, [data], [fd])


def main(argv: list[str]) -> int:
    """Given ``[prog, fd]``, own a testbed until the fd's peer goes away; return the exit code."""
    channel = socket.socket(fileno=int(argv[1]))
    raise_dgram_qlen()
    testbed = UMockdev.Testbed.new()
    root = testbed.get_root_dir()
    default_socket = os.path.join(root, "ioctl", "_default")
    remove_path(default_socket)
    handler = ModemLines()
    if not testbed.attach_ioctl("_default", handler):
        raise RuntimeError("umockdev refused the _default ioctl handler")
    bench = Bench(testbed=testbed, root=root)
    loop = GLib.MainLoop()
    commands: dict[str, Callable[[Bench, dict[str, Any]], dict[str, Any]]] = {
        "unplug": unplug,
        "uevent": uevent,
        "add_record": add_record,
    }

    def on_command(_fd: int, _condition: int) -> bool:
        try:
            data = channel.recv(MAX_MESSAGE)
        except OSError:
            data = b""
        if not data:
            loop.quit()
            return False
        fd: int | None = None
        op = None
        try:
            request = json.loads(data)
            op = request.get("op")
            if op == "plug":
                answer, fd = plug(bench, request)
            elif op == "close":
                loop.quit()
                answer = {}
            elif op in commands:
                answer = commands[op](bench, request)
            else:
                raise ValueError(f"unknown op {op!r}")
            reply = {"ok": True, **answer}
        except Exception as e:  # every failure goes back to the test, with its cause
            traceback.print_exc()
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        send(channel, reply, fd)
        return op != "close"

    GLib.unix_fd_add_full(
        GLib.PRIORITY_DEFAULT,
        channel.fileno(),
        GLib.IOCondition.IN | GLib.IOCondition.HUP | GLib.IOCondition.ERR,
        on_command,
    )
    GLib.unix_signal_add(GLib.PRIORITY_HIGH, 15, lambda: loop.quit() or False)
    send(channel, {"ok": True, "root": root, "pid": os.getpid()})
    loop.run()
    for present in bench.present.values():
        os.close(present.master_fd)
    testbed.detach_ioctl("_default")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
