"""The Klipper phase of ``bench/run``: a real Klippy, its Linux-process MCU and a real
Moonraker (tests/support/klipper_stack.py), the board's USB device on a umockdev
testbed, and the real reconnectd process.

What it measures, beside what users do today (a udev rule that runs ``curl -X POST
.../printer/firmware_restart`` on every ``add`` of the board, here a small listener
under the same testbed that posts on every ``add`` at once):

- board switched off (Klippy noticed: "Lost communication with MCU 'mcu'") and on ->
  Klippy ``ready``: reconnectd's time, and Klippy's own restart time (a
  FIRMWARE_RESTART posted by hand with the board present), measured in the same run;
  the figure is what reconnectd adds to ``settle`` + Klippy's own restart time;
- restarts sent for a burst (the board announced three times within 0.2 s, as a
  re-trigger or a bouncing plug does): reconnectd's, and the rule's;
- requests to Moonraker while nothing happens, Klippy ready.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from bench import report
from tests.support.daemon_process import DaemonProcess
from tests.support.klipper_build import KlipperBuild
from tests.support.klipper_stack import KlipperStack, SimulatedKlipperBoard
from tests.support.testbed import Testbed

UDEV_RULE = Path(__file__).with_name("udev_rule.py")
LOST_WITHIN = 10.0
READY_WITHIN = 30.0
STATE_POLL = 0.025
BURST = 3  # add events per burst
BURST_GAP = 0.05


def wait_ready_after(stack: KlipperStack, since: float, timeout: float = READY_WITHIN) -> float:
    """Read /printer/info every 25 ms; return how long after ``since`` it said ready."""
    session = requests.Session()
    session.headers.update(stack.headers)
    try:
        while time.monotonic() < since + timeout:
            try:
                answer = session.get(f"{stack.url}/printer/info", timeout=5)
                state = answer.json().get("result", {}).get("state") if answer.ok else None
            except (requests.RequestException, ValueError):
                state = None
            if state == "ready":
                return time.monotonic() - since
            time.sleep(STATE_POLL)
    finally:
        session.close()
    raise RuntimeError(f"Klippy not ready {timeout:g} s after the board came back")


def switched_off(stack: KlipperStack, board: SimulatedKlipperBoard) -> None:
    """Switch the board off and wait until Klippy noticed (as a user who waited would)."""
    board.switch_off()
    stack.wait_for_state("shutdown", LOST_WITHIN, message="Lost communication")


def replug_times(stack: KlipperStack, board: SimulatedKlipperBoard, cycles: int) -> list[float]:
    """Power-cycle the board ``cycles`` times; return each plug -> Klippy ready time,
    whoever restarts it."""
    times = []
    for _ in range(cycles):
        switched_off(stack, board)
        back = time.monotonic()
        board.switch_on()
        times.append(wait_ready_after(stack, back))
    return times


def announce_in_a_burst(
    stack: KlipperStack, board: SimulatedKlipperBoard, testbed: Testbed
) -> None:
    """Switch the board on and announce it twice more within 0.1 s (a re-trigger, a
    bouncing plug); return once Klippy is ready."""
    board.switch_on()
    assert board.plugged is not None
    for _ in range(BURST - 1):
        time.sleep(BURST_GAP)
        testbed.send_uevent(board.plugged, "add")
    wait_ready_after(stack, time.monotonic())


def own_restart_times(
    stack: KlipperStack, board: SimulatedKlipperBoard, cycles: int
) -> list[float]:
    """Klippy's own restart time: board back, FIRMWARE_RESTART by hand -> ready."""
    times = []
    for _ in range(cycles):
        switched_off(stack, board)
        board.switch_on()
        sent = time.monotonic()
        stack.firmware_restart()
        times.append(wait_ready_after(stack, sent))
    return times


def daemon_config(stack: KlipperStack, settle: float) -> str:
    return (
        f'[moonraker]\nurl = "{stack.url}"\ntimeout = 5\n\n'
        '[[printer]]\nname = "voron"\nvendor_id = "1d50"\nproduct_id = "614e"\n'
        f"settle = {settle:g}\n[printer.moonraker]\n"
    )


def restarts_by(daemon: DaemonProcess) -> int:
    return int(str(daemon.printer("voron").get("connects", 0)))


def requests_in(log: str) -> int:
    """Given the daemon's debug log, count the requests it made (one line each)."""
    return len(re.findall(r"(GET|POST) /\S+: HTTP \d+", log))


def measure_klipper(
    testbed: Testbed,
    build: KlipperBuild,
    workdir: Path,
    *,
    cycles: int,
    idle_seconds: float,
    settle: float,
    daemon_env: Callable[[], dict[str, str]],
) -> tuple[dict[str, float | None], dict[str, Any]]:
    """Run the Klipper phase; return its headline figures and details."""
    with KlipperStack(workdir / "stack", build=build) as stack:
        board = SimulatedKlipperBoard(testbed, stack)
        try:
            own = own_restart_times(stack, board, cycles)
            ours, burst_restarts, idle_requests = _with_reconnectd(
                stack, board, testbed, workdir, cycles, idle_seconds, settle, daemon_env
            )
            rule_times, rule_burst = _with_udev_rule(stack, board, testbed, workdir, cycles)
        finally:
            board.close()
    own_p50 = report.percentile(own, 50)
    ours_p50 = report.percentile(ours, 50)
    figures: dict[str, float | None] = {
        "klipper_replug_overhead_s_p50": round(ours_p50 - settle - own_p50, 3),
        "klipper_restarts_per_burst": float(burst_restarts),
        "klipper_idle_requests_per_hour": round(report.per_hour(idle_requests, idle_seconds), 1),
        "udev_rule_replug_to_ready_s_p50": round(report.percentile(rule_times, 50), 3),
        "udev_rule_restarts_per_burst": float(rule_burst),
    }
    details = {
        "klipper_replug_to_ready_s": report.summary(ours),
        "klipper_own_restart_s": report.summary(own),
        "klipper_settle_s": settle,
        "udev_rule_replug_to_ready_s": report.summary(rule_times),
    }
    return figures, details


def _with_reconnectd(
    stack: KlipperStack,
    board: SimulatedKlipperBoard,
    testbed: Testbed,
    workdir: Path,
    cycles: int,
    idle_seconds: float,
    settle: float,
    daemon_env: Callable[[], dict[str, str]],
) -> tuple[list[float], int, int]:
    daemon = DaemonProcess(
        workdir / "reconnectd", daemon_config(stack, settle), env={**testbed.env, **daemon_env()}
    )
    with daemon:
        times = replug_times(stack, board, cycles)
        switched_off(stack, board)
        before = restarts_by(daemon)
        announce_in_a_burst(stack, board, testbed)
        time.sleep(settle + 2.0)  # anything more it would send comes by now
        burst = restarts_by(daemon) - before
        # Idle: Klippy ready, nothing happens.
        counted_from = requests_in(daemon.log())
        time.sleep(idle_seconds)
        idle = requests_in(daemon.log()) - counted_from
    return times, burst, idle


def _with_udev_rule(
    stack: KlipperStack,
    board: SimulatedKlipperBoard,
    testbed: Testbed,
    workdir: Path,
    cycles: int,
) -> tuple[list[float], int]:
    log_path = workdir / "udev-rule.log"
    rule = subprocess.Popen(
        [sys.executable, str(UDEV_RULE), stack.url, "1d50", "614e"],
        env={**os.environ, **testbed.env},
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(0.5)  # its monitor listens
        times = replug_times(stack, board, cycles)
        switched_off(stack, board)
        before = log_path.read_text().count("POST")
        announce_in_a_burst(stack, board, testbed)
        time.sleep(2.0)
        posts = log_path.read_text().count("POST") - before
    finally:
        rule.terminate()
        rule.wait(5)
    return times, posts
