"""reconnectd installed and run by a real systemd 252 as PID 1, as a Pi owner meets it.

One container per module (tests/support/container.py: systemd-nspawn over this
machine's own userland, an overlay that never touches its disk), booted in about a
second. In it, as on a fresh Raspberry Pi OS: the user ``pi`` (with the passwordless
sudo Raspberry Pi OS gives it) clones the repository and runs the README's install
command, with Debian's python3-venv not installed yet. What is cloned is this
checkout's committed HEAD, which is what CI sees; ``RECONNECTD_CONTAINER_REPO`` names
another repository to clone instead (to try uncommitted work, commit it in a copy).

Everything is then checked the way a user would: ``systemctl``, ``journalctl``,
``reconnectd status``. The OctoPrint is a :class:`FakeOctoPrint` on the host's
loopback, which the container shares; the printer is a static device node (no udevd
runs in the container: the LXC set-up, ``port`` and ``poll``, which the daemon
serves without udev and without a warning).

The tests run in order and build on each other, as one machine's life does:
install, configure, reload, stop, crash, hang, upgrade, uninstall. Each says what
it expects to find; a test that changes the service's config or unit puts back
what it changed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from tests.support.container import Container, host_state, unavailable_reason
from tests.support.fake_octoprint import FakeOctoPrint
from tests.support.real import missing

pytestmark = pytest.mark.systemd

REPO = Path(__file__).resolve().parents[1]
# The README's own commands, run as the user pi from the clone.
CLONE = "git clone -q /srv/reconnectd.git ~/reconnectd"
INSTALL = "cd ~/reconnectd && sudo bash systemd/install"
UPGRADE = "cd ~/reconnectd && git pull -q && sudo bash systemd/install"
UNINSTALL = "cd ~/reconnectd && sudo bash systemd/uninstall"
# The printer: a static node, as LXC gives one, that the daemon finds from sysfs
# (5:0 is /dev/tty, present on every Linux); no udevd is needed to see it.
PORT = "/dev/ttyPRINTER"
NODE_NUMBERS = ("5", "0")
CONFIG = "/etc/reconnectd/reconnectd.toml"
KEY_FILE = "/etc/reconnectd/octoprint.key"
SITE = "/opt/reconnectd/lib/python3.*/site-packages"
STALE_MODULE = "reconnectd/upgrade_probe.py"

T = TypeVar("T")


def good_config(url: str, *extra_printers: str) -> str:
    """Given OctoPrint's URL and names of more printers (absent), return a config."""
    text = (
        "[octoprint]\n"
        f'url = "{url}"\n'
        f'api_key_file = "{KEY_FILE}"\n\n'
        "[[printer]]\n"
        'name = "mk3s"\n'
        f'port = "{PORT}"\n'
        "poll = 5\n"
    )
    for number, name in enumerate(extra_printers, start=1):
        # One OctoPrint instance drives one printer: each has its own, never reached
        # while its printer is absent.
        text += (
            f'\n[[printer]]\nname = "{name}"\nport = "/dev/tty{name.upper()}"\npoll = 5\n'
            f'[printer.octoprint]\nurl = "http://127.0.0.1:{number}"\n'
        )
    return text


@dataclass
class Box:
    """The container, its OctoPrint, and what a user does there."""

    container: Container
    octoprint: FakeOctoPrint
    first_install: subprocess.CompletedProcess[str]

    def as_pi(self, script: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Given a shell script, run it as pi in pi's home."""
        return self.container.sh(f"cd ~ && {script}", user="pi", timeout=300, check=check)

    def systemctl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.container.run("systemctl", *args, check=check, timeout=120)

    def show(self, prop: str) -> str:
        """Given a property of reconnectd.service, return its value."""
        return self.systemctl("show", "--property", prop, "--value", "reconnectd").stdout.strip()

    def main_pid(self) -> int:
        return int(self.show("MainPID"))

    def mark(self) -> int:
        """Return the time of the journal's last entry: :meth:`journal` shows what follows."""
        last = self.container.run("journalctl", "--lines=1", "--output=json").stdout
        return int(json.loads(last)["__REALTIME_TIMESTAMP"])

    def journal(self, after: int | None, priority: str | None = None) -> str:
        """Given a mark (None: from the start), return reconnectd's journal since then.

        The query is the user's own, ``journalctl -u reconnectd [-p PRIORITY]``; the
        entries before the mark are dropped here, not with ``--after-cursor``, which
        in systemd 252 also skips the first entry that a ``-p`` filter lets through
        when the cursor's own entry is filtered out.
        """
        args = ["journalctl", "--unit=reconnectd", "--output=json"]
        if priority is not None:
            args.append(f"--priority={priority}")
        lines = []
        for line in self.container.run(*args).stdout.splitlines():
            entry = json.loads(line)
            if after is not None and int(entry["__REALTIME_TIMESTAMP"]) <= after:
                continue
            message = entry.get("MESSAGE", "")
            if isinstance(message, list):  # journald's form for text that is not UTF-8
                message = bytes(message).decode(errors="replace")
            who = entry.get("SYSLOG_IDENTIFIER", "?")
            lines.append(f"{who}[{entry.get('_PID', '?')}]: {message}\n")
        return "".join(lines)

    def write_key(self) -> None:
        """Store OctoPrint's key as the README says: root:reconnectd, mode 0640."""
        self.container.write(KEY_FILE, self.octoprint.api_key + "\n", 0o640, "reconnectd")

    def write_config(self, text: str) -> None:
        self.container.write(CONFIG, text, 0o640, "reconnectd")

    def wait(self, what: str, probe: Callable[[], T | None], timeout: float = 20) -> T:
        """Given a probe, return its first true answer; fail naming ``what`` after timeout."""
        deadline = time.monotonic() + timeout
        while True:
            answer = probe()
            if answer:
                return answer
            if time.monotonic() > deadline:
                pytest.fail(f"not within {timeout} s: {what}")
            time.sleep(0.1)

    def wait_for_status(self, expected: str, timeout: float = 20) -> None:
        """Given a STATUS= text, wait until `systemctl status` shows it."""
        self.wait(
            f"STATUS={expected!r} (it is {self.show('StatusText')!r})",
            lambda: self.show("StatusText") == expected,
            timeout,
        )

    def configured(self) -> None:
        """Make the service run on the good config, with OctoPrint up, if it does not."""
        self.octoprint.set_fault(None)
        self.write_key()
        self.write_config(good_config(self.octoprint.url))
        if self.show("ActiveState") != "active":
            self.systemctl("reset-failed", "reconnectd", check=False)
            self.systemctl("start", "reconnectd")
        else:
            self.systemctl("reload", "reconnectd")
        self.wait_for_status("mk3s: operational")


def printer_at(port: str) -> str | None:
    """What the fake OctoPrint finds answering on a port: the printer, on its node."""
    return "mk3s" if port == PORT else None


@pytest.fixture(scope="module")
def box() -> Iterator[Box]:
    reason = unavailable_reason()
    if reason:
        missing(reason)
    source = Path(os.environ.get("RECONNECTD_CONTAINER_REPO", REPO)).resolve()
    if not (source / ".git").exists():
        missing(f"{source} is not a git checkout: the install is tested from a clone of it")
    before = host_state()
    try:
        with FakeOctoPrint(lambda: [PORT], printer_at) as fake, Container([source]) as container:
            container.sh(
                # Raspberry Pi OS's first user, and its sudo rule (010_pi-nopasswd).
                "useradd --create-home --shell /bin/bash pi\n"
                "echo 'pi ALL=(ALL) NOPASSWD: ALL' >/etc/sudoers.d/010_pi-nopasswd\n"
                # The repository pi clones: a bare copy of the checkout's HEAD.
                f"git clone -q --bare {shlex.quote(str(source))} /srv/reconnectd.git\n"
                "chown -R pi:pi /srv/reconnectd.git\n"
                # Raspberry Pi OS Lite comes without python3-venv: so does this one.
                "dpkg --remove python3-venv $(dpkg-query -W -f='${Package} ' 'python3.*-venv')"
                " >/dev/null 2>&1 || true\n"
                "! python3 -c 'import ensurepip' 2>/dev/null\n"
                # The printer's static node, owned as udev would own it.
                f"mknod -m 0660 {PORT} c {' '.join(NODE_NUMBERS)}\n"
                f"chgrp dialout {PORT}\n"
            )
            box = Box(container, fake, subprocess.CompletedProcess([], 0))
            box.as_pi(CLONE)
            box.first_install = box.as_pi(INSTALL, check=False)
            if box.first_install.returncode != 0:
                # Every test below needs the service: one failure says why, not twelve.
                pytest.fail(
                    "the install failed:\n" + box.first_install.stdout + box.first_install.stderr
                )
            yield box
    finally:
        changes = before.changes(host_state())
        assert not changes, "the container left the host changed:\n" + "\n".join(changes)


# --- the container itself -------------------------------------------------------------


def test_a_container_whose_nspawn_died_still_leaves_the_host_as_it_was() -> None:
    """The fixture's teardown, on the worst case: nspawn killed outright, so nothing
    powers the container off and its systemd runs on, orphaned."""
    reason = unavailable_reason()
    if reason:
        missing(reason)
    before = host_state()
    container = Container()
    try:
        nspawn = container.nspawn_pid
        os.kill(nspawn, signal.SIGKILL)
        state = container.run("systemctl", "is-system-running", check=False).stdout.strip()
        assert state in ("running", "degraded"), "the container lives on without nspawn"
    finally:
        container.close()
    assert before.changes(host_state()) == []


# --- installing -----------------------------------------------------------------------


def test_install_on_a_fresh_system_enables_and_starts_the_service(box: Box) -> None:
    done = box.first_install
    assert done.returncode == 0, done.stdout + done.stderr
    # python3-venv was missing: installed after refreshing the lists, and said so.
    assert "has no venv module: installing python3-venv (apt-get update" in done.stdout
    assert "made the system user reconnectd" in done.stdout
    assert f"wrote the example config {CONFIG}" in done.stdout
    # What to do next, in the order a new user needs it.
    steps = [
        "sudo reconnectd devices",
        CONFIG,
        "sudo reconnectd login",
        "sudo systemctl reload reconnectd",
        "systemctl status reconnectd",
    ]
    assert "\nNext:\n" in done.stdout, done.stdout
    next_steps = done.stdout.split("\nNext:\n", 1)[1]
    positions = [next_steps.find(step) for step in steps]
    assert -1 not in positions and positions == sorted(positions), next_steps
    assert box.systemctl("is-enabled", "reconnectd").stdout.strip() == "enabled"
    assert box.systemctl("is-active", "reconnectd").stdout.strip() == "active"
    # The daemon's own STATUS= line, as `systemctl status` shows it: the example
    # config has no [[printer]], and no printer board is plugged in.
    status = box.systemctl("status", "reconnectd").stdout
    assert 'Status: "printer: absent · klipper: absent"' in status, status
    assert "Main PID:" in status and "/usr/local/bin/reconnectd run" in status


def test_install_leaves_the_clone_as_it_was(box: Box) -> None:
    clean = box.as_pi("cd ~/reconnectd && git status --ignored --porcelain")
    assert clean.stdout == ""
    # Nothing owned by root either, which would stop pi's next `git pull`.
    foreign = box.as_pi("find ~/reconnectd ! -user pi")
    assert foreign.stdout == ""


def test_a_new_install_warns_about_what_is_not_set_up_yet(box: Box) -> None:
    # The example config: no udevd here, and no API key yet. Both are what a
    # person must fix, so both are warnings (and nothing else is).
    text = box.journal(None, "warning")
    assert "udevd is not running here" in text
    assert "no API key for OctoPrint at http://127.0.0.1:5000" in text


# --- running ------------------------------------------------------------------------------


def test_configured_and_all_is_well_nothing_at_warning(box: Box) -> None:
    box.write_key()
    box.write_config(good_config(box.octoprint.url))
    mark = box.mark()
    box.systemctl("restart", "reconnectd")
    # The printer behind the static node, present at start with OctoPrint closed,
    # is connected (behaviour 9) and STATUS= says so.
    box.wait_for_status("mk3s: operational")
    assert [post.port for post in box.octoprint.connects] == [PORT]
    status = box.systemctl("status", "reconnectd").stdout
    assert 'Status: "mk3s: operational"' in status
    shown = box.container.run("reconnectd", "status").stdout
    assert "mk3s" in shown and "operational" in shown
    # Every line of the start, up to the connect confirmed, is in the journal by now.
    box.wait(
        "the connect confirmed in the journal",
        lambda: "mk3s: connected: OctoPrint is Operational" in box.journal(mark),
    )
    assert box.journal(mark, "warning") == ""
    assert re.search(rf"reconnectd \S+: config {CONFIG}, printers: mk3s", box.journal(mark))


def test_the_running_unit_is_rated_ok_by_systemd_analyze_security(box: Box) -> None:
    box.configured()
    done = box.container.run("systemd-analyze", "security", "reconnectd.service")
    rating = re.search(
        r"Overall exposure level for reconnectd\.service: (\d+\.\d+) (\w+)", done.stdout
    )
    assert rating is not None, done.stdout
    assert float(rating.group(1)) <= 2.0 and rating.group(2) == "OK", rating.group(0)


def test_an_octoprint_outage_is_a_warning(box: Box) -> None:
    box.configured()
    mark = box.mark()
    box.octoprint.set_fault("refuse")  # OctoPrint stopped: nothing listens there
    try:
        # Seen at the next look, one poll period (5 s) later.
        box.wait(
            "the outage in journalctl -p warning",
            lambda: "mk3s: wait: cannot reach OctoPrint" in box.journal(mark, "warning"),
            timeout=20,
        )
        box.wait_for_status("mk3s: octoprint unreachable")
    finally:
        box.octoprint.set_fault(None)
    # OctoPrint is back. The daemon would look again on its own after its backoff;
    # a reload makes it look now (and the test shorter).
    box.configured()
    assert "mk3s: OctoPrint answers again" in box.journal(mark)


# Config problems go to stderr with a "<3>" prefix when stderr is the journal
# (logs.is_journal): without it journald files them at info, below `-p warning`.
def test_a_config_problem_is_in_journalctl_at_warning(box: Box) -> None:
    box.configured()
    typo = good_config(box.octoprint.url).replace("poll = 5", "pol = 5", 1)
    problem = re.compile(rf'{CONFIG}: .*unknown key "pol"')
    # A reload refused (ExecReload's check, as the service user)...
    box.write_config(typo)
    mark = box.mark()
    assert box.systemctl("reload", "reconnectd", check=False).returncode != 0
    warnings = box.journal(mark, "warning")
    assert problem.search(warnings), warnings
    # ...and a start refused: exit 78, which is not restarted (an edit fixes it).
    mark = box.mark()
    assert box.systemctl("restart", "reconnectd", check=False).returncode != 0
    assert box.show("ExecMainStatus") == "78"
    time.sleep(0.5)
    assert box.show("ActiveState") == "failed"
    warnings = box.journal(mark, "warning")
    assert problem.search(warnings), warnings
    box.configured()


def test_reload_applies_a_good_config(box: Box) -> None:
    box.configured()
    pid = box.main_pid()
    box.write_config(good_config(box.octoprint.url, "spare"))
    done = box.systemctl("reload", "reconnectd", check=False)
    assert done.returncode == 0, done.stderr
    box.wait_for_status("mk3s: operational · spare: absent")
    assert box.main_pid() == pid


def test_reload_with_a_broken_config_fails_and_keeps_the_old_one(box: Box) -> None:
    box.configured()
    pid = box.main_pid()
    mark = box.mark()
    box.write_config(good_config(box.octoprint.url, "spare").replace('"spare"', "spare"))
    done = box.systemctl("reload", "reconnectd", check=False)
    assert done.returncode != 0
    assert "Job for reconnectd.service failed" in done.stderr
    # Where the user looks next: the status shows why, naming the file.
    status = box.systemctl("status", "reconnectd", check=False).stdout
    assert f"{CONFIG}:" in status and "ExecReload=/usr/local/bin/reconnectd check" in status
    # The daemon was never told: same process, same config, nothing reloaded.
    assert box.show("ActiveState") == "active"
    assert box.main_pid() == pid
    assert box.show("StatusText") == "mk3s: operational"
    assert "reloading the config" not in box.journal(mark)
    # Fixed, the next reload works: a failed one leaves nothing half done.
    box.write_config(good_config(box.octoprint.url, "spare"))
    box.systemctl("reload", "reconnectd")
    box.wait_for_status("mk3s: operational · spare: absent")
    assert box.main_pid() == pid


def test_stop_is_clean_and_quick(box: Box) -> None:
    box.configured()
    started = time.monotonic()
    box.systemctl("stop", "reconnectd")
    took = time.monotonic() - started
    assert took < 5, f"stop took {took:.1f} s (TimeoutStopSec is {box.show('TimeoutStopUSec')})"
    assert box.show("Result") == "success"
    assert box.show("ExecMainStatus") == "0"
    assert box.show("ActiveState") == "inactive"
    box.systemctl("start", "reconnectd")
    box.wait_for_status("mk3s: operational")


def test_kill_9_is_restarted(box: Box) -> None:
    box.configured()
    pid = box.main_pid()
    restarts = int(box.show("NRestarts"))
    box.container.run("kill", "-KILL", str(pid))
    # RestartSec=5, as shipped.
    box.wait(
        "a new main process after kill -9",
        lambda: box.show("ActiveState") == "active" and box.main_pid() not in (0, pid),
        timeout=20,
    )
    assert int(box.show("NRestarts")) == restarts + 1
    box.wait_for_status("mk3s: operational")


def test_a_stalled_loop_is_aborted_by_the_watchdog_and_restarted(box: Box) -> None:
    box.configured()
    # A short watchdog, so the test need not wait the shipped 30 s; the loop is then
    # frozen from outside (SIGSTOP): it stops pinging exactly as a hung loop would.
    dropin = "/etc/systemd/system/reconnectd.service.d"
    box.container.sh(f"mkdir -p {dropin} && printf '[Service]\\nWatchdogSec=2\\n' >{dropin}/t.conf")
    try:
        box.systemctl("daemon-reload")
        box.systemctl("restart", "reconnectd")
        box.wait_for_status("mk3s: operational")
        pid = box.main_pid()
        mark = box.mark()
        box.container.run("kill", "-STOP", str(pid))
        box.wait(
            "a new main process after the watchdog fired",
            lambda: box.show("ActiveState") == "active" and box.main_pid() not in (0, pid),
            timeout=30,
        )
        warnings = box.journal(mark, "warning")
        assert "Watchdog timeout" in warnings, box.journal(mark)
        assert "status=6/ABRT" in box.journal(mark)
        # SIGABRT, then systemd's SIGCONT: faulthandler says where the loop stood.
        errors = box.journal(mark, "err")
        assert "Fatal Python error: Aborted" in errors, box.journal(mark)
        assert re.search(r"File \".*/reconnectd/daemon\.py\", line \d+ in run", errors)
    finally:
        box.container.run("rm", "-rf", dropin)
        box.systemctl("daemon-reload")
    box.systemctl("restart", "reconnectd")
    box.wait_for_status("mk3s: operational")


# --- upgrading and uninstalling -------------------------------------------------------------


def commit_upstream(box: Box, script: str, message: str) -> None:
    """Given a shell script run in a clone of the upstream, commit and push what it did."""
    box.as_pi(
        "rm -rf ~/work && git clone -q /srv/reconnectd.git ~/work && cd ~/work\n"
        f"{script}\n"
        "git add -A\n"
        "git -c user.name=test -c user.email=test@example.invalid"
        f" commit -q -m {shlex.quote(message)}\n"
        "git push -q origin HEAD\n"
    )


def test_an_upgrade_keeps_config_and_state_and_runs_only_the_new_code(box: Box) -> None:
    box.configured()
    kept = (
        f"stat -c '%n %U:%G %a %s' {CONFIG} {KEY_FILE} /etc/reconnectd /var/lib/reconnectd"
        f" && sha256sum {CONFIG} {KEY_FILE} /var/lib/reconnectd/marker"
    )
    box.container.sh("echo kept >/var/lib/reconnectd/marker")
    before = box.container.sh(kept).stdout

    # A version that ships one more module...
    commit_upstream(box, f"echo 'PROBE = 1' >{STALE_MODULE}", "a module")
    first = box.as_pi(UPGRADE)
    assert "kept the existing config" in first.stdout
    assert "installing python3-venv" not in first.stdout, "it is there now"
    box.container.sh(f"test -f {SITE}/{STALE_MODULE}")

    # ...then one without it, and a new version string, with the same package version.
    pid = box.main_pid()
    mark = box.mark()
    commit_upstream(
        box,
        f"git rm -q {STALE_MODULE}\n"
        "sed -i 's/^__version__ = .*/__version__ = \"0.1.0+upgraded\"/' reconnectd/__init__.py",
        "without the module",
    )
    second = box.as_pi(UPGRADE)
    assert "install: upgraded; see: systemctl status reconnectd" in second.stdout
    gone = box.container.sh(f"ls {SITE}/{STALE_MODULE}", check=False)
    assert gone.returncode != 0, "the deleted module survived the upgrade"
    version = box.container.run("reconnectd", "--version").stdout.strip()
    assert version == "reconnectd 0.1.0+upgraded"
    # The service was restarted onto the new code, and found its config.
    assert box.main_pid() != pid
    box.wait(
        "the new version's start line",
        lambda: "reconnectd 0.1.0+upgraded: config" in box.journal(mark),
    )
    box.wait_for_status("mk3s: operational")
    assert box.container.sh(kept).stdout == before
    assert box.as_pi("cd ~/reconnectd && git status --ignored --porcelain").stdout == ""


def test_uninstall_removes_the_service_and_keeps_config_and_state(box: Box) -> None:
    done = box.as_pi(UNINSTALL)
    assert "uninstall: kept /etc/reconnectd (config and keys)" in done.stdout
    assert "uninstall: kept /var/lib/reconnectd (holds)" in done.stdout
    unit = box.systemctl("list-unit-files", "reconnectd.service", check=False).stdout
    assert "0 unit files listed." in unit
    assert box.systemctl("is-active", "reconnectd", check=False).stdout.strip() == "inactive"
    assert box.container.run("pgrep", "-u", "reconnectd", check=False).returncode == 1
    for path in ("/opt/reconnectd", "/usr/local/bin/reconnectd"):
        assert box.container.run("test", "-e", path, check=False).returncode == 1, path
    box.container.run("test", "-f", CONFIG)
    box.container.run("test", "-f", KEY_FILE)
    box.container.run("test", "-f", "/var/lib/reconnectd/marker")
    again = box.as_pi(UNINSTALL)
    assert "uninstall: nothing left to remove" in again.stdout


def test_uninstall_purge_removes_config_state_and_user(box: Box) -> None:
    done = box.as_pi(f"{UNINSTALL} --purge")
    assert "removed the user reconnectd" in done.stdout
    for path in ("/etc/reconnectd", "/var/lib/reconnectd"):
        assert box.container.run("test", "-e", path, check=False).returncode == 1, path
    assert box.container.run("getent", "passwd", "reconnectd", check=False).returncode == 2
    assert box.container.run("getent", "group", "reconnectd", check=False).returncode == 2
    again = box.as_pi(f"{UNINSTALL} --purge")
    assert "uninstall: nothing left to remove" in again.stdout


# --- the tests, on the system's own Python ---------------------------------------------


def test_the_unit_tests_run_with_the_systems_own_python(box: Box) -> None:
    """A stock Debian or Raspberry Pi OS has no pyenv, only /usr/bin/python3: the unit
    tests run on it (tests/bootstrap skips the legs of the matrix it lacks)."""
    path = box.as_pi("command -v python3; echo $PATH").stdout.split()
    assert path[0] == "/usr/bin/python3" and ".pyenv" not in path[1], path
    done = box.as_pi(
        "cd ~/reconnectd && python3 -m venv ~/unit-venv"
        " && ~/unit-venv/bin/pip install -q --disable-pip-version-check -e . pytest hypothesis"
        " && ~/unit-venv/bin/pytest -q -p no:cacheprovider tests/test_core.py"
        " tests/test_core_klipper.py tests/test_model.py tests/test_hold_store.py"
        " tests/test_config.py",
        check=False,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"\d+ passed", done.stdout), done.stdout[-500:]
    base = box.as_pi("~/unit-venv/bin/python -c 'import sys; print(sys.base_prefix)'")
    assert base.stdout.strip() == "/usr", "the venv stands on Debian's own Python"
