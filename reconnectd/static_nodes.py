"""Whether a device is behind a static device node, read from sysfs without opening it.

In an LXC container the printer's node is made once with ``mknod`` and stays whether
or not the printer is attached, and no udev runs inside to announce anything. The
node's device number says which kernel device it would reach; sysfs says whether
that device exists (``/sys/dev/char/MAJOR:MINOR``) and, through its parents, which
USB device it belongs to. Opening the port instead would reset many printers (DTR)
and, for a node with nothing behind it, could hang OctoPrint in "Opening serial
connection" — so it is never opened here.
"""

from __future__ import annotations

import logging
import os
import stat

from reconnectd.devices import Device, normalize_usb_id, udev_serial

log = logging.getLogger(__name__)

SYS_ROOT = "/sys"


def node_device(port: str, sys_root: str = SYS_ROOT) -> Device | None:
    """Given a device node path, return the device behind it as sysfs describes it.

    Return None when the path is missing or not a character device, or when no
    device with its number exists now. The Device's ``instance`` changes when the
    device comes back (a new USB device number, or a new sysfs directory).
    """
    try:
        info = os.stat(port)
    except OSError:
        return None
    if not stat.S_ISCHR(info.st_mode):
        return None
    number = f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    device_dir = os.path.realpath(os.path.join(sys_root, "dev", "char", number))
    if not os.path.isdir(device_dir):
        return None
    devpath = device_dir[len(sys_root) :] if device_dir.startswith(sys_root + "/") else device_dir
    usb = _usb_parent(device_dir, sys_root)
    if usb is not None:
        busnum, devnum = _read(usb, "busnum"), _read(usb, "devnum")
        instance = f"usb:{busnum}:{devnum}" if busnum and devnum else _made_at(device_dir)
        return Device(
            devpath=devpath,
            node=port,
            vendor_id=normalize_usb_id(_read(usb, "idVendor")),
            product_id=normalize_usb_id(_read(usb, "idProduct")),
            serial=_serial(usb),
            instance=instance,
        )
    return Device(devpath=devpath, node=port, instance=_made_at(device_dir))


def _usb_parent(device_dir: str, sys_root: str) -> str | None:
    """Given a device's sysfs directory, return its USB device's directory, if any."""
    top = os.path.join(sys_root, "devices")
    current = os.path.dirname(device_dir)
    while current.startswith(top) and current != top:
        if os.path.exists(os.path.join(current, "idVendor")):
            return current
        current = os.path.dirname(current)
    return None


def _serial(usb: str) -> str | None:
    # In udev's form (ID_SERIAL_SHORT), as the config's serial is written.
    raw = _read(usb, "serial")
    return (udev_serial(raw) or None) if raw else None


def _read(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name), encoding="utf-8", errors="replace") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _made_at(directory: str) -> str:
    # sysfs creates a device's directory anew when the device comes back.
    try:
        return f"sys:{os.stat(directory).st_ctime_ns}"
    except OSError:
        return ""
