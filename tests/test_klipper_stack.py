"""The real Klipper stack the Klipper end-to-end tests stand on, checked against itself.

tests/support/klipper_stack.py starts a real Klippy, Linux-process MCUs and a real
Moonraker (built by tests/bootstrap from the pinned fixtures). These tests prove
that it behaves as ``shared/notes/klipper-facts.md`` says, so that a Klipper test
of reconnectd that fails points at reconnectd, not at the stack: the states and
messages reconnectd's rules K1-K7 read, how fast they come, what a switched-off
board, a dropped USB link, an emergency stop, M112, a Moonraker restart and a
rejected key look like, and that the simulated board switches udev's side and
Klippy's side together.

One stack per kind of configuration, shared by the tests of this module; each test
leaves its stack ready (:func:`recovered`). Timings are printed (``pytest -s``).
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from reconnectd.devices import DeviceAdded, DeviceRemoved
from tests.support.klipper_build import KlipperBuild, find_build
from tests.support.klipper_stack import (
    KlipperStack,
    KlipperStackError,
    SimulatedKlipperBoard,
    first_line,
)
from tests.support.real import missing
from tests.support.testbed import Testbed, unavailable_reason
from tests.support.udev_probe import UdevProbe

pytestmark = pytest.mark.klipper

# Klippy notices a silent MCU within about 5 s (3.3-5.5 s measured, depending on where
# in its clock-sync cycle the MCU went quiet); the margin is for a loaded machine.
LOST_WITHIN = 9.0
RESTART_WITHIN = 8.0  # firmware_restart to ready: 1.5-1.9 s measured
AT_ONCE = 2.0  # emergency stop, M112: under 0.3 s measured


@pytest.fixture(scope="module")
def build() -> KlipperBuild:
    found = find_build()
    if isinstance(found, str):
        missing(f"no Klipper stack: {found}")
    assert isinstance(found, KlipperBuild)
    return found


def started(
    workdir: Path,
    build: KlipperBuild,
    *,
    mcus: tuple[str, ...] = ("mcu",),
    relay: bool = False,
    api_key: bool = False,
) -> KlipperStack:
    """Given a workdir, a build and the stack's options, start a stack; print its time."""
    t0 = time.monotonic()
    stack = KlipperStack(workdir, build=build, mcus=mcus, relay=relay, api_key=api_key)
    print(f"stack {workdir.name} ready in {time.monotonic() - t0:.2f} s")
    return stack


@pytest.fixture(scope="module")
def plain(build: KlipperBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KlipperStack]:
    with started(tmp_path_factory.mktemp("plain"), build) as stack:
        yield stack


@pytest.fixture
def stack(plain: KlipperStack) -> Iterator[KlipperStack]:
    yield plain
    recovered(plain)


def recovered(stack: KlipperStack) -> None:
    """Given a stack a test may have left down, bring it back to ready."""
    for name in stack.mcu_names:
        if not stack.is_on(name):
            stack.power_on(name)
    if stack.relay:
        for name in stack.mcu_names:
            if not stack.serial_path(name).exists():
                stack.restore_link(name)
    if stack.info()["state"] != "ready":
        stack.firmware_restart()
        try:
            stack.wait_for_state("ready", RESTART_WITHIN)
        except KlipperStackError:
            # "Failed automated reset": the second restart succeeds (facts page).
            stack.firmware_restart()
            stack.wait_for_state("ready", RESTART_WITHIN)


def timed_state(
    stack: KlipperStack, state: str, message: str, timeout: float
) -> tuple[float, dict[str, Any]]:
    """Given a state and the start of its message, wait for it; return the time and info."""
    t0 = time.monotonic()
    info = stack.wait_for_state(state, timeout, message=message)
    return time.monotonic() - t0, info


# -- one MCU, trusted clients --------------------------------------------------------


def test_ready_after_start(stack: KlipperStack) -> None:
    info = stack.info()

    assert info["state"] == "ready"
    assert first_line(info["state_message"]) == "Printer is ready"
    assert info["config_file"] == str(stack.printer_cfg)
    assert stack.serial_path().exists()
    assert stack.serial_path().parent == stack.run_dir
    # Unix socket paths must fit in 107 bytes: Moonraker's is the deepest.
    assert len(str(stack.data_dir / "comms/moonraker.sock")) < 107
    server = stack.result("GET", "/server/info")
    assert server["klippy_connected"] is True
    assert server["failed_components"] == []
    # Loopback is trusted: no key needed.
    assert requests.get(stack.url + "/printer/info", timeout=5).status_code == 200
    # What reconnectd reads for rule K4: every [mcu*] serial, through Moonraker.
    settings = stack.query({"configfile": ["settings"]})["configfile"]["settings"]
    assert settings["mcu"]["serial"] == str(stack.serial_path())


def test_board_off_mid_print_is_lost_communication_until_firmware_restart(
    stack: KlipperStack,
) -> None:
    name = stack.start_print(60)
    printing = stack.query({"webhooks": ["state"], "print_stats": ["state", "filename"]})
    assert printing == {
        "webhooks": {"state": "ready"},
        "print_stats": {"state": "printing", "filename": name},
    }

    stack.power_off()
    # The node is really gone: no dangling link a reused pty could revive.
    assert not stack.serial_path().exists()
    assert not stack.serial_path().is_symlink()
    took, info = timed_state(stack, "shutdown", "Lost communication with MCU 'mcu'", LOST_WITHIN)
    print(f"power off -> shutdown 'Lost communication' in {took:.2f} s")
    assert info["state_message"].endswith("Printer is shutdown\n")
    # The print cut off reads "paused" (about 0.3 s later), though nothing can resume.
    deadline = time.monotonic() + 3
    while stack.query({"print_stats": ["state"]})["print_stats"]["state"] != "paused":
        assert time.monotonic() < deadline, "print_stats never became paused"
        time.sleep(0.05)

    stack.power_on()
    assert stack.serial_path().exists()
    # The MCU is back, but Klippy stays down until it is told to restart.
    time.sleep(1.0)
    assert stack.info()["state"] == "shutdown"

    stack.firmware_restart()
    took, _ = timed_state(stack, "ready", "Printer is ready", RESTART_WITHIN)
    print(f"power on + firmware_restart -> ready in {took:.2f} s")
    assert stack.query({"print_stats": ["state", "filename"]})["print_stats"] == {
        "state": "standby",
        "filename": "",
    }


def test_emergency_stop_is_a_webhooks_shutdown(stack: KlipperStack) -> None:
    stack.emergency_stop()

    took, info = timed_state(stack, "shutdown", "Shutdown due to webhooks request", AT_ONCE)
    print(f"emergency stop -> shutdown in {took:.2f} s")
    assert "FIRMWARE_RESTART" in info["state_message"]
    # Only a firmware restart clears it: a host restart meets a shut-down MCU.
    stack.host_restart()
    stack.wait_for_state("error", RESTART_WITHIN, message="Can not update MCU 'mcu' config")


def test_m112_is_an_m112_shutdown(stack: KlipperStack) -> None:
    stack.m112()

    took, _ = timed_state(stack, "shutdown", "Shutdown due to M112 command", AT_ONCE)
    print(f"M112 -> shutdown in {took:.2f} s")


def test_moonraker_restart_answers_404_or_503_then_comes_back(stack: KlipperStack) -> None:
    stack.stop_moonraker()
    with pytest.raises(requests.ConnectionError):
        stack.request("GET", "/printer/info", timeout=2)

    t0 = time.monotonic()
    stack.start_moonraker(wait=False)
    seen: list[str] = []
    while time.monotonic() - t0 < 20:
        try:
            code = str(stack.request("GET", "/printer/info", timeout=2).status_code)
        except requests.ConnectionError:
            code = "refused"
        if not seen or seen[-1] != code:
            seen.append(code)
        if code == "200":
            break
        time.sleep(0.02)
    print(f"Moonraker restart: {' -> '.join(seen)} in {time.monotonic() - t0:.2f} s")

    assert seen[-1] == "200", seen
    assert set(seen) <= {"refused", "404", "503", "200"}, seen
    assert stack.info()["state"] == "ready"  # Klippy never noticed


# -- a USB link that drops while the board keeps power --------------------------------


@pytest.fixture(scope="module")
def relayed(
    build: KlipperBuild, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KlipperStack]:
    with started(tmp_path_factory.mktemp("relay"), build, relay=True) as stack:
        yield stack


def test_relay_carries_a_firmware_restart(relayed: KlipperStack) -> None:
    # The MCU re-executes itself on FIRMWARE_RESTART; the relay must follow it.
    pid = relayed.mcu_pid()
    relayed.firmware_restart()

    took, _ = timed_state(relayed, "ready", "Printer is ready", RESTART_WITHIN)
    print(f"firmware_restart through the relay -> ready in {took:.2f} s")
    assert relayed.mcu_pid() == pid  # the same process, re-executed


def test_link_lost_then_back_fails_the_first_reset_and_the_second_recovers(
    relayed: KlipperStack,
) -> None:
    try:
        relayed.drop_link()
        assert not relayed.serial_path().exists()
        took, _ = timed_state(relayed, "shutdown", "Lost communication with MCU 'mcu'", LOST_WITHIN)
        print(f"link dropped -> shutdown in {took:.2f} s")

        relayed.restore_link()
        relayed.firmware_restart()
        took, _ = timed_state(
            relayed, "error", "Failed automated reset of MCU 'mcu'", RESTART_WITHIN
        )
        print(f"link back + firmware_restart -> 'Failed automated reset' in {took:.2f} s")

        relayed.firmware_restart()
        took, _ = timed_state(relayed, "ready", "Printer is ready", RESTART_WITHIN)
        print(f"second firmware_restart -> ready in {took:.2f} s")
    finally:
        recovered(relayed)


@pytest.mark.umockdev
def test_pulled_cable_takes_device_and_link_while_the_mcu_runs(
    relayed: KlipperStack, tmp_path: Path
) -> None:
    reason = unavailable_reason()
    if reason is not None:
        missing(f"umockdev testbed unavailable: {reason}")
    pid = relayed.mcu_pid()
    with Testbed(tmp_path / "bench") as testbed:
        board = SimulatedKlipperBoard(testbed, relayed)
        probe = UdevProbe(testbed.env, tmp_path / "probe.log")
        try:
            probe.call("start")
            board.pull_cable()
            probe.wait_events(
                lambda es: any(isinstance(e, DeviceRemoved) for e in es), "the remove"
            )
            assert not board.serial_path.exists()
            assert relayed.mcu_pid() == pid  # the board kept its power

            time.sleep(1.0)
            board.plug_cable()
            probe.wait_events(lambda es: any(isinstance(e, DeviceAdded) for e in es), "the add")
            assert board.serial_path.exists()
            # Even a cable back within a second costs Klippy its MCU: it must be restarted.
            took, _ = timed_state(
                relayed, "shutdown", "Lost communication with MCU 'mcu'", LOST_WITHIN
            )
            print(f"cable out for 1 s -> shutdown {took:.2f} s after it was back")
            # The board kept its configuration: the first restart fails, a retry recovers.
            relayed.firmware_restart()
            relayed.wait_for_state("error", RESTART_WITHIN, message="Failed automated reset")
            relayed.firmware_restart()
            relayed.wait_for_state("ready", RESTART_WITHIN)
        finally:
            probe.close()
            board.close()
            recovered(relayed)


# -- Moonraker requires an API key ---------------------------------------------------


@pytest.fixture(scope="module")
def keyed(build: KlipperBuild, tmp_path_factory: pytest.TempPathFactory) -> Iterator[KlipperStack]:
    with started(tmp_path_factory.mktemp("keyed"), build, api_key=True) as stack:
        yield stack


def test_a_missing_or_wrong_key_is_refused_and_the_key_survives_a_restart(
    keyed: KlipperStack,
) -> None:
    assert keyed.api_key is not None and len(keyed.api_key) == 32
    url = keyed.url + "/printer/info"

    def status(**headers: str) -> int:
        return requests.get(url, headers=headers, timeout=5).status_code

    assert status() == 401
    assert status(**{"X-Api-Key": "0" * 32}) == 401
    assert status(**{"X-Api-Key": keyed.api_key}) == 200
    refused = requests.get(url, headers={"X-Api-Key": "wrong"}, timeout=5)
    assert refused.json()["error"]["message"] == "Unauthorized"
    # The key is Moonraker's own and the one it hands out.
    assert keyed.result("GET", "/access/api_key") == keyed.api_key

    keyed.restart_moonraker()

    assert status(**{"X-Api-Key": keyed.api_key}) == 200
    assert status() == 401


# -- two MCUs: the main board and a toolhead board ------------------------------------


@pytest.fixture(scope="module")
def two_boards(
    build: KlipperBuild, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[KlipperStack]:
    with started(tmp_path_factory.mktemp("two"), build, mcus=("mcu", "toolhead")) as stack:
        yield stack


def test_toolhead_board_off_is_lost_communication_with_it(two_boards: KlipperStack) -> None:
    settings = two_boards.query({"configfile": ["settings"]})["configfile"]["settings"]
    assert settings["mcu"]["serial"] == str(two_boards.serial_path("mcu"))
    assert settings["mcu toolhead"]["serial"] == str(two_boards.serial_path("toolhead"))
    try:
        two_boards.power_off("toolhead")
        assert two_boards.serial_path("mcu").exists()
        assert not two_boards.serial_path("toolhead").exists()
        took, _ = timed_state(
            two_boards, "shutdown", "Lost communication with MCU 'toolhead'", LOST_WITHIN
        )
        print(f"toolhead off -> shutdown in {took:.2f} s")

        two_boards.power_on("toolhead")
        two_boards.firmware_restart()
        took, _ = timed_state(two_boards, "ready", "Printer is ready", RESTART_WITHIN)
        print(f"toolhead on + firmware_restart -> ready in {took:.2f} s")
    finally:
        recovered(two_boards)


# -- the board as udev and Klippy both see it ----------------------------------------


@pytest.mark.umockdev
def test_simulated_board_switches_udev_and_klippy_together(
    stack: KlipperStack, tmp_path: Path
) -> None:
    reason = unavailable_reason()
    if reason is not None:
        missing(f"umockdev testbed unavailable: {reason}")
    with Testbed(tmp_path / "bench") as testbed:
        board = SimulatedKlipperBoard(testbed, stack)
        probe = UdevProbe(testbed.env, tmp_path / "probe.log")
        try:
            present = probe.call("start")
            assert len(present) == 1
            device = present[0]
            assert (device["vendor_id"], device["product_id"]) == ("1d50", "614e")
            assert device["serial"] == "3A0033000851363131363530"
            assert board.by_id == (
                "/dev/serial/by-id/usb-Klipper_stm32f446xx_3A0033000851363131363530-if00"
            )
            assert board.by_id in device["links"]
            # Under the preload, which redirects /dev and /sys only, the path Klipper
            # names resolves to the MCU's real pty: reconnectd can check it (rule K4).
            assert sees(testbed, board.serial_path)

            t0 = time.monotonic()
            board.switch_off()
            probe.wait_events(
                lambda es: any(isinstance(e, DeviceRemoved) for e in es), "the remove"
            )
            assert not sees(testbed, board.serial_path)
            stack.wait_for_state("shutdown", LOST_WITHIN, message="Lost communication")
            print(f"board switched off -> shutdown in {time.monotonic() - t0:.2f} s")

            board.switch_on()
            probe.wait_events(lambda es: any(isinstance(e, DeviceAdded) for e in es), "the add")
            back = next(e.device for e in probe.events if isinstance(e, DeviceAdded))
            assert back.node == device["node"]  # the kernel reuses the free name
            assert sees(testbed, board.serial_path)
            assert stack.info()["state"] == "shutdown"  # nothing restarts Klippy by itself
        finally:
            probe.close()
            board.close()


def sees(testbed: Testbed, path: Path) -> bool:
    """Given a testbed, return whether a process under its preload finds ``path``."""
    done = subprocess.run(
        [
            "/usr/bin/python3",
            "-c",
            "import os, sys; sys.exit(0 if os.path.exists(sys.argv[1]) else 1)",
            str(path),
        ],
        env=testbed.env,
        check=False,
    )
    return done.returncode == 0
