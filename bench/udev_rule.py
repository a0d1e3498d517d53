"""What Klipper users run today, for bench/run to compare with: a udev rule such as

    ACTION=="add", SUBSYSTEM=="tty", ATTRS{idVendor}=="1d50", ATTRS{idProduct}=="614e", \\
        RUN+="/usr/bin/curl -s -X POST http://127.0.0.1:7125/printer/firmware_restart"

run on every ``add`` of the board: no settling, no look at Klippy's state, no retry.
udevd is not here, so this listens to the same uevents (pyudev, under the testbed's
umockdev) and posts at once for each matching ``add``, one line per POST on stdout.

Usage: udev_rule.py MOONRAKER_URL VENDOR_ID PRODUCT_ID
"""

from __future__ import annotations

import signal
import sys
import urllib.request

import pyudev


def main(url: str, vendor: str, product: str) -> int:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    monitor = pyudev.Monitor.from_netlink(pyudev.Context())
    monitor.filter_by("tty")
    for device in iter(monitor.poll, None):
        if device.action != "add":
            continue
        usb = device.find_parent("usb", "usb_device")
        ids = (device.properties.get("ID_VENDOR_ID"), device.properties.get("ID_MODEL_ID"))
        if usb is not None and ids[0] is None:
            ids = (usb.attributes.asstring("idVendor"), usb.attributes.asstring("idProduct"))
        if ids != (vendor, product):
            continue
        request = urllib.request.Request(f"{url}/printer/firmware_restart", method="POST")
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                print(f"POST {answer.status}", flush=True)
        except OSError as error:  # curl -s says nothing either; the rule never retries
            print(f"POST failed: {error}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
