"""End to end: the real reconnectd process, a real OctoPrint 1.11.8, real libudev.

A umockdev testbed simulates the USB printer; OctoPrint runs under the same testbed,
so it lists the printer's node and by-id link and opens them; a fake Marlin answers
on the pty behind the node. reconnectd hears the testbed's uevents through real
libudev and pyudev, and talks to OctoPrint over real HTTP. One test per behaviour
of the contract, each asserting what OctoPrint really did.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.bench import (
    SETTLE,
    Bench,
    new_serial,
    open_bench,
    serial_numbers,
    stays,
    tidy,
    wait_operational,
)
from tests.support.daemon_process import DaemonProcess
from tests.support.octoprint_instance import OctoPrintInstance
from tests.support.real import require_umockdev_and_octoprint

pytestmark = [pytest.mark.umockdev, pytest.mark.octoprint]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def session_bench(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bench]:
    require_umockdev_and_octoprint()
    with open_bench(tmp_path_factory.mktemp("e2e")) as bench:
        yield bench


@pytest.fixture
def bench(session_bench: Bench) -> Iterator[Bench]:
    yield session_bench
    tidy(session_bench)


# --- behaviour 1: a device that came back is connected once, after settling -------


def test_power_cycle_is_reconnected_once_to_the_by_id_link(bench: Bench) -> None:
    serial = new_serial()
    with bench.daemon("power-cycle", serial) as daemon:
        plugged, _marlin = bench.plug(serial)
        wait_operational(bench)
        assert bench.port() == plugged.by_id
        plugged2, marlin2 = bench.power_cycle(plugged)
        assert plugged2.node != plugged.node, "the kernel gives a replugged device a new node"
        started = time.monotonic()
        bench.octoprint.wait_for_state("Operational", 30)
        elapsed = time.monotonic() - started
        assert bench.port() == plugged2.by_id == plugged.by_id
        assert elapsed >= SETTLE, "connected before the settle window ended"
        row = daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        assert row["connects"] == 2
        assert row["device"] == plugged2.node
        assert marlin2.opens >= 1
        daemon.wait_for_notification(lambda m: m == "STATUS=mk3s: operational")
        assert daemon.stop() == 0
    log = daemon.log()
    assert "device came back: connecting to /dev/serial/by-id/" in log
    assert bench.octoprint.api_key not in log


def test_a_cable_moved_to_another_port_is_followed_with_one_connect(bench: Bench) -> None:
    serial = new_serial()
    with bench.daemon("moved", serial) as daemon:
        plugged, _marlin = bench.plug(serial)
        wait_operational(bench)
        daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        # The new node's add reaches reconnectd before the old node's remove.
        moved, marlin = bench.printers.move_cable(plugged, usb_port="1-2")
        assert moved.devpath != plugged.devpath and moved.node != plugged.node
        row = daemon.wait_for_printer(
            "mk3s",
            lambda r: r["device"] == moved.node and r["state"] == "operational",
            "operational on the new node",
        )
        assert bench.state() == "Operational"
        assert bench.port() == moved.by_id
        assert marlin.opens >= 1
        stays(bench, "Operational", 1.0)
        assert daemon.printer("mk3s")["connects"] == row["connects"] == 2, "one for the move"
    log = daemon.log()
    assert f"{moved.node}, which came meanwhile, is the printer now" in log, log


def test_a_port_octoprint_lists_late_is_connected_soon_after_without_wrong_advice(
    bench: Bench,
) -> None:
    serial = new_serial()
    blacklisted = bench.api("GET", "/api/settings").json()["serial"]["blacklistedPorts"]
    # OctoPrint's list lags udev (a by-id link still being made, /dev bound into a
    # container): here OctoPrint leaves the printer's paths out until told otherwise.
    lagging = [*blacklisted, "/dev/ttyACM*", "/dev/serial/by-id/*"]
    bench.api("POST", "/api/settings", json={"serial": {"blacklistedPorts": lagging}})
    try:
        with bench.daemon("late-list", serial) as daemon:
            bench.plug(serial)
            daemon.wait_for_printer(
                "mk3s", lambda r: r["state"] == "waiting for the port to be listed", "waiting"
            )
            time.sleep(2.0)  # a real OctoPrint's list, lagging in real time
            assert bench.state() == "Closed"
            bench.api("POST", "/api/settings", json={"serial": {"blacklistedPorts": blacklisted}})
            listed = time.monotonic()
            wait_operational(bench)
            took = time.monotonic() - listed
            row = daemon.wait_for_printer(
                "mk3s", lambda r: r["state"] == "operational", "operational"
            )
            assert row["connects"] == 1
    finally:
        bench.api("POST", "/api/settings", json={"serial": {"blacklistedPorts": blacklisted}})
    assert took < 2.5, f"Operational {took:.1f} s after OctoPrint listed the port"
    log = daemon.log()
    assert "does not list /dev/serial/by-id/" in log
    assert "does not offer" not in log and "additionalPorts" not in log, "wrong advice given"


# --- behaviour 2: a burst of add/remove events leads to at most one connect -------


def test_burst_of_events_leads_to_one_connect(bench: Bench) -> None:
    serial = new_serial()
    with bench.daemon("burst", serial, settle=1.5) as daemon:
        plugged, _ = bench.plug(serial)
        wait_operational(bench)
        for _ in range(4):  # a flaky cable: the device bounces
            plugged, _ = bench.power_cycle(plugged)
        wait_operational(bench)
        row = daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        time.sleep(2 * 1.5)  # longer than the settle window: nothing more may follow
        row = daemon.printer("mk3s")
        assert row["connects"] == 2, "one connect for the first plug, one for the whole burst"
        bounced = bench.printers.marlins[1:-1]
        assert [m.opens for m in bounced] == [0, 0, 0], "bounced devices untouched"


# --- behaviour 3: nothing is sent while OctoPrint is connected, printing or paused --


def test_printing_printer_is_never_touched(bench: Bench) -> None:
    serial = new_serial()
    plugged, marlin = bench.plug(serial)
    bench.octoprint.connect(plugged.by_id or plugged.node)
    wait_operational(bench)
    gcode = "".join(f"G1 X{i % 100} Y{i % 50}\n" for i in range(20000))
    bench.api(
        "POST",
        "/api/files/local",
        files={"file": ("long.gcode", gcode)},
        data={"select": "true", "print": "true"},
    )
    bench.octoprint.wait_for_state("Printing", 20)
    bench.api("POST", "/api/job", json={"command": "pause", "action": "pause"})
    bench.octoprint.wait_for_state("Paused", 20)
    opens = marlin.opens
    with bench.daemon("printing", serial) as daemon:
        # A spurious event for the node (a udev "change", a re-trigger).
        bench.testbed.send_uevent(plugged, "change")
        row = daemon.wait_for_printer("mk3s", lambda r: r["decision"] == "leave", "a decision")
        assert row["reason"] == "OctoPrint is Paused"
        assert row["connects"] == 0
        stays(bench, "Paused", 2.0)
    assert marlin.opens == opens
    bench.api("POST", "/api/job", json={"command": "cancel"})


# --- behaviour 4: a manual Disconnect is respected --------------------------------


def test_manual_disconnect_is_respected_across_reload_and_restart(bench: Bench) -> None:
    serial = new_serial()
    daemon = bench.daemon("manual", serial)
    with daemon:
        plugged, _marlin = bench.plug(serial)
        wait_operational(bench)
        daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        bench.octoprint.disconnect()  # the user clicks Disconnect
        bench.octoprint.wait_for_state(bench.octoprint.closed_state, 10)
        daemon.signal(signal.SIGHUP)  # reconnectd looks again
        daemon.wait_for_printer(
            "mk3s", lambda r: r["state"] == "holding after manual disconnect", "the hold"
        )
        stays(bench, bench.octoprint.closed_state, 2.0)
    with bench.daemon("manual", serial) as again:  # a restart does not forget it
        again.wait_for_printer(
            "mk3s", lambda r: r["state"] == "holding after manual disconnect", "the hold"
        )
        stays(bench, bench.octoprint.closed_state, 2.0)
        bench.power_cycle(plugged)  # switched off and on: connect again
        wait_operational(bench)
        row = again.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        assert row["holds"] == []


# --- behaviour 5: no reconnect after a firmware fatal error ------------------------


def test_firmware_fatal_error_is_respected_until_power_cycle(bench: Bench) -> None:
    serial = new_serial()
    with bench.daemon("fatal", serial) as daemon:
        plugged, marlin = bench.plug(serial)
        wait_operational(bench)
        daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        marlin.fatal_error()
        bench.octoprint.wait_for_state("Closed", 20)
        assert "kill() called" in str(bench.octoprint.job().get("error"))
        daemon.signal(signal.SIGHUP)
        row = daemon.wait_for_printer(
            "mk3s", lambda r: r["state"] == "holding after firmware error", "the hold"
        )
        assert "kill() called" in str(row["holds"])
        stays(bench, "Closed", 2.0)
        bench.power_cycle(plugged)
        wait_operational(bench)
    assert "hold: firmware error: " in daemon.log()


# --- behaviour 6: the stuck "Opening serial connection" state is recovered ---------


def test_stuck_opening_state_is_recovered(bench: Bench) -> None:
    serial = new_serial()
    plugged, _marlin = bench.plug(serial)
    bench.octoprint.connect(str(bench.stuck_node), 115200)
    opening = bench.octoprint.opening_state
    bench.octoprint.wait_for_state(opening, 10)
    time.sleep(1.0)
    assert bench.state() == opening, "the node must really hang OctoPrint"
    with bench.daemon("stuck", serial) as daemon:
        wait_operational(bench, timeout=60)
        assert bench.port() == plugged.by_id
    log = daemon.log()
    assert f'stuck in "{opening}"' in log
    assert "the stuck connection was closed: connecting to" in log


# --- behaviour 7: a connect that does not reach Operational is retried with backoff --


def test_failed_connect_is_retried_with_backoff(bench: Bench) -> None:
    serial = new_serial()
    with bench.daemon("retry", serial) as daemon:
        _plugged, marlin = bench.plug(serial, silent=True)  # board on, firmware not answering
        row = daemon.wait_for_printer(
            "mk3s", lambda r: r["attempts"] == 1, "the first failed attempt", timeout=60
        )
        assert row["state"] == "waiting to retry"
        assert "next in 5 s" in str(row["reason"])
        marlin.respond()  # the firmware comes up
        wait_operational(bench, timeout=30)
        row = daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        assert row["connects"] == 2 and row["attempts"] == 0


# --- behaviour 8: OctoPrint down or restarting: keep retrying, then reconcile ------


def test_octoprint_down_then_back_is_reconciled(bench: Bench) -> None:
    serial = new_serial()
    with bench.daemon("outage", serial) as daemon:
        bench.octoprint.stop()
        bench.plug(serial)
        daemon.wait_for_printer(
            "mk3s", lambda r: r["state"] == "octoprint unreachable", "the outage"
        )
        bench.octoprint.start()
        wait_operational(bench, timeout=60)
        daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
    log = daemon.log()
    assert log.count("cannot reach OctoPrint") == 1, "an outage is logged once"
    assert "OctoPrint answers again; reconciling" in log


# --- behaviour 9: at start, a present device with OctoPrint closed is connected ----


def test_start_with_the_printer_present_connects_it(bench: Bench) -> None:
    serial = new_serial()
    plugged, _marlin = bench.plug(serial)
    with bench.daemon("startup", serial):
        wait_operational(bench)
        assert bench.port() == plugged.by_id


# --- behaviour 10: a port that never vanishes is polled ----------------------------


def test_polled_port_that_never_vanishes_is_reconnected_when_the_printer_answers(
    bench: Bench,
) -> None:
    serial = new_serial()
    with bench.daemon("prusa", serial, poll=5) as daemon:
        _plugged, marlin = bench.plug(serial)
        wait_operational(bench)
        daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
        # Switched off behind a USB chip powered by the host: no udev event at all.
        marlin.go_silent()
        bench.octoprint.wait_for_state("Closed", 30)
        assert "Too many consecutive timeouts" in str(bench.octoprint.job().get("error"))
        # reconnectd notices on its next look and tries; the attempt at a silent
        # printer fails and is retried with backoff, never taken for a Disconnect.
        row = daemon.wait_for_printer(
            "mk3s", lambda r: r["attempts"] != 0, "a failed attempt", timeout=60
        )
        assert row["holds"] == []
        connects_before = row["connects"]
        assert isinstance(connects_before, int) and connects_before >= 2
        switched_on = time.monotonic()
        marlin.respond()  # switched on again
        wait_operational(bench, timeout=60)
        took = time.monotonic() - switched_on
        row = daemon.wait_for_printer("mk3s", lambda r: r["state"] == "operational", "operational")
    # Within the current backoff (5 s, then 10 s) plus one connect (~4 s here).
    assert took <= 10 + 5, f"Operational {took:.1f} s after the firmware answered"
    assert row["connects"] in (connects_before, connects_before + 1, connects_before + 2)
    log = daemon.log()
    assert "OctoPrint lost the printer (Too many consecutive timeouts" in log
    assert log.count("WARNING") <= 2, "a run of failures is logged once, not per attempt"


def test_static_node_in_a_container_is_connected_only_while_a_device_is_behind_it(
    bench: Bench,
) -> None:
    """LXC: OctoPrint and reconnectd see a node made with mknod, which stays whether
    or not the printer is attached; only sysfs tells, and no udev event concerns it."""
    serial = new_serial()
    plugged, marlin = bench.plug(serial)
    # The container's static node, made once and never removed. In the testbed's
    # /dev (which is /dev for reconnectd and OctoPrint) a character node is what
    # umockdev emulates: a link to the pty behind the printer, and its device number
    # as the target of a link in dev/.node. A ttyACM name far above the testbed's
    # own, which OctoPrint's port scan lists.
    n = next(serial_numbers)
    name = f"ttyACM9{n}"
    number = f"166:{900 + n}"
    node = bench.testbed.root / "dev" / name
    node.symlink_to(os.path.realpath(bench.testbed.root / plugged.node.lstrip("/")))
    node_number = bench.testbed.root / "dev" / ".node" / name
    node_number.symlink_to(number)
    sys_link = bench.testbed.root / "sys" / "dev" / "char" / number
    config = (
        "[octoprint]\n"
        f'url = "{bench.octoprint.url}"\n'
        f'api_key = "{bench.octoprint.api_key}"\n\n'
        "[[printer]]\n"
        'name = "lxc"\n'
        f'port = "/dev/{name}"\n'
        "poll = 5\n"
        f"settle = {SETTLE}\n"
    )
    try:
        with DaemonProcess(bench.workdir / "lxc", config, env=bench.testbed.env) as daemon:
            daemon.wait_for_printer("lxc", lambda r: r["state"] == "absent", "absent")
            stays(bench, "Closed", 6.0)  # more than a poll period: nothing behind the node
            assert daemon.printer("lxc")["connects"] == 0
            attached = time.monotonic()
            sys_link.symlink_to("../../" + plugged.devpath.lstrip("/"))  # the printer attached
            wait_operational(bench, timeout=30)
            took = time.monotonic() - attached
            assert bench.port() == f"/dev/{name}"
            row = daemon.wait_for_printer("lxc", lambda r: r["state"] == "operational", "op")
            assert row["connects"] == 1
            assert took <= 5 + SETTLE + 3, f"Operational {took:.1f} s after the device appeared"
            # Detached again: OctoPrint loses the line, and reconnectd makes no attempt
            # at a node with nothing behind it.
            marlin.vanish()
            sys_link.unlink()
            bench.octoprint.wait_for_state("Closed", 10)
            daemon.wait_for_printer("lxc", lambda r: r["state"] == "absent", "absent again")
            stays(bench, "Closed", 6.0)
            assert daemon.printer("lxc")["connects"] == 1
    finally:
        if sys_link.is_symlink():
            sys_link.unlink()
        node.unlink()
        node_number.unlink()


# --- the service contract, against the real process --------------------------------


def test_sd_notify_signals_and_exit_codes(bench: Bench) -> None:
    serial = new_serial()
    daemon = DaemonProcess(
        bench.workdir / "notify",
        bench.config(serial),
        env=bench.testbed.env,
        watchdog_usec=400_000,
    )
    daemon.start()
    ready = next(m for m in daemon.notifications if m.startswith("READY=1"))
    assert ready.startswith("READY=1\n") and "STATUS=mk3s: absent" in ready
    daemon.wait_for_notification(lambda m: m == "WATCHDOG=1", timeout=5)
    # A broken config on SIGHUP is logged and the old one kept.
    daemon.config_path.write_text("[[printer]]\nname = 1\n")
    daemon.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "keeping the old one" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    assert daemon.running()
    bench.plug(serial)
    wait_operational(bench)  # still served with the old config
    assert daemon.stop() == 0
    assert daemon.notifications[-1] == "STOPPING=1"
    assert not any(m.startswith("RELOADING=1") for m in daemon.notifications)


def test_sigint_stops_cleanly(bench: Bench) -> None:
    daemon = bench.daemon("sigint", new_serial()).start()
    daemon.signal(signal.SIGINT)
    assert daemon.wait_exit() == 0


def test_non_printer_tty_is_ignored(bench: Bench) -> None:
    serial = new_serial()
    with bench.daemon("gps", serial) as daemon:
        bench.printers.plug_other("gps", usb_port="1-2")
        plugged, _marlin = bench.plug(serial)
        wait_operational(bench)
        assert bench.port() == plugged.by_id
        assert daemon.printer("mk3s")["connects"] == 1


# --- the commands that look at the real world ----------------------------------------


def run_command(
    bench: Bench, workdir: Path, config: str, *args: str
) -> subprocess.CompletedProcess[str]:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "reconnectd.toml"
    path.write_text(config)
    env = dict(bench.testbed.env, PYTHONPATH=str(REPO), RECONNECTD_CONFIG=str(path))
    return subprocess.run(
        [sys.executable, "-m", "reconnectd", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_devices_lists_the_printer_with_its_match_and_a_stanza(bench: Bench) -> None:
    serial = new_serial()
    plugged, _marlin = bench.plug(serial)
    bench.printers.plug_other("gps", usb_port="1-2")
    done = run_command(bench, bench.workdir / "devices", bench.config(serial), "devices", "--json")
    assert done.returncode == 0, done.stderr
    rows = {row["node"]: row for row in json.loads(done.stdout)}
    printer = rows[plugged.node]
    assert printer["printers"] == ["mk3s"]
    assert plugged.by_id in printer["links"]
    assert (printer["vendor_id"], printer["product_id"], printer["serial"]) == (
        "2c99",
        "0002",
        serial,
    )
    assert f'serial = "{serial}"' in printer["stanza"]
    gps = [row for node, row in rows.items() if node != plugged.node]
    assert gps and gps[0]["printers"] == [] and gps[0]["board"] is None
    text = run_command(bench, bench.workdir / "devices", bench.config(serial), "devices")
    assert f"{plugged.node}\n" in text.stdout
    assert "printer:  mk3s" in text.stdout
    assert '        vendor_id = "2c99"' in text.stdout


@pytest.mark.parametrize(
    ("key", "url", "code", "says"),
    [
        (None, None, 0, "OK: state Closed"),
        ("0123456789abcdef0123456789abcdef", None, 77, "API key"),
        (None, "http://127.0.0.1:9", 69, "unreachable: connection refused"),
    ],
)
def test_check_online_against_a_real_octoprint(
    bench: Bench, key: str | None, url: str | None, code: int, says: str
) -> None:
    config = bench.config("X", key=key)
    if url is not None:
        config = config.replace(bench.octoprint.url, url)
    done = run_command(bench, bench.workdir / "check", config, "check", "--online")
    assert done.returncode == code, done.stdout + done.stderr
    assert says in done.stdout
    assert bench.state() == "Closed", "the permission probe must not connect anything"


# --- a reconnect plugin in OctoPrint fights reconnectd: say so --------------------

# A stand-in for OctoPrint-PortRetry: a single-file plugin takes its identifier from
# its file name, so OctoPrint loads this as "portretry" and lists its settings under
# plugins.portretry, exactly as for the real plugin (whose timer is left out).
PORTRETRY_STAND_IN = """\
import octoprint.plugin


class PortRetryStandIn(octoprint.plugin.SettingsPlugin):
    def get_settings_defaults(self):
        return {"interval": 5}


__plugin_name__ = "PortRetry (reconnectd test stand-in)"
__plugin_pythoncompat__ = ">=3.7,<4"
__plugin_implementation__ = PortRetryStandIn()
"""


def wait_for_log(daemon: DaemonProcess, text: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in daemon.log():
        assert time.monotonic() < deadline, f"{text!r} not logged:\n{daemon.log()}"
        time.sleep(0.05)


def test_an_enabled_reconnect_plugin_is_warned_about(bench: Bench) -> None:
    """Two printers, each with its OctoPrint: one runs PortRetry, the other nothing."""
    with OctoPrintInstance(
        bench.workdir / "octoprint-with-portretry",
        octoprint_bin=bench.octoprint.octoprint_bin,
        plugins={"portretry.py": PORTRETRY_STAND_IN},
    ) as other:
        config = bench.config(new_serial()) + (
            "\n[[printer]]\n"
            'name = "ender"\n'
            'vendor_id = "1a86"\n'
            'product_id = "7523"\n'
            "[printer.octoprint]\n"
            f'url = "{other.url}"\n'
            f'api_key = "{other.api_key}"\n'
        )
        with DaemonProcess(bench.workdir / "plugins", config, env=bench.testbed.env) as daemon:
            wait_for_log(daemon, f"OctoPrint at {other.url} runs the PortRetry plugin (portretry)")
            wait_for_log(daemon, f"OctoPrint at {bench.octoprint.url} runs no reconnect plugin")
    warnings = [line for line in daemon.log().splitlines() if "two reconnectors fight" in line]
    assert len(warnings) == 1, daemon.log()
    assert "WARNING" in warnings[0] and other.url in warnings[0]


def test_check_online_says_whether_octoprint_offers_the_present_printer(bench: Bench) -> None:
    serial = new_serial()
    plugged, _marlin = bench.plug(serial)
    config = bench.config(serial)
    done = run_command(bench, bench.workdir / "check", config, "check", "--online")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"mk3s: {plugged.node} is offered as {plugged.by_id}" in done.stdout

    # The user blacklisted the printer in OctoPrint: it can never be connected.
    bench.api(
        "POST",
        "/api/settings",
        json={"serial": {"blacklistedPorts": [plugged.node, plugged.by_id]}},
    )
    try:
        done = run_command(bench, bench.workdir / "check", config, "check", "--online")
    finally:
        bench.api("POST", "/api/settings", json={"serial": {"blacklistedPorts": []}})
    assert done.returncode == 1, done.stdout + done.stderr
    assert (
        f"mk3s: {plugged.node} is present but {bench.octoprint.url} does not offer it"
        f" (nor {plugged.by_id}"
    ) in done.stdout, done.stdout
    assert "; in OctoPrint's serial settings add /dev/serial/by-id/* to the additional" in (
        done.stdout
    )
    assert bench.state() == "Closed", "checking connects nothing"
