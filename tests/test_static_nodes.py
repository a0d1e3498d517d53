"""Presence behind a static node: a real character node (never opened) and a sysfs tree.

The node is made with mknod for a device number nothing on this machine uses, so
opening it would fail: the code must decide from sysfs alone. The sysfs tree is
built in a temp dir in the kernel's layout (/sys/dev/char/M:m links into /devices).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from reconnectd.config import parse_config
from reconnectd.matching import matching_printers
from reconnectd.static_nodes import node_device

MAJOR, MINOR = 166, 77  # ttyACM's major; a minor no real device has here
USB_DEVICE = "devices/pci0000:00/0000:00:14.0/usb1/1-1"
TTY = f"{USB_DEVICE}/1-1:1.0/tty/ttyACM77"


@pytest.fixture
def node(tmp_path: Path) -> str:
    if os.geteuid() != 0:
        pytest.skip("mknod needs root")
    path = tmp_path / "dev" / "ttyACM0"
    path.parent.mkdir()
    os.mknod(path, 0o660 | 0o020000, os.makedev(MAJOR, MINOR))
    return str(path)


def plug(sys_root: Path, devnum: int = 5, *, usb: bool = True, serial: str = "CZPX9") -> None:
    """Make the sysfs side of the device appear, as the kernel does on a plug."""
    tty = sys_root / TTY
    tty.mkdir(parents=True)
    (tty / "dev").write_text(f"{MAJOR}:{MINOR}\n")
    if usb:
        device = sys_root / USB_DEVICE
        for name, value in (
            ("idVendor", "2c99"),
            ("idProduct", "0002"),
            ("serial", serial),
            ("busnum", "1"),
            ("devnum", str(devnum)),
        ):
            (device / name).write_text(value + "\n")
    links = sys_root / "dev" / "char"
    links.mkdir(parents=True, exist_ok=True)
    (links / f"{MAJOR}:{MINOR}").symlink_to(f"../../{TTY}")


def unplug(sys_root: Path) -> None:
    shutil.rmtree(sys_root / "devices")
    (sys_root / "dev" / "char" / f"{MAJOR}:{MINOR}").unlink()


def test_static_node_without_a_device_is_absent(tmp_path: Path, node: str) -> None:
    (tmp_path / "sys" / "dev" / "char").mkdir(parents=True)
    assert node_device(node, str(tmp_path / "sys")) is None


def test_device_behind_the_node_is_read_from_sysfs(tmp_path: Path, node: str) -> None:
    sys_root = tmp_path / "sys"
    plug(sys_root)
    device = node_device(node, str(sys_root))
    assert device is not None
    assert device.node == node
    assert device.devpath == "/" + TTY
    assert (device.vendor_id, device.product_id, device.serial) == ("2c99", "0002", "CZPX9")
    assert device.instance == "usb:1:5"


def test_the_serial_is_read_in_udevs_form_as_the_config_writes_it(
    tmp_path: Path, node: str
) -> None:
    """No udev runs in the container to make ID_SERIAL_SHORT: the serial the config
    must name (udev's form) still matches the device's."""
    sys_root = tmp_path / "sys"
    plug(sys_root, serial=" CZPX 17,X04 ")
    device = node_device(node, str(sys_root))
    assert device is not None and device.serial == "CZPX_17_X04"
    printers = parse_config(
        '[[printer]]\nname = "lxc"\nvendor_id = "2c99"\nserial = "CZPX_17_X04"\n',
        Path("/etc/reconnectd/reconnectd.toml"),
    ).printers
    assert [p.name for p in matching_printers(printers, device)] == ["lxc"]


def test_a_device_that_comes_back_is_a_new_instance(tmp_path: Path, node: str) -> None:
    sys_root = tmp_path / "sys"
    plug(sys_root, devnum=5)
    first = node_device(node, str(sys_root))
    unplug(sys_root)
    assert node_device(node, str(sys_root)) is None
    plug(sys_root, devnum=6)
    again = node_device(node, str(sys_root))
    assert first is not None and again is not None
    assert again.instance != first.instance and again.devpath == first.devpath


def test_a_non_usb_device_is_present_without_ids(tmp_path: Path, node: str) -> None:
    sys_root = tmp_path / "sys"
    plug(sys_root, usb=False)
    device = node_device(node, str(sys_root))
    assert device is not None and device.vendor_id is None
    assert device.instance.startswith("sys:")


@pytest.mark.parametrize("what", ["missing", "regular file", "directory"])
def test_a_path_that_is_no_character_node_is_absent(tmp_path: Path, what: str) -> None:
    path = tmp_path / "ttyACM0"
    if what == "regular file":
        path.write_text("")
    elif what == "directory":
        path.mkdir()
    assert node_device(str(path), str(tmp_path / "sys")) is None
