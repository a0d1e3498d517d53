"""reconnectd.udev against real libudev and pyudev, with USB printers simulated by umockdev.

The code under test runs in a probe process started in the testbed's
environment (see ``tests/support/udev_probe.py``); the test plugs and unplugs
devices and plays the firmware on the pty master.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from reconnectd.devices import Device, DeviceAdded, DeviceEvent, DeviceRemoved
from tests.support.testbed import Plugged, Testbed, TestbedError, unavailable_reason
from tests.support.udev_probe import ProbeError, UdevProbe, device_from_json

pytestmark = pytest.mark.umockdev

_REASON = unavailable_reason()
if _REASON is not None:
    pytest.skip(f"umockdev testbed unavailable: {_REASON}", allow_module_level=True)

ProbeFactory = Callable[[], UdevProbe]


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Testbed]:
    with Testbed(tmp_path / "bench") as testbed:
        yield testbed


@pytest.fixture
def start_probe(bench: Testbed, tmp_path: Path) -> Iterator[ProbeFactory]:
    probes: list[UdevProbe] = []

    def start() -> UdevProbe:
        probe = UdevProbe(bench.env, tmp_path / f"probe-{len(probes)}.log")
        probes.append(probe)
        return probe

    yield start
    for probe in probes:
        probe.close()


def started(probe: UdevProbe) -> dict[str, Device]:
    """Given a fresh probe, start its watcher and return the devices present, by node."""
    return {d.node: d for d in map(device_from_json, probe.call("start"))}


def added(events: list[DeviceEvent]) -> list[Device]:
    return [e.device for e in events if isinstance(e, DeviceAdded)]


def removed(events: list[DeviceEvent]) -> list[str]:
    return [e.devpath for e in events if isinstance(e, DeviceRemoved)]


def wait_added(probe: UdevProbe, node: str) -> Device:
    """Given a probe, wait for the first DeviceAdded for node and return its device."""
    probe.wait_events(lambda es: any(d.node == node for d in added(es)), f"add of {node}")
    return next(d for d in added(probe.events) if d.node == node)


def wait_removed(probe: UdevProbe, devpath: str) -> None:
    probe.wait_events(lambda es: devpath in removed(es), f"remove of {devpath}")


def read_master(plugged: Plugged, until: bytes, timeout: float = 5.0) -> bytes:
    """Given a plugged device, read its master until ``until`` arrives; fail at the deadline."""
    deadline = time.monotonic() + timeout
    data = b""
    while until not in data:
        left = deadline - time.monotonic()
        assert left > 0, f"firmware side got only {data!r}, waiting for {until!r}"
        if select.select([plugged.master_fd], [], [], left)[0]:
            data += os.read(plugged.master_fd, 4096)
    return data


def assert_matches(device: Device, plugged: Plugged) -> None:
    """Given what the daemon saw and what was plugged, check every udev-derived field."""
    assert device.node == plugged.node
    assert device.devpath == plugged.devpath
    assert device.vendor_id == plugged.vendor_id
    assert device.product_id == plugged.product_id
    assert device.serial == plugged.serial
    assert device.usb_path == plugged.usb_path
    assert device.instance == plugged.usec_initialized
    assert plugged.by_path in device.links
    if plugged.by_id is not None:
        assert plugged.by_id in device.links
    assert list(device.links) == sorted(device.links)


def test_start_enumerates_present_printers_with_their_ids(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    prusa = bench.plug("prusa_mk3", usb_port="1-1")
    ch340 = bench.plug("ch340", usb_port="1-2")
    ftdi = bench.plug("ftdi", usb_port="1-3")
    gps = bench.plug("gps", usb_port="1-4")

    present = started(start_probe())

    assert sorted(present) == ["/dev/ttyACM0", "/dev/ttyACM1", "/dev/ttyUSB0", "/dev/ttyUSB1"]
    for plugged in (prusa, ch340, ftdi, gps):
        assert_matches(present[plugged.node], plugged)
    assert present[prusa.node].serial == "CZPX1017X004XK12345"
    assert present[prusa.node].usb_id == "2c99:0002"
    assert present[prusa.node].driver == "cdc_acm"
    assert present[prusa.node].usb_path == "pci-0000:00:14.0-usb-0:1:1.0"
    assert present[prusa.node].paths[0] == (
        "/dev/serial/by-id/usb-Prusa_Research__prusa3d.com__Original_Prusa_i3_MK3_"
        "CZPX1017X004XK12345-if00"
    )
    assert present[ch340.node].usb_id == "1a86:7523"
    assert present[ch340.node].serial is None
    assert present[ch340.node].driver == "ch341"
    assert present[ch340.node].vendor == "QinHeng Electronics"
    assert present[ftdi.node].usb_id == "0403:6001"
    assert present[ftdi.node].serial == "A50285BI"
    assert present[ftdi.node].links == (
        "/dev/serial/by-id/usb-FTDI_FT232R_USB_UART_A50285BI-if00-port0",
        "/dev/serial/by-path/pci-0000:00:14.0-usb-0:3:1.0-port0",
    )
    assert present[gps.node].usb_id == "1546:01a7"
    assert present[gps.node].serial is None


def test_plug_after_start_is_reported_as_added(bench: Testbed, start_probe: ProbeFactory) -> None:
    probe = start_probe()
    assert started(probe) == {}

    mega = bench.plug("mega2560")
    device = wait_added(probe, mega.node)

    assert_matches(device, mega)
    assert device.usb_id == "2341:0042"
    assert device.serial == "55739323637351F0C1E1"
    assert device.model == "Mega 2560 R3 (CDC ACM)"


def test_unplug_is_reported_with_the_devpath_seen_at_add(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    probe = start_probe()
    started(probe)
    prusa = bench.plug("prusa_mk3")
    seen = wait_added(probe, prusa.node)

    bench.unplug(prusa)
    wait_removed(probe, seen.devpath)

    assert removed(probe.events) == [seen.devpath]
    assert probe.call("list") == []


def test_replug_comes_back_as_a_new_instance(bench: Testbed, start_probe: ProbeFactory) -> None:
    first = bench.plug("prusa_mk3")
    probe = start_probe()
    before = started(probe)[first.node]
    bench.unplug(first)
    wait_removed(probe, first.devpath)

    # The old node is still held open somewhere: the kernel picks a new name.
    second = bench.plug("prusa_mk3")
    renamed = wait_added(probe, second.node)
    bench.unplug(second)
    wait_removed(probe, second.devpath)
    # Released by then: the old name comes back.
    third = bench.plug("prusa_mk3", tty="ttyACM0")
    probe.wait_events(lambda es: len(added(es)) == 2, "add of the third plug")
    same_name = added(probe.events)[-1]

    assert renamed.node == "/dev/ttyACM1" != before.node
    assert renamed.serial == before.serial
    assert renamed.links == before.links  # by-id and by-path follow the printer
    assert len({before.instance, renamed.instance, same_name.instance}) == 3
    assert same_name.node == before.node
    assert same_name.devpath == before.devpath
    assert_matches(same_name, third)


def test_two_devices_on_different_ports_at_once(bench: Testbed, start_probe: ProbeFactory) -> None:
    probe = start_probe()
    started(probe)
    left = bench.plug("prusa_mk3", serial="CZPX0000X000XK00001", usb_port="1-1")
    right = bench.plug("prusa_mk3", serial="CZPX0000X000XK00002", usb_port="1-2")
    left_seen = wait_added(probe, left.node)
    right_seen = wait_added(probe, right.node)

    bench.unplug(left)
    wait_removed(probe, left.devpath)

    assert_matches(left_seen, left)
    assert_matches(right_seen, right)
    assert left_seen.usb_path != right_seen.usb_path
    assert left_seen.instance != right_seen.instance
    assert removed(probe.events) == [left.devpath]
    assert [d["node"] for d in probe.call("list")] == [right.node]


def test_a_device_plugged_while_start_enumerates_is_not_lost(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    probe = start_probe()
    assert probe.call("start_paused") == "monitoring"

    # The monitor is open, the enumeration has not run yet.
    early = bench.plug("ftdi")
    probe.send("continue")
    present = {d.node: d for d in map(device_from_json, probe.reply("start"))}
    wait_added(probe, early.node)
    late = bench.plug("ch340", usb_port="1-2")
    late_seen = wait_added(probe, late.node)

    assert early.node in present  # enumerated...
    assert early.node in [d.node for d in added(probe.events)]  # ...and heard: never lost
    assert_matches(late_seen, late)


def test_change_with_a_node_is_an_add_and_other_actions_are_ignored(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    probe = start_probe()
    started(probe)
    ftdi = bench.plug("ftdi")
    wait_added(probe, ftdi.node)

    bench.send_uevent(ftdi, "bind")
    bench.send_uevent(ftdi, "change")
    probe.wait_events(lambda es: len(es) >= 2, "the change")

    assert len(probe.events) == 2  # the bind before the change produced nothing
    assert added(probe.events)[1] == added(probe.events)[0]


def test_a_burst_of_uevents_is_drained_completely(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    probe = start_probe()
    started(probe)
    prusa = bench.plug("prusa_mk3")
    for _ in range(40):
        bench.send_uevent(prusa, "add")
    bench.send_uevent(prusa, "remove")

    probe.wait_events(lambda es: len(removed(es)) == 1, "the remove after the burst")

    assert len(added(probe.events)) == 41
    assert isinstance(probe.events[-1], DeviceRemoved)


def test_list_serial_devices_is_sorted_and_skips_virtual_ttys(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    bench.add_record(
        "P: /devices/virtual/tty/tty0\nE: SUBSYSTEM=tty\nE: DEVNAME=/dev/tty0\n\n"
        "P: /devices/virtual/tty/ptmx\nE: SUBSYSTEM=tty\nE: DEVNAME=/dev/ptmx\n\n"
        "P: /devices/platform/serial8250\nE: SUBSYSTEM=platform\nE: DRIVER=serial8250\n\n"
        "P: /devices/platform/serial8250/tty/ttyS0\nE: SUBSYSTEM=tty\nE: DEVNAME=/dev/ttyS0\n"
    )
    bench.plug("ftdi", usb_port="1-2")
    bench.plug("prusa_mk3", usb_port="1-1")
    probe = start_probe()

    listed = [device_from_json(d) for d in probe.call("list")]

    assert [d.node for d in listed] == ["/dev/ttyACM0", "/dev/ttyS0", "/dev/ttyUSB0"]
    platform = listed[1]
    assert (platform.usb_id, platform.serial, platform.instance) == (None, None, "")


def test_device_from_udev_is_none_without_a_node_or_when_virtual(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    bench.add_record(
        "P: /devices/platform/nodeless/tty/ttyX9\nE: SUBSYSTEM=tty\n\n"
        "P: /devices/virtual/tty/console\nE: SUBSYSTEM=tty\nE: DEVNAME=/dev/console\n"
    )
    prusa = bench.plug("prusa_mk3")
    probe = start_probe()

    nodeless = probe.call("from_syspath", syspath="/sys/devices/platform/nodeless/tty/ttyX9")
    virtual = probe.call("from_syspath", syspath="/sys/devices/virtual/tty/console")
    real = probe.call("from_syspath", syspath="/sys" + prusa.devpath)

    assert nodeless is None
    assert virtual is None
    assert_matches(device_from_json(real), prusa)


def test_a_serial_read_from_sysfs_is_in_udevs_form(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    """Without udev's ID_SERIAL_SHORT (a serial with a comma gets none, and no rules
    ran here), the USB device's own serial is read and written as udev would write it,
    the form the config insists on."""
    bench.add_record(
        "P: /devices/pci0000:00/0000:00:14.0/usb9/9-1\nE: SUBSYSTEM=usb\n"
        "E: DEVTYPE=usb_device\nA: idVendor=2c99\nA: idProduct=0002\n"
        "A: serial= CZPX 17,X04 \nA: busnum=9\nA: devnum=2\n\n"
        "P: /devices/pci0000:00/0000:00:14.0/usb9/9-1/9-1:1.0\nE: SUBSYSTEM=usb\n"
        "E: DEVTYPE=usb_interface\n\n"
        "P: /devices/pci0000:00/0000:00:14.0/usb9/9-1/9-1:1.0/tty/ttyACM9\n"
        "E: SUBSYSTEM=tty\nE: DEVNAME=/dev/ttyACM9\n"
    )
    probe = start_probe()
    found = probe.call(
        "from_syspath", syspath="/sys/devices/pci0000:00/0000:00:14.0/usb9/9-1/9-1:1.0/tty/ttyACM9"
    )
    device = device_from_json(found)
    assert (device.vendor_id, device.product_id, device.serial) == ("2c99", "0002", "CZPX_17_X04")


def test_the_pty_carries_bytes_both_ways_and_hangs_up_on_unplug(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    prusa = bench.plug("prusa_mk3")
    assert prusa.by_id is not None
    probe = start_probe()
    fd = probe.call("open", path=prusa.by_id)

    probe.call("write", fd=fd, data="M115\n")
    from_host = read_master(prusa, b"\n")
    os.write(prusa.master_fd, b"ok\n")
    to_host = probe.call("read", fd=fd, timeout=5)

    bench.unplug(prusa)
    after_unplug = probe.call("read", fd=fd, timeout=5)
    with pytest.raises(ProbeError, match=r"Errno 5\]"):
        probe.call("write", fd=fd, data="M105\n")

    assert from_host == b"M115\n"
    assert to_host == {"data": "ok\n"}
    assert prusa.master_closed
    # A hung-up tty reads as end of file, or EIO for a read already waiting.
    assert after_unplug in ({"data": ""}, {"errno": errno.EIO})


def test_closing_a_port_while_another_thread_uses_it_harms_nobody(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    # umockdev 0.17.16 alone aborts both this process and the testbed owner on the first
    # or second round (tests/support/close_guard.c): the flake that took whole test
    # modules down whenever OctoPrint disconnected a printing printer.
    ch340 = bench.plug("ch340")
    probe = start_probe()

    assert probe.call("close_while_busy", path=ch340.node, rounds=300) is None
    after = bench.plug("ftdi", usb_port="1-2")
    fd = probe.call("open", path=after.node)
    os.write(after.master_fd, b"ok\n")

    assert probe.call("read", fd=fd, timeout=5) == {"data": "ok\n"}


def test_modem_line_ioctls_work_and_tiocinq_is_real(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    ch340 = bench.plug("ch340")
    probe = start_probe()
    fd = probe.call("open", path=ch340.node)

    lines = probe.call("modem", fd=fd)
    empty = probe.call("inq", fd=fd)
    os.write(ch340.master_fd, b"start\n")
    deadline = time.monotonic() + 5
    while (waiting := probe.call("inq", fd=fd)) < 6 and time.monotonic() < deadline:
        pass

    assert not lines["before"] & termios.TIOCM_DTR
    assert lines["raised"] & termios.TIOCM_DTR
    assert lines["raised"] & termios.TIOCM_RTS
    assert not lines["lowered"] & termios.TIOCM_DTR
    assert lines["lowered"] & termios.TIOCM_RTS
    assert empty == 0
    assert waiting == 6


def test_replugging_many_times_in_one_testbed(bench: Testbed) -> None:
    nodes = []
    for _ in range(6):
        plugged = bench.plug("ch340")
        nodes.append(plugged.node)
        bench.unplug(plugged)
    again = bench.plug("ch340", tty="ttyUSB0")

    assert nodes == [f"/dev/ttyUSB{i}" for i in range(6)]
    assert again.node == "/dev/ttyUSB0"
    assert not (bench.root / "dev" / "ttyUSB5").exists()
    assert (bench.root / "dev" / "ttyUSB0").is_symlink()


def test_a_dead_testbed_owner_is_an_error_not_a_hang(bench: Testbed) -> None:
    os.kill(bench.owner_pid, signal.SIGKILL)

    started_at = time.monotonic()
    with pytest.raises(TestbedError, match="testbed owner exited with code -9"):
        bench.plug("prusa_mk3")
    assert time.monotonic() - started_at < bench.timeout


def test_plugging_an_occupied_port_is_refused(bench: Testbed) -> None:
    bench.plug("prusa_mk3", usb_port="1-1")

    with pytest.raises(TestbedError, match="USB port 1-1 already has a device"):
        bench.plug("ftdi", usb_port="1-1")


def test_an_overflow_is_recovered_by_re_enumerating(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    """ENOBUFS injected at the pyudev seam (umockdev's emulated netlink cannot
    overflow, see tests/support/lossy_monitor.py); the re-enumeration is real."""
    prusa = bench.plug("prusa_mk3", usb_port="1-1")
    ftdi = bench.plug("ftdi", usb_port="1-2")
    probe = start_probe()
    present = {d.node for d in map(device_from_json, probe.call("start_lossy"))}
    assert present == {prusa.node, ftdi.node}

    # Three uevents lost: the Prusa replugged under the same name (same devpath,
    # new instance) and a CH340 plugged; the receive of the third fails.
    assert probe.call("lose", count=3) is None
    bench.unplug(prusa)
    replugged = bench.plug("prusa_mk3", usb_port="1-1", tty=prusa.tty)
    ch340 = bench.plug("ch340", usb_port="1-3")
    probe.wait_events(lambda es: len(es) >= 3, "the events re-enumerating finds")

    assert replugged.devpath == prusa.devpath
    assert replugged.usec_initialized != prusa.usec_initialized
    assert removed(probe.events) == [prusa.devpath]
    assert isinstance(probe.events[0], DeviceRemoved), "the old instance goes first"
    back, new = added(probe.events)
    assert_matches(back, replugged)
    assert_matches(new, ch340)
    assert ftdi.node not in [d.node for d in added(probe.events)], "unchanged: not reported"

    # A second overflow loses the FTDI's remove: found gone, and said less loudly.
    # The receive that fails is that of a change sent once the FTDI's sysfs is gone
    # (the testbed sends a remove before deleting the device, udevd after).
    assert probe.call("lose", count=2) is None
    bench.unplug(ftdi)
    bench.send_uevent(replugged, "change")
    probe.wait_events(lambda es: ftdi.devpath in removed(es), "the FTDI found gone")
    assert len(probe.events) == 4

    # Events flow again as before.
    mega = bench.plug("mega2560", usb_port="1-4")
    assert_matches(wait_added(probe, mega.node), mega)
    assert len(probe.events) == 5

    log = probe.log_path.read_text()
    assert log.count("lossy monitor: lost ") == 5
    assert log.count("lossy monitor: ENOBUFS") == 2
    warnings = [line for line in log.splitlines() if line.startswith("WARNING")]
    assert warnings == [
        "WARNING reconnectd.udev: udev events were lost (the event socket's receive buffer "
        "overflowed); re-read the present devices: 1 gone, 2 new"
    ]
    assert "INFO reconnectd.udev: udev events were lost again (overflow 2); 1 gone, 0 new" in log


def test_another_receive_error_is_logged_once_until_a_receive_succeeds(
    bench: Testbed, start_probe: ProbeFactory
) -> None:
    prusa = bench.plug("prusa_mk3")
    probe = start_probe()
    probe.call("start_lossy")

    for lost in (1, 2):
        assert probe.call("lose", count=1, errno=errno.EIO) is None
        bench.send_uevent(prusa, "change")
        # Armed again only once this one is lost: arming resets what is left to lose.
        probe.wait_logged("lossy monitor: EIO after 1 lost", lost)
    # Events are heard again after the failures, and nothing was made up for them.
    bench.send_uevent(prusa, "change")
    probe.wait_events(lambda es: len(es) == 1, "the change after the failures")
    assert probe.call("lose", count=1, errno=errno.EIO) is None
    bench.send_uevent(prusa, "change")
    bench.send_uevent(prusa, "change")
    probe.wait_events(lambda es: len(es) == 2, "the change after the third failure")

    log = probe.log_path.read_text()
    assert log.count("lossy monitor: EIO after 1 lost") == 3
    failures = [line for line in log.splitlines() if "reading udev events failed" in line]
    # The second failure came with no good receive in between: not said again.
    assert (
        failures
        == ["WARNING reconnectd.udev: reading udev events failed: [Errno 5] Input/output error"] * 2
    )
    assert "were lost" not in log, "no re-enumeration for an error that is not an overflow"
