"""A real systemd as PID 1, booted with systemd-nspawn over this machine's own userland.

The test machines run no systemd (PID 1 is something else), yet reconnectd is a
systemd service first: `systemctl reload`, `systemctl status` and `journalctl` are
how its users meet it. :class:`Container` boots the host's own systemd 252 as PID 1
of a container (about a second) whose root is an overlay: the host's ``/`` read-only
below, a tmpfs above, so whatever the tests do inside (installing, removing
packages, adding users) never reaches the host's disk.

What the container leaves behind on the host is exactly what :class:`Container`
removes in :meth:`Container.close`: the two mounts, the cgroups systemd-nspawn made,
and its entries in ``/run/systemd/nspawn``. :func:`host_state`, taken before and
after, and :meth:`HostState.changes` let a fixture prove it.

Recipe and measurements: ``shared/notes/testing-recipes.md`` §4.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.support.cache import cache_dir

# Inside the container: a clean environment, as a login would give, so nothing of
# the test run's own (a pyenv PATH, PIP_* variables, PYTHONPATH) leaks into what
# the commands see.
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
BASE_ENV = {
    "PATH": PATH,
    "LANG": "C.UTF-8",
    "TERM": "dumb",
    # Plain text: no colours, no pager, no ellipsis ("…") in what systemctl prints.
    "SYSTEMD_COLORS": "0",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_URLIFY": "0",
    "COLUMNS": "500",
}
CGROUP_ROOT = Path("/sys/fs/cgroup")
RUN_NSPAWN = Path("/run/systemd/nspawn")
# What a machine needs of the host, besides root: the names are what the skip says.
NEEDED_COMMANDS = ("mount", "umount", "nsenter", "git", "sudo", "runuser")


def nspawn_path() -> Path:
    """Return where tests/bootstrap unpacks systemd-nspawn (``$SYSTEMD_NSPAWN`` overrides).

    It is Debian's systemd-container at exactly the installed systemd's version,
    unpacked into the test cache: installing the package could upgrade the host's
    systemd, and one of another version may not run against its libsystemd-shared.
    """
    override = os.environ.get("SYSTEMD_NSPAWN")
    if override:
        return Path(override)
    cache = cache_dir()
    version = _systemd_version() or "unknown"
    return cache / f"systemd-container-{version}" / "usr" / "bin" / "systemd-nspawn"


def _systemd_version() -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    done = subprocess.run(
        ["dpkg-query", "-W", "-f=${Version}", "systemd"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def unavailable_reason() -> str | None:
    """Return why a container cannot be booted here, or None when it can."""
    if not os.path.isdir("/proc/self/ns"):
        return "not Linux: systemd-nspawn needs Linux namespaces"
    if os.geteuid() != 0:
        return "not root: booting a container takes mounts, namespaces and cgroups"
    if os.path.isdir("/run/systemd/system"):
        # Its cgroup tree belongs to the host's systemd, which these tests would
        # have to ask for a delegated scope; they are written for the machines the
        # suite runs on, which have none.
        return "systemd runs this machine: the container tests are for hosts without it"
    nspawn = nspawn_path()
    if not os.access(nspawn, os.X_OK):
        return f"no systemd-nspawn at {nspawn} (tests/bootstrap unpacks systemd-container there)"
    if not os.access("/lib/systemd/systemd", os.X_OK):
        return "no /lib/systemd/systemd to boot (Debian's systemd package)"
    missing = [name for name in NEEDED_COMMANDS if shutil.which(name) is None]
    if missing:
        return f"missing commands: {', '.join(missing)} (tests/bootstrap installs them)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlayfs (the container's root is an overlay over /)"
    if _cgroup2_mount() is None:
        return "no cgroup2 hierarchy mounted (the container runs systemd on cgroup v2)"
    return None


@dataclass(frozen=True)
class HostState:
    """What booting a container could change on the host, as plain sets of text."""

    mounts: frozenset[str]
    cgroups: frozenset[str]
    run_nspawn: frozenset[str]

    def changes(self, after: HostState) -> list[str]:
        """Given a later state, return one line per thing that differs, or []."""
        lines: list[str] = []
        for name, old, new in (
            ("mount", self.mounts, after.mounts),
            ("cgroup", self.cgroups, after.cgroups),
            ("/run/systemd/nspawn entry", self.run_nspawn, after.run_nspawn),
        ):
            lines += [f"{name} left behind: {item}" for item in sorted(new - old)]
            lines += [f"{name} gone: {item}" for item in sorted(old - new)]
        return lines


def host_state() -> HostState:
    """Return the host's mounts, cgroups (in the hierarchies nspawn uses) and nspawn files."""
    mounts = frozenset(f"{point} ({fstype})" for point, fstype, _ in _mount_table())
    cgroups: set[str] = set()
    for hierarchy in _hierarchies():
        for directory, _, _ in os.walk(hierarchy):
            cgroups.add(directory)
    run_nspawn: set[str] = set()
    if RUN_NSPAWN.exists():
        run_nspawn.add(str(RUN_NSPAWN))
        run_nspawn.update(str(path) for path in RUN_NSPAWN.rglob("*"))
    return HostState(mounts, frozenset(cgroups), frozenset(run_nspawn))


def _mount_table() -> list[tuple[str, str, list[str]]]:
    """Return (mount point, file system type, super options) of each mount."""
    table = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        before, after = line.split(" - ", 1)
        fstype, _source, options = after.split()[:3]
        table.append((before.split()[4], fstype, options.split(",")))
    return table


def _cgroup2_mount() -> str | None:
    for point, fstype, _ in _mount_table():
        if fstype == "cgroup2" and point.startswith(str(CGROUP_ROOT)):
            return point
    return None


def _hierarchies() -> list[str]:
    """Return the hierarchies nspawn makes its cgroups in: cgroup2, and on a hybrid
    host also systemd's own named v1 hierarchy (name=systemd)."""
    found = []
    for point, fstype, options in _mount_table():
        if not point.startswith(str(CGROUP_ROOT)):
            continue
        if fstype == "cgroup2" or (fstype == "cgroup" and "name=systemd" in options):
            found.append(point)
    return found


def _own_cgroup(hierarchy: str) -> str:
    """Given a hierarchy's mount point, return this process's cgroup directory in it."""
    v2 = _cgroup2_mount() == hierarchy
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if (v2 and number == "0") or (not v2 and "name=systemd" in controllers.split(",")):
            return hierarchy + path.rstrip("/")
    return hierarchy


class ContainerError(RuntimeError):
    """The container did not boot, or a command in it failed."""


class Container:
    """A booted systemd-nspawn container; run commands in it with :meth:`run`.

    ``binds`` are host directories made visible at the same path inside, read-only
    (a checkout under /tmp is hidden otherwise: nspawn mounts a fresh /tmp).
    Boots in the constructor; :meth:`close` powers it off and removes every trace
    on the host, and is safe to call on a half-booted container.
    """

    def __init__(self, binds: Sequence[Path] = (), *, boot_timeout: float = 60) -> None:
        self.name = f"reconnectd-test-{uuid.uuid4().hex[:8]}"
        self._nspawn: subprocess.Popen[bytes] | None = None
        self._base: Path | None = None
        self._mounted: list[Path] = []
        self._cgroups: list[Path] = []
        self._lock: Path | None = None
        self._run_nspawn_existed = RUN_NSPAWN.exists()
        self.console = Path(tempfile.mkstemp(prefix=f"{self.name}-", suffix=".console")[1])
        self.pid1 = 0
        try:
            self._boot(binds, boot_timeout)
        except BaseException:
            self.close()
            raise

    # --- booting ---------------------------------------------------------------

    def _boot(self, binds: Sequence[Path], timeout: float) -> None:
        # A tmpfs of its own for the overlay's upper and work directories:
        # overlayfs refuses an upper directory inside its lower layer (here /).
        self._base = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
        _command(["mount", "-t", "tmpfs", "-o", "mode=0755", self.name, str(self._base)])
        self._mounted.append(self._base)
        for part in ("upper", "work", "root"):
            (self._base / part).mkdir()
        root = self._base / "root"
        options = f"lowerdir=/,upperdir={self._base}/upper,workdir={self._base}/work"
        _command(["mount", "-t", "overlay", "-o", options, f"{self.name}-root", str(root)])
        self._mounted.append(root)
        # nspawn locks the image by its device and inode; a killed nspawn leaves the
        # lock file behind.
        image = root.stat()
        self._lock = RUN_NSPAWN / "locks" / f"inode-{image.st_dev}:{image.st_ino}"
        self._prepare(root)
        procs = self._make_cgroups()
        arguments = [
            str(nspawn_path()),
            "--quiet",
            f"--directory={root}",
            f"--machine={self.name}",
            "--boot",
            # No machined on the host to register with, and no systemd unit to
            # create: nspawn stays in the cgroup it was started in (see below).
            "--register=no",
            "--keep-unit",
            # The journal stays in the container (on the overlay's tmpfs).
            "--link-journal=no",
            "--console=read-only",
            # Without them systemd inside cannot attach the cgroup device programs
            # that DevicePolicy= needs, and would not enforce it (silently).
            "--capability=CAP_BPF",
            "--system-call-filter=bpf",
            *(f"--bind-ro={path}" for path in binds),
        ]
        # nspawn makes its payload and supervisor cgroups below the one it runs in:
        # a cgroup of its own keeps two runs (or another program's cgroups) apart,
        # and removing it removes all of them.
        wrapper = 'for procs in $CGROUP_PROCS; do echo $$ >"$procs"; done; exec "$@"'
        env = {
            "PATH": PATH,
            "LANG": "C.UTF-8",
            # Pure cgroup v2 inside, as on Raspberry Pi OS bookworm, whatever the host.
            "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY": "1",
            "CGROUP_PROCS": " ".join(str(p / "cgroup.procs") for p in procs),
        }
        with self.console.open("wb") as console:
            self._nspawn = subprocess.Popen(
                ["sh", "-c", wrapper, "sh", *arguments],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                # Not in the test run's process group: a Ctrl-C reaches pytest,
                # whose teardown then powers the container off in order.
                start_new_session=True,
            )
        self.pid1 = self._find_pid1(procs[0], time.monotonic() + timeout)
        deadline = time.monotonic() + timeout
        while True:
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout=timeout
            )
            if state.stdout.strip() in ("running", "degraded"):
                return
            if time.monotonic() > deadline or self._nspawn.poll() is not None:
                raise ContainerError(
                    f"systemd did not finish booting: {state.stdout.strip()}\n{self.console_tail()}"
                )
            time.sleep(0.2)

    def _prepare(self, root: Path) -> None:
        """Given the overlay's root, make it a machine of its own before it boots."""
        # Its own identity: the host's machine-id would be shared with it.
        (root / "etc/machine-id").write_text(uuid.uuid4().hex + "\n")
        (root / "etc/hostname").write_text(self.name + "\n")
        # sudo looks its host name up and complains on every call otherwise.
        hosts = root / "etc/hosts"
        hosts.write_text(hosts.read_text() + f"127.0.1.1\t{self.name}\n")
        # The host's enabled services (a database, timers running apt) are not what
        # is tested, and the container shares the host's network: a database
        # started in it would take the host's port.
        wants = Path("/etc/systemd/system").glob("*.wants/*")
        for unit in sorted({path.name for path in wants}):
            mask = root / "etc/systemd/system" / unit
            with contextlib.suppress(FileNotFoundError):
                mask.unlink()
            mask.symlink_to("/dev/null")
        # A reconnectd installed on the host (by hand, outside any container) would
        # make this a second install: the container starts as a machine without it.
        for leftover in (
            "opt/reconnectd",
            "etc/reconnectd",
            "var/lib/reconnectd",
            "usr/local/bin/reconnectd",
            "etc/systemd/system/reconnectd.service",
            "etc/systemd/system/reconnectd.service.d",
            "etc/systemd/system/multi-user.target.wants/reconnectd.service",
        ):
            path = root / leftover
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
        for accounts in ("passwd", "group", "shadow", "gshadow"):
            path = root / "etc" / accounts
            if path.exists():
                lines = path.read_text().splitlines(keepends=True)
                kept = [line for line in lines if line.split(":", 1)[0] != "reconnectd"]
                if kept != lines:
                    path.write_text("".join(kept))

    def _make_cgroups(self) -> list[Path]:
        """Make this container's own cgroup in each hierarchy; return them, cgroup2 first."""
        hierarchies = sorted(_hierarchies(), key=lambda h: h != _cgroup2_mount())
        for hierarchy in hierarchies:
            cgroup = Path(_own_cgroup(hierarchy)) / self.name
            cgroup.mkdir()
            self._cgroups.append(cgroup)
        return list(self._cgroups)

    def _find_pid1(self, cgroup: Path, deadline: float) -> int:
        """Given the container's cgroup2 directory, return the host pid of its PID 1."""
        assert self._nspawn is not None
        while time.monotonic() < deadline:
            for procs in sorted(cgroup.glob("payload/**/cgroup.procs")):
                for pid in _read_pids(procs):
                    inside = _namespace_pids(pid)
                    if len(inside) > 1 and inside[-1] == "1":
                        return pid
            if self._nspawn.poll() is not None:
                break
            time.sleep(0.05)
        raise ContainerError(f"the container's PID 1 did not appear\n{self.console_tail()}")

    # --- using it ------------------------------------------------------------------

    def run(
        self,
        *command: str,
        user: str | None = None,
        input: str | None = None,
        timeout: float = 120,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Given a command, run it inside (as root, or as ``user`` without a login)
        and return what it did; raise ContainerError if ``check`` and it failed."""
        home = "/root" if user is None else f"/home/{user}"
        environment = {**BASE_ENV, "HOME": home}
        inner = [*(f"{k}={v}" for k, v in environment.items()), *command]
        if user is not None:
            # runuser -u: no PAM session (pam_systemd would start a user manager).
            inner = ["runuser", "-u", user, "--", "env", "-i", *inner]
        else:
            inner = ["env", "-i", *inner]
        nsenter = ["nsenter", f"--target={self.pid1}", "--mount", "--uts", "--ipc", "--net"]
        nsenter += ["--pid", "--cgroup", "--root", "--wd"]
        done = subprocess.run(
            [*nsenter, *inner],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd="/",
        )
        if check and done.returncode != 0:
            raise ContainerError(
                f"{' '.join(command)} exited {done.returncode}\n"
                f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
            )
        return done

    def sh(
        self, script: str, *, user: str | None = None, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Given a bash script, run it inside as :meth:`run` runs a command."""
        return self.run(
            "bash", "-euo", "pipefail", "-c", script, user=user, timeout=timeout, check=check
        )

    def write(self, path: str, text: str, mode: int = 0o644, group: str = "root") -> None:
        """Given a path inside, write a file there, owned by root and ``group``."""
        self.run("install", "-m", f"{mode:o}", "-g", group, "/dev/stdin", path, input=text)

    @property
    def nspawn_pid(self) -> int:
        """The host pid of systemd-nspawn (0 once it is gone)."""
        return 0 if self._nspawn is None else self._nspawn.pid

    def console_tail(self, lines: int = 30) -> str:
        """Return the end of what the container printed on its console."""
        try:
            text = self.console.read_text(errors="replace")
        except OSError:
            return ""
        return "console:\n" + "\n".join(text.splitlines()[-lines:])

    # --- tearing down ----------------------------------------------------------------

    def close(self, timeout: float = 30) -> None:
        """Power the container off and remove every trace of it on the host.

        In order: ask nspawn to power off (SIGTERM, which it hands to systemd),
        kill whatever is left by cgroup, then remove the cgroups, unmount the
        overlay and the tmpfs, and remove nspawn's files. Every step runs even
        when one before it failed; the first failure is raised at the end.
        """
        errors: list[str] = []
        nspawn = self._nspawn
        if nspawn is not None and nspawn.poll() is None:
            nspawn.send_signal(signal.SIGTERM)
            try:
                nspawn.wait(timeout)
            except subprocess.TimeoutExpired:
                errors.append(f"did not power off in {timeout} s; killed")
        # cgroup2 first: its cgroup.kill ends every process at once, in every hierarchy.
        for cgroup in self._cgroups:
            try:
                _empty_cgroup(cgroup, timeout)
                _remove_cgroup(cgroup)
            except OSError as error:
                errors.append(f"cgroup {cgroup}: {error}")
        if nspawn is not None and nspawn.poll() is None:
            nspawn.kill()
        if nspawn is not None:
            nspawn.wait(timeout)
        for mount in reversed(self._mounted):
            done = _umount(mount)
            if done:
                errors.append(done)
        self._mounted.clear()
        if self._base is not None:
            with contextlib.suppress(OSError):
                self._base.rmdir()
        self._remove_run_nspawn()
        with contextlib.suppress(OSError):
            self.console.unlink()
        self._cgroups.clear()
        self._nspawn = None
        if errors:
            raise ContainerError("; ".join(errors))

    def _remove_run_nspawn(self) -> None:
        """Remove what nspawn left in /run/systemd/nspawn for this machine.

        nspawn removes its propagation directory itself only where /run is a tmpfs
        ("Attempted to remove disk file system ... and we can't allow that"); the
        directories it made, empty once it is gone, go if none were there before.
        """
        for leftover in RUN_NSPAWN.glob(f"*/{self.name}"):
            shutil.rmtree(leftover, ignore_errors=True)
        if self._lock is not None:
            with contextlib.suppress(FileNotFoundError):
                self._lock.unlink()
        if self._run_nspawn_existed:
            return
        for directory in [*sorted(RUN_NSPAWN.rglob("*"), reverse=True), RUN_NSPAWN]:
            with contextlib.suppress(OSError):
                directory.rmdir()  # only ever an empty one: another run's stays

    def __enter__(self) -> Container:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _command(arguments: list[str]) -> None:
    done = subprocess.run(arguments, capture_output=True, text=True, timeout=60, check=False)
    if done.returncode != 0:
        raise ContainerError(f"{' '.join(arguments)}: {done.stderr.strip()}")


def _read_pids(procs: Path) -> list[int]:
    try:
        return [int(line) for line in procs.read_text().split()]
    except (OSError, ValueError):
        return []


def _namespace_pids(pid: int) -> list[str]:
    """Given a pid, return its pids from the host's namespace inward (NSpid)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return []
    for line in status.splitlines():
        if line.startswith("NSpid:"):
            return line.split()[1:]
    return []


def _walk_up(cgroup: Path) -> Iterable[Path]:
    """Given a cgroup, return it and every cgroup below it, deepest first."""
    below = [Path(d) for d, _, _ in os.walk(cgroup)]
    return sorted(below, key=lambda p: len(p.parts), reverse=True)


def _empty_cgroup(cgroup: Path, timeout: float) -> None:
    """Given a cgroup, kill every process in it and below; return once none is left."""
    if not cgroup.exists():
        return
    deadline = time.monotonic() + timeout
    while True:
        pids = [pid for path in _walk_up(cgroup) for pid in _read_pids(path / "cgroup.procs")]
        if not pids:
            return
        if time.monotonic() > deadline:
            raise OSError(f"processes {pids} did not end")
        kill = cgroup / "cgroup.kill"
        if kill.exists():
            kill.write_text("1")
        else:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


def _remove_cgroup(cgroup: Path) -> None:
    """Given an empty cgroup, remove it and every cgroup below it."""
    if not cgroup.exists():
        return
    for path in _walk_up(cgroup):
        # A cgroup is released a moment after its last process exits.
        for _ in range(100):
            try:
                path.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.02)
        else:
            path.rmdir()


def _umount(path: Path) -> str | None:
    """Given a mount point, unmount it; return a problem, or None."""
    for _ in range(50):
        done = subprocess.run(
            ["umount", str(path)], capture_output=True, text=True, timeout=60, check=False
        )
        if done.returncode == 0 or not os.path.ismount(path):
            return None
        time.sleep(0.1)
    # Still busy: detach it, so the host is clean even if something holds it.
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=60, check=False)
    return f"{path} was busy; detached it (umount --lazy): {done.stderr.strip()}"
