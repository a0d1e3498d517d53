"""The daemon's only contact with udev: serial ttys as plain :class:`Device` values.

A :class:`UdevWatcher` owns one udev netlink monitor, filtered in the kernel to
the ``tty`` subsystem; the daemon registers :meth:`UdevWatcher.fileno` in its
selector and calls :meth:`UdevWatcher.drain` when it is readable. Everything
pyudev hands over is turned into a :class:`~reconnectd.devices.Device` (or a
:class:`~reconnectd.devices.DeviceRemoved`) right here, so nothing past this
module ever touches pyudev.
"""

from __future__ import annotations

import errno
import logging

import pyudev

from reconnectd.devices import (
    Device,
    DeviceAdded,
    DeviceEvent,
    DeviceRemoved,
    normalize_usb_id,
    udev_serial,
)

log = logging.getLogger(__name__)

# Consoles, ptys and other ttys with no hardware behind them live here.
VIRTUAL_PREFIX = "/devices/virtual/"

# What pyudev and libudev raise when sysfs vanishes under a device being read
# (a printer unplugged mid-lookup): a vanished device must not crash the daemon.
_GONE = (pyudev.DeviceNotFoundError, OSError, KeyError, ValueError, UnicodeDecodeError)


def device_from_udev(device: pyudev.Device) -> Device | None:
    """Given a pyudev tty device, return it as a :class:`Device`.

    Return None for a device that is not a tty, has no device node, or lives
    under ``/devices/virtual/`` (consoles, ptys). Never raises for a device whose
    sysfs is already gone: what cannot be read is left empty.
    """
    try:
        devpath = device.device_path
        if devpath.startswith(VIRTUAL_PREFIX) or device.subsystem != "tty":
            return None
        node = device.device_node
        if not node:
            return None
        properties = device.properties
        links = tuple(sorted(str(properties.get("DEVLINKS", "")).split()))
        vendor_id = normalize_usb_id(properties.get("ID_VENDOR_ID"))
        product_id = normalize_usb_id(properties.get("ID_MODEL_ID"))
        serial = properties.get("ID_SERIAL_SHORT") or None
        driver = properties.get("ID_USB_DRIVER") or None
        instance = properties.get("USEC_INITIALIZED") or ""
        usb_path = properties.get("ID_PATH") or None
        vendor = properties.get("ID_VENDOR_FROM_DATABASE") or properties.get("ID_VENDOR") or None
        model = properties.get("ID_MODEL_FROM_DATABASE") or properties.get("ID_MODEL") or None
    except _GONE as e:
        log.debug("udev device vanished while being read: %s", e)
        return None

    # The USB parent is read only for what udev's own properties lack (udev not
    # running its rules, or a device seen before udev finished with it): each
    # lookup reads sysfs.
    if vendor_id is None or product_id is None or serial is None or not instance:
        usb = _usb_parent(device)
        if usb is not None:
            vendor_id = vendor_id or normalize_usb_id(_attribute(usb, "idVendor"))
            product_id = product_id or normalize_usb_id(_attribute(usb, "idProduct"))
            if serial is None:
                # In udev's form, so that one config serial matches either way. udev
                # itself leaves ID_SERIAL_SHORT out for a serial with a comma or a byte
                # outside printable ASCII: this fallback is then what reads it.
                raw = _attribute(usb, "serial")
                serial = (udev_serial(raw) or None) if raw else None
            if not instance:
                busnum = _attribute(usb, "busnum")
                devnum = _attribute(usb, "devnum")
                if busnum and devnum:
                    instance = f"usb:{busnum}:{devnum}"
    if driver is None:
        driver = _parent_driver(device)

    return Device(
        devpath=devpath,
        node=node,
        links=links,
        vendor_id=vendor_id,
        product_id=product_id,
        serial=serial,
        usb_path=usb_path,
        vendor=vendor,
        model=model,
        driver=driver,
        instance=instance,
    )


def _usb_parent(device: pyudev.Device) -> pyudev.Device | None:
    try:
        return device.find_parent("usb", "usb_device")
    except _GONE:
        return None


def _attribute(device: pyudev.Device, name: str) -> str | None:
    try:
        value = device.attributes.get(name)
    except _GONE:
        return None
    if value is None:
        return None
    text = bytes(value).decode("utf-8", errors="replace").strip()
    return text or None


def _parent_driver(device: pyudev.Device) -> str | None:
    # The USB interface's driver is what ID_USB_DRIVER names (cdc_acm, ch341,
    # ftdi_sio); the direct parent's (a usb-serial port, e.g. ch341-uart) is
    # the next best thing.
    try:
        interface = device.find_parent("usb", "usb_interface")
        if interface is not None and interface.driver:
            return str(interface.driver)
        parent = device.parent
        if parent is not None and parent.driver:
            return str(parent.driver)
    except _GONE:
        pass
    return None


def list_serial_devices(context: pyudev.Context | None = None) -> list[Device]:
    """Given a udev context (or None for a new one), return the real ttys with a node, by node."""
    context = context if context is not None else pyudev.Context()
    devices = []
    for udev_device in context.list_devices(subsystem="tty"):
        device = device_from_udev(udev_device)
        if device is not None:
            devices.append(device)
    devices.sort(key=lambda d: d.node)
    return devices


class UdevWatcher:
    """Serial ttys appearing and vanishing, from one udev monitor.

    ``start`` opens the monitor before enumerating, so a tty that appears in
    between is reported twice (enumerated and added) rather than never; the
    daemon's matching is idempotent for that.

    The watcher remembers which ttys it has reported present. When the monitor's
    socket overflows (ENOBUFS: more uevents came than its receive buffer holds, and
    the kernel dropped some), it enumerates again and reports the difference as
    the events that were lost: a tty gone (or replaced by a new instance) is
    removed, a new one added.
    """

    def __init__(self, context: pyudev.Context | None = None) -> None:
        self._context = context if context is not None else pyudev.Context()
        self._monitor: pyudev.Monitor | None = None
        self._known: dict[str, Device] = {}  # devpath -> the tty as last reported
        self._overflows = 0
        self._failing: str | None = None  # a receive error other than ENOBUFS, once logged

    def start(self) -> list[Device]:
        """Given a watcher not yet started, start the monitor, then return the ttys present.

        Raise RuntimeError if already started; OSError if udev's monitor cannot be opened.
        """
        if self._monitor is not None:
            raise RuntimeError("UdevWatcher already started")
        monitor = pyudev.Monitor.from_netlink(self._context, source="udev")
        monitor.filter_by("tty")
        monitor.start()
        self._monitor = monitor
        present = self._enumerate()
        self._known = {device.devpath: device for device in present}
        return present

    def _enumerate(self) -> list[Device]:
        return list_serial_devices(self._context)

    def fileno(self) -> int:
        """Given a started watcher, return the monitor's fd; raise RuntimeError if not started."""
        return int(self._started().fileno())

    def drain(self) -> list[DeviceEvent]:
        """Given a started watcher, return the events queued now, without blocking.

        ``add`` becomes :class:`DeviceAdded`; ``remove`` becomes
        :class:`DeviceRemoved` for any tty, carrying only the devpath (a remove's
        sysfs is gone and its ids may be missing). ``change`` becomes
        :class:`DeviceAdded` only if the tty has a node: udev re-announces a
        device with a ``change`` after its rules ran again (``udevadm trigger``),
        and the matching treats a second add of a known instance as a no-op.
        ``bind``, ``unbind``, ``move`` and the rest say nothing about the node
        and are ignored. After an overflow (ENOBUFS) the events are those that
        re-enumerating shows were lost. Raise RuntimeError if not started.
        """
        monitor = self._started()
        events: list[DeviceEvent] = []
        while True:
            try:
                udev_device = monitor.poll(timeout=0)
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    events.extend(self._resync())
                else:
                    self._receive_failed(e)
                # Whatever is still queued is read on the loop's next turn, so a
                # socket that keeps failing cannot hold the loop here.
                break
            if udev_device is None:
                break
            self._failing = None
            event = self._event(udev_device)
            if event is not None:
                self._note(event)
                events.append(event)
        return events

    def _note(self, event: DeviceEvent) -> None:
        if isinstance(event, DeviceRemoved):
            self._known.pop(event.devpath, None)
        else:
            self._known[event.device.devpath] = event.device

    def _resync(self) -> list[DeviceEvent]:
        """Given an overflow, return the events that re-enumerating shows were lost."""
        self._overflows += 1
        try:
            present = {device.devpath: device for device in self._enumerate()}
        except _GONE as e:
            # libudev reads sysfs here; without it nothing can be compared. The
            # next overflow or event gets another chance.
            log.warning("udev events were lost, and re-reading the devices failed: %s", e)
            return []
        events: list[DeviceEvent] = []
        for devpath, before in self._known.items():
            after = present.get(devpath)
            if after is None or after.instance != before.instance:
                events.append(DeviceRemoved(devpath))
        for devpath, after in present.items():
            seen = self._known.get(devpath)
            if seen is None or seen.instance != after.instance:
                events.append(DeviceAdded(after))
        self._known = present
        gone = sum(isinstance(event, DeviceRemoved) for event in events)
        found = f"{gone} gone, {len(events) - gone} new"
        if self._overflows == 1:
            log.warning(
                "udev events were lost (the event socket's receive buffer overflowed); "
                "re-read the present devices: %s",
                found,
            )
        else:
            # One warning tells a person; repeats would only crowd the journal.
            log.info("udev events were lost again (overflow %d); %s", self._overflows, found)
        return events

    def _receive_failed(self, error: OSError) -> None:
        text = str(error)
        if text != self._failing:
            log.warning("reading udev events failed: %s", text)
        self._failing = text

    def _event(self, udev_device: pyudev.Device) -> DeviceEvent | None:
        try:
            action = udev_device.action
            devpath = udev_device.device_path
        except _GONE:
            return None
        if action == "remove":
            return DeviceRemoved(devpath)
        if action in ("add", "change"):
            device = device_from_udev(udev_device)
            if device is not None:
                return DeviceAdded(device)
        return None

    def close(self) -> None:
        """Given a watcher, close its monitor; safe to call more than once."""
        # pyudev has no close(): dropping the last reference unrefs the libudev
        # monitor, which closes its socket.
        self._monitor = None

    def _started(self) -> pyudev.Monitor:
        if self._monitor is None:
            raise RuntimeError("UdevWatcher not started")
        return self._monitor
