"""The end-to-end bench: a umockdev testbed, a real OctoPrint under it, helpers to
play printers and to start the real reconnectd against them.

tests/test_end_to_end.py runs every behaviour on it with OctoPrint 1.11.8;
tests/test_octoprint_versions.py runs the core ones with each other version.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import requests

from tests.support.daemon_process import DaemonProcess
from tests.support.fake_marlin import FakeMarlin
from tests.support.octoprint_instance import OctoPrintInstance
from tests.support.printers import SimulatedPrinters
from tests.support.testbed import Plugged, Testbed

SETTLE = 0.5
serial_numbers = itertools.count(1)


@dataclass
class Bench:
    """The session's testbed and OctoPrint, plus helpers to play a printer."""

    testbed: Testbed
    octoprint: OctoPrintInstance
    workdir: Path
    stuck_node: Path
    printers: SimulatedPrinters
    # Extra [[printer]] lines for every daemon this bench starts: the version runs give
    # shorter stuck_after and retry_first (tests/test_octoprint_versions.py); the 1.11.8
    # run keeps the contract's own timings.
    timings: str = ""

    def plug(self, serial: str, *, silent: bool = False) -> tuple[Plugged, FakeMarlin]:
        """Switch the printer on: its USB device appears and its firmware answers."""
        plugged, marlin = self.printers.switch_on(serial, silent=silent)
        assert marlin is not None
        return plugged, marlin

    def power_cycle(self, plugged: Plugged) -> tuple[Plugged, FakeMarlin]:
        """Switch the printer off and on: it comes back under a new node."""
        assert plugged.serial is not None
        self.printers.switch_off(plugged)
        return self.plug(plugged.serial)

    def config(
        self, serial: str, *, settle: float = SETTLE, key: str | None = None, poll: float = 0
    ) -> str:
        return (
            "[octoprint]\n"
            f'url = "{self.octoprint.url}"\n'
            f'api_key = "{key or self.octoprint.api_key}"\n'
            "timeout = 5\n\n"
            "[[printer]]\n"
            'name = "mk3s"\n'
            'vendor_id = "2c99"\n'
            'product_id = "0002"\n'
            f'serial = "{serial}"\n'
            f"settle = {settle}\n"
            f"poll = {poll}\n" + self.timings
        )

    def daemon(self, name: str, serial: str, **kw: object) -> DaemonProcess:
        config = self.config(serial, **kw)  # type: ignore[arg-type]
        return DaemonProcess(self.workdir / name, config, env=self.testbed.env)

    def state(self) -> str:
        return str(self.octoprint.connection()["current"]["state"])

    def port(self) -> str | None:
        port = self.octoprint.connection()["current"]["port"]
        return None if port is None else str(port)

    def api(self, method: str, path: str, **kw: object) -> requests.Response:
        response = requests.request(
            method,
            f"{self.octoprint.url}{path}",
            headers={"X-Api-Key": self.octoprint.api_key},
            timeout=10,
            **kw,  # type: ignore[arg-type]
        )
        response.raise_for_status()
        return response


@contextlib.contextmanager
def open_bench(workdir: Path, octoprint_bin: str | None = None) -> Iterator[Bench]:
    """Given a work directory (and an OctoPrint executable, else ``$OCTOPRINT_BIN``'s),
    start a testbed and an OctoPrint under it; stop both on leaving."""
    stuck_dir = workdir / "static"
    stuck_dir.mkdir()
    stuck_node = stuck_dir / "ttySTUCK0"
    # A character node with no driver behind it: opening it fails with ENXIO, as an
    # LXC container's static node does when the printer is not attached.
    os.mknod(stuck_node, 0o666 | 0o020000, os.makedev(166, 99))
    with Testbed(workdir / "testbed") as testbed:
        instance = OctoPrintInstance(
            workdir / "octoprint",
            env=testbed.env,
            additional_ports=[
                "/dev/serial/by-id/*",
                f"{stuck_dir}/ttySTUCK*",
            ],
            octoprint_bin=octoprint_bin,
        )
        with instance:
            yield Bench(testbed, instance, workdir, stuck_node, SimulatedPrinters(testbed))


def tidy(bench: Bench) -> None:
    """Leave OctoPrint running with no connection and the bench empty, for the next test."""
    if not bench.octoprint.running:
        bench.octoprint.start()
    bench.octoprint.reset()
    bench.printers.clear()


def new_serial() -> str:
    return f"CZPX{os.getpid()}X{next(serial_numbers):03d}"


def wait_operational(bench: Bench, timeout: float = 30.0) -> None:
    bench.octoprint.wait_for_state("Operational", timeout)


def stays(bench: Bench, state: str, seconds: float) -> None:
    """Assert OctoPrint stays in `state` for `seconds` (a real process: real time)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert bench.state() == state, f"OctoPrint left {state}: {bench.state()}"
        time.sleep(0.2)
