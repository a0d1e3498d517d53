"""The service as systemd runs it: installed by systemd/install, as a user that is not root.

The unit says ``User=reconnectd`` with no capabilities. These tests install reconnectd
the way the README does (into a scratch root, with Debian's own Python) and run that
installed command as ``nobody``, as systemd would run it as its service user: a real
netlink socket for udev events, a power cycle under a umockdev testbed reaching a
real OctoPrint, the status and state files written, and ``check --online``, all
without privileges. The key file is the service user's own, mode 0600.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.daemon_process import DaemonProcess
from tests.support.octoprint_instance import OctoPrintInstance
from tests.support.printers import SimulatedPrinters
from tests.support.real import missing, require_umockdev_and_octoprint
from tests.support.testbed import Testbed

pytestmark = [pytest.mark.umockdev, pytest.mark.octoprint]

REPO = Path(__file__).resolve().parents[1]
# Debian's own Python, as on a Raspberry Pi: readable by every user, unlike a
# pyenv or venv under /root.
SYSTEM_PYTHON = "/usr/bin/python3"
NOBODY = (65534, 65534)


@dataclass
class Unprivileged:
    base: Path  # world-traversable: the service user must reach what is in it
    command: Path  # the installed reconnectd
    testbed: Testbed
    octoprint: OctoPrintInstance
    printers: SimulatedPrinters

    def key_file(self, name: str) -> Path:
        """Given a name, write OctoPrint's key to a file the service user owns, mode 0600."""
        key = self.base / name
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(self.octoprint.api_key + "\n")
        os.chown(key, *NOBODY)
        return key

    def config(self, key: Path, serial: str) -> str:
        return (
            "[octoprint]\n"
            f'url = "{self.octoprint.url}"\n'
            f'api_key_file = "{key}"\n\n'
            "[[printer]]\n"
            'name = "mk3s"\n'
            'vendor_id = "2c99"\n'
            'product_id = "0002"\n'
            f'serial = "{serial}"\n'
            "settle = 0.5\n"
        )

    def as_nobody(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Given reconnectd's arguments, run the installed command as nobody."""
        return run_as_nobody([str(self.command), *args])


def run_as_nobody(command: list[str]) -> subprocess.CompletedProcess[str]:
    """Given a command, run it as nobody, as systemd runs the service as its user."""
    return subprocess.run(
        command,
        env=without_repo(os.environ),
        user=NOBODY[0],
        group=NOBODY[1],
        extra_groups=[],
        cwd="/",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def without_repo(env: dict[str, str] | os._Environ[str]) -> dict[str, str]:
    """The environment minus anything that would run this checkout instead of the install."""
    return {k: v for k, v in env.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def unprivileged() -> Iterator[Unprivileged]:
    require_umockdev_and_octoprint()
    if os.geteuid() != 0:
        pytest.skip("running as a user that is not root already needs root to switch to")
    if not Path(SYSTEM_PYTHON).exists():
        missing(f"no {SYSTEM_PYTHON} (Debian's python3; tests/bootstrap installs it)")
    # tmp_path lives under a directory only root may enter.
    base = Path(tempfile.mkdtemp(prefix="reconnectd-unprivileged-"))
    try:
        base.chmod(0o755)
        root = base / "root"
        installed = subprocess.run(
            ["bash", str(REPO / "systemd" / "install")],
            env={**without_repo(os.environ), "ROOT": str(root), "PYTHON": SYSTEM_PYTHON},
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert installed.returncode == 0, installed.stdout + installed.stderr
        with Testbed(base / "testbed") as testbed:
            # umockdev's directory stands for /sys and /dev: like those, every user
            # may read it, and a udev client makes its event socket in it.
            testbed.root.chmod(0o1777)
            instance = OctoPrintInstance(
                base / "octoprint", env=testbed.env, additional_ports=["/dev/serial/by-id/*"]
            )
            with instance:
                yield Unprivileged(
                    base,
                    root / "opt/reconnectd/bin/reconnectd",
                    testbed,
                    instance,
                    SimulatedPrinters(testbed),
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def bench(unprivileged: Unprivileged) -> Iterator[Unprivileged]:
    yield unprivileged
    unprivileged.octoprint.reset()
    unprivileged.printers.clear()


def test_a_user_that_is_not_root_may_listen_to_udev_on_a_real_netlink_socket(
    bench: Unprivileged,
) -> None:
    # Outside the testbed: the kernel's own netlink socket, bound to udev's group, as
    # the service does it. Binding a uevent multicast group needs no privilege.
    python = bench.command.parent / "python"
    probe = (
        "import os, pyudev\n"
        "monitor = pyudev.Monitor.from_netlink(pyudev.Context())\n"
        "monitor.filter_by('tty')\n"
        "monitor.start()\n"
        "print(os.geteuid(), monitor.fileno() >= 0)\n"
    )
    done = run_as_nobody([str(python), "-c", probe])
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(NOBODY[0]), "True"]


def test_the_installed_daemon_reconnects_a_power_cycled_printer_as_nobody(
    bench: Unprivileged,
) -> None:
    serial = f"UNPRIV{os.getpid()}"
    plugged, _ = bench.printers.switch_on(serial)
    key = bench.key_file("nobody.key")
    env = without_repo(bench.testbed.env)
    daemon = DaemonProcess(
        bench.base / "daemon",
        bench.config(key, serial),
        env=env,
        command=[str(bench.command)],
        user=NOBODY,
    )
    # The start-up reconciliation connects the present printer (behaviour 9).
    with daemon:
        assert daemon.wait_for_printer(
            "mk3s", lambda r: r.get("state") == "operational", "operational"
        )
        bench.octoprint.wait_for_state("Operational", 30)

        bench.printers.switch_off(plugged)
        bench.octoprint.wait_for_state(lambda s: s != "Operational", 30)
        again, _ = bench.printers.switch_on(serial)
        daemon.wait_for_printer(
            "mk3s",
            lambda r: r.get("state") == "operational" and r.get("device") == again.node,
            "operational on the new node",
        )
        bench.octoprint.wait_for_state("Operational", 30)
        assert bench.octoprint.connection()["current"]["port"] in (again.node, again.by_id)

        status = daemon.runtime_dir / "status.json"
        state = daemon.state_dir / "state.json"
        assert status.stat().st_uid == NOBODY[0]
        assert stat.S_IMODE(status.stat().st_mode) == 0o644, "status is for every user to read"
        assert state.stat().st_uid == NOBODY[0]
        ps = Path(f"/proc/{daemon.pid}/status").read_text()
        uid_line = next(line for line in ps.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1:] == [str(NOBODY[0])] * 4
    assert "Traceback" not in daemon.log(), daemon.log()
    # Everything in LD_PRELOAD loaded (the bench's close guard too), as the service user.
    assert "cannot be preloaded" not in daemon.log(), daemon.log()


def test_check_online_as_the_service_user(bench: Unprivileged) -> None:
    key = bench.key_file("check.key")
    config = bench.base / "check.toml"
    config.write_text(bench.config(key, "ANY"))
    done = bench.as_nobody("--config", str(config), "check", "--online")
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"{bench.octoprint.url}: OK" in done.stdout


def test_a_key_file_the_service_user_cannot_read_is_a_config_error_naming_it(
    bench: Unprivileged,
) -> None:
    key = bench.key_file("roots.key")
    os.chown(key, 0, 0)  # root's, mode 0600: what an upgrade from a root service leaves
    config = bench.base / "unreadable.toml"
    config.write_text(bench.config(key, "ANY"))
    done = bench.as_nobody("--config", str(config), "check")
    assert done.returncode == 78, done.stdout + done.stderr
    assert f'api_key_file: cannot read "{key}": permission denied' in done.stderr.lower()
