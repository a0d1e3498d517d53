"""Simulated printers on a umockdev testbed, switched on and off by tests.

Every device's pty master is closed exactly once, by its one owner: the FakeMarlin
playing the printer's firmware, or the testbed for a device with no firmware. A
second close could hit an fd number the process has reused meanwhile.
"""

from __future__ import annotations

from tests.support.fake_marlin import FakeMarlin
from tests.support.testbed import Plugged, Testbed


class SimulatedPrinters:
    """The printers (and other USB ttys) a test has plugged into one testbed."""

    def __init__(self, testbed: Testbed) -> None:
        self.testbed = testbed
        self.marlins: list[FakeMarlin] = []  # every firmware started, oldest first
        self._plugged: list[Plugged] = []
        self._owners: dict[str, FakeMarlin] = {}  # devpath -> the Marlin owning its master
        self._retired: list[FakeMarlin] = []  # switched off; threads not stopped yet

    def switch_on(
        self,
        serial: str,
        *,
        usb_port: str = "1-1",
        silent: bool = False,
        firmware: bool = True,
    ) -> tuple[Plugged, FakeMarlin | None]:
        """Given a serial number, plug a Prusa MK3 whose firmware answers (unless
        ``silent``); with ``firmware=False`` nobody answers on its pty."""
        plugged = self.testbed.plug("prusa_mk3", serial=serial, usb_port=usb_port)
        self._plugged.append(plugged)
        if not firmware:
            return plugged, None
        marlin = FakeMarlin(plugged.master_fd)
        if silent:
            marlin.go_silent()
        self.marlins.append(marlin)
        self._owners[plugged.devpath] = marlin
        return plugged, marlin

    def move_cable(self, plugged: Plugged, *, usb_port: str) -> tuple[Plugged, FakeMarlin]:
        """Given a plugged printer, move its cable to another USB port: its firmware
        vanishes from the old node, the same printer (ids, serial) appears on a new
        one, and only then does the old node's remove come (udev orders events only
        for related paths, and these two are not)."""
        assert plugged.serial is not None
        marlin = self._owners.pop(plugged.devpath, None)
        if marlin is not None:
            marlin.vanish()
        moved, new_marlin = self.switch_on(plugged.serial, usb_port=usb_port)
        assert new_marlin is not None
        if marlin is None:
            self.testbed.unplug(plugged)
        else:
            marlin.stop()
            self.testbed.unplug(plugged, close_master=False)
        self._plugged.remove(plugged)
        return moved, new_marlin

    def plug_other(self, kind: str, *, usb_port: str) -> Plugged:
        """Given a testbed kind (e.g. "gps"), plug a USB tty that is no printer."""
        plugged = self.testbed.plug(kind, usb_port=usb_port)
        self._plugged.append(plugged)
        return plugged

    def switch_off(self, plugged: Plugged, *, stop_thread: bool = True) -> None:
        """Given a plugged device, remove it: its firmware vanishes (the holder of the
        port sees a hang-up), then the device and its links go.

        ``stop_thread=False`` leaves the Marlin's thread for :meth:`stop_retired`,
        for tests that must switch many printers off quickly.
        """
        marlin = self._owners.pop(plugged.devpath, None)
        if marlin is None:
            self.testbed.unplug(plugged)
        else:
            marlin.vanish()
            if stop_thread:
                marlin.stop()
            else:
                self._retired.append(marlin)
            self.testbed.unplug(plugged, close_master=False)
        self._plugged.remove(plugged)

    def stop_retired(self) -> None:
        """Stop the threads of Marlins switched off with ``stop_thread=False``."""
        for marlin in self._retired:
            marlin.stop()
        self._retired.clear()

    def clear(self) -> None:
        """Unplug whatever is left and stop every firmware thread."""
        for plugged in self._plugged:
            marlin = self._owners.pop(plugged.devpath, None)
            if marlin is None:
                self.testbed.unplug(plugged)
            else:
                marlin.stop()  # closes the master
                self.testbed.unplug(plugged, close_master=False)
        self._plugged.clear()
        for marlin in self.marlins:
            marlin.stop()
        self.marlins.clear()
        self._retired.clear()
