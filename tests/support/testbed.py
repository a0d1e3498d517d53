"""A bench of simulated USB serial devices for tests: real libudev, real ptys.

:class:`Testbed` starts ``testbed_owner.py`` under Debian's ``/usr/bin/python3``
and the umockdev preload, and talks to it over a socketpair; the test process
needs neither ``gi`` nor the preload. Programs under test see the bench only
when started *after* it, with :attr:`Testbed.env` as their environment.

Each plugged device is a pty: the program under test opens ``/dev/ttyACM0``
(or a by-id link) as usual, and the test plays the firmware on
:attr:`Plugged.master_fd`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from tests.support import close_guard

OWNER_PYTHON = "/usr/bin/python3"
OWNER_SCRIPT = Path(__file__).with_name("testbed_owner.py")
PRELOAD = "libumockdev-preload.so.0"
TIMEOUT = 10.0
MAX_MESSAGE = 65536


class TestbedError(RuntimeError):
    """The testbed owner failed, died or stopped answering."""

    __test__ = False  # not a pytest test class, despite the name


def unavailable_reason() -> str | None:
    """Given this machine, return why a testbed cannot run here, or None if it can."""
    if not os.path.exists(OWNER_PYTHON):
        return f"{OWNER_PYTHON} is missing"
    probe = subprocess.run(
        [OWNER_PYTHON, "-c", "import gi; gi.require_version('UMockdev', '1.0')"],
        capture_output=True,
        text=True,
        check=False,
    )
    if probe.returncode != 0:
        return "needs python3-gi and gir1.2-umockdev-1.0: " + probe.stderr.strip()[-200:]
    preload = subprocess.run(
        ["sh", "-c", f"ldconfig -p | grep -q {PRELOAD}"], capture_output=True, check=False
    )
    if preload.returncode != 0:
        return f"{PRELOAD} not found (install umockdev)"
    return close_guard.unavailable_reason()


class _MasterFd:
    """One pty master fd handed to the test, closed at most once."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._closed = False
        self._lock = threading.Lock()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            # Marked first: even if close() fails, the number may be reused.
            self._closed = True
        os.close(self.fd)

    def forget(self) -> None:
        with self._lock:
            self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed


@dataclass(frozen=True)
class Plugged:
    """A device plugged into the bench, as udev describes it.

    ``master_fd`` is the firmware's end of the pty and belongs to the test.
    Close it with :meth:`close_master` (or let :meth:`Testbed.unplug` do it),
    never with ``os.close``: the bench would not know, and might later close
    whatever else got that fd number.
    """

    kind: str
    node: str
    devpath: str
    tty: str
    by_id: str | None
    by_path: str
    usb_path: str
    vendor_id: str
    product_id: str
    serial: str | None
    busnum: int
    devnum: int
    usec_initialized: str
    master_fd: int
    _master: _MasterFd = field(repr=False, compare=False)

    @property
    def master_closed(self) -> bool:
        """Given this device, return whether its master fd has been closed."""
        return self._master.closed

    def close_master(self) -> None:
        """Given this device, close its pty master once; later calls do nothing."""
        self._master.close()


class Testbed:
    """A umockdev testbed owned by a helper process; use as a context manager.

    ``env`` is a complete environment (a copy of ``os.environ`` plus
    ``LD_PRELOAD`` and ``UMOCKDEV_DIR``) for the processes that must see the
    bench; start them after the bench exists.
    """

    __test__ = False

    def __init__(self, workdir: Path, *, timeout: float = TIMEOUT) -> None:
        self.workdir = Path(workdir)
        self.timeout = timeout
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / "testbed-owner.log"
        self._plugged: dict[str, Plugged] = {}
        self._lock = threading.Lock()
        # A copy beside the bench, readable by all: a program under test that runs as a
        # service user must load it too, and the cache is under root's home.
        guard = str(self.workdir / "close-guard.so")
        shutil.copyfile(close_guard.close_guard_library(), guard)
        os.chmod(guard, 0o644)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        owner_env = {k: v for k, v in os.environ.items() if k != "UMOCKDEV_DIR"}
        owner_env["LD_PRELOAD"] = _with_preload(os.environ.get("LD_PRELOAD"), guard)
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(
                [OWNER_PYTHON, str(OWNER_SCRIPT), str(theirs.fileno())],
                pass_fds=[theirs.fileno()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=owner_env,
            )
        theirs.close()
        self._channel = ours
        try:
            hello, _ = self._receive()
        except BaseException:
            self._stop_owner()
            raise
        self.root = Path(str(hello["root"]))
        self.env: dict[str, str] = dict(os.environ)
        self.env["LD_PRELOAD"] = _with_preload(os.environ.get("LD_PRELOAD"), guard)
        self.env["UMOCKDEV_DIR"] = str(self.root)

    def __enter__(self) -> Testbed:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def plug(
        self,
        kind: str,
        *,
        serial: str | None = None,
        usb_port: str = "1-1",
        tty: str | None = None,
    ) -> Plugged:
        """Given a kind of device, plug one in and return it; raise TestbedError if refused.

        ``kind`` is ``prusa_mk3``, ``ch340``, ``ftdi``, ``mega2560``, ``klipper`` or ``gps``;
        ``serial`` replaces the kind's serial number; ``usb_port`` is the hub
        port (``"1-2"``, or ``"1-1.3"`` behind a hub), one device per port.
        Without ``tty`` the node gets a name never used on this bench
        (``ttyACM0``, then ``ttyACM1``...), as the kernel does while the old node
        is still held open; ``tty="ttyACM0"`` reuses a name that is free again,
        as it does once the old one was released. The udev ``add`` events are
        sent by the time this returns.
        """
        request: dict[str, Any] = {"op": "plug", "kind": kind, "usb_port": usb_port}
        if serial is not None:
            request["serial"] = serial
        if tty is not None:
            request["tty"] = tty
        answer, fds = self._call(request)
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise TestbedError(f"plug {kind}: expected one pty master, got {len(fds)} fds")
        master = _MasterFd(fds[0])
        plugged = Plugged(
            kind=str(answer["kind"]),
            node=str(answer["node"]),
            devpath=str(answer["devpath"]),
            tty=str(answer["tty"]),
            by_id=answer["by_id"],
            by_path=str(answer["by_path"]),
            usb_path=str(answer["usb_path"]),
            vendor_id=str(answer["vendor_id"]),
            product_id=str(answer["product_id"]),
            serial=answer["serial"],
            busnum=int(answer["busnum"]),
            devnum=int(answer["devnum"]),
            usec_initialized=str(answer["usec_initialized"]),
            master_fd=master.fd,
            _master=master,
        )
        self._plugged[plugged.devpath] = plugged
        return plugged

    def unplug(self, plugged: Plugged, *, close_master: bool = True) -> None:
        """Given a plugged device, pull it out; raise TestbedError if it is not plugged.

        Whoever holds the port sees EIO/hang-up only once every copy of the pty
        master is closed: the bench closes its own, and by default this closes
        the test's ``master_fd`` too (unless :meth:`Plugged.close_master` already
        did). Pass ``close_master=False`` only if the test closed ``master_fd``
        itself with ``os.close``; the fd is then never touched again. Then the
        ``remove`` uevents are sent (tty first, USB device last, while sysfs
        still exists), and the sysfs tree, node and links disappear.
        """
        if close_master:
            plugged.close_master()
        else:
            plugged._master.forget()
        self._call({"op": "unplug", "devpath": plugged.devpath})
        self._plugged.pop(plugged.devpath, None)

    def send_uevent(self, plugged: Plugged, action: str) -> None:
        """Given a plugged device and an action (``change``, ``add``...), send that uevent."""
        self._call({"op": "uevent", "devpath": plugged.devpath, "action": action})

    def add_record(self, record: str) -> None:
        """Given devices in umockdev-record format, parents first, add them as they are.

        For what ``plug`` does not make: virtual ttys, ttys with no node, platform
        UARTs. No pty, node or link is made; raise TestbedError if a device exists.
        """
        self._call({"op": "add_record", "record": record})

    @property
    def owner_pid(self) -> int:
        """Given a bench, return the pid of the process that owns the testbed."""
        return int(self._process.pid)

    def close(self) -> None:
        """Given a bench, stop its owner, close the masters still open and remove its files."""
        if self._process.poll() is None:
            with contextlib.suppress(TestbedError):
                self._call({"op": "close"})
        self._stop_owner()
        for plugged in self._plugged.values():
            plugged.close_master()
        self._plugged.clear()
        self._channel.close()
        root = getattr(self, "root", None)
        if root is not None and root.is_dir():
            shutil.rmtree(root, ignore_errors=True)

    def _stop_owner(self) -> None:
        try:
            self._process.wait(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()

    def _call(self, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
        with self._lock:
            if self._process.poll() is not None:
                raise self._died(f"cannot {request['op']}")
            try:
                self._channel.sendall(json.dumps(request).encode())
            except OSError as e:
                raise self._died(f"cannot send {request['op']} ({e})") from e
            answer, fds = self._receive()
        if not answer.get("ok"):
            for fd in fds:
                os.close(fd)
            raise TestbedError(f"{request['op']}: {answer.get('error')}")
        return answer, fds

    def _receive(self) -> tuple[dict[str, Any], list[int]]:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TestbedError(
                    f"testbed owner gave no answer within {self.timeout:g} s; "
                    f"log {self.log_path}:\n{self._log_tail()}"
                )
            readable, _, _ = select.select([self._channel], [], [], left)
            if readable:
                break
        try:
            data, fds, _, _ = socket.recv_fds(self._channel, MAX_MESSAGE, 4)
        except OSError as e:
            raise self._died(f"connection lost ({e})") from e
        if not data:
            for fd in fds:
                os.close(fd)
            raise self._died("connection closed")
        return json.loads(data), list(fds)

    def _died(self, what: str) -> TestbedError:
        try:
            code = self._process.wait(timeout=1)
        except subprocess.TimeoutExpired:
            code = None
        state = "is hanging" if code is None else f"exited with code {code}"
        return TestbedError(
            f"testbed owner {state}: {what}; log {self.log_path}:\n{self._log_tail()}"
        )

    def _log_tail(self) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return text[-2000:]


# -- a testbed's tree on a tmpfs ----------------------------------------------------
#
# umockdev makes its tree under $TMPDIR. On this machine's disk (ext4) removing and
# adding a device takes several ms (16 replugs 0.6 to 2 s), on a tmpfs well under
# 1 ms. /dev/shm will not do: under /dev, the preload takes the tree's own files for
# device nodes (the owner aborts with "fd_map_add(): overflow"), and through a
# symlink libudev's resolved paths leave the tree (no device is found). So a tmpfs
# is mounted for the run, which needs root.


def mount_tmpfs(prefix: str, size: str) -> str | None:
    """Given a name prefix and a size (``"64m"``), mount a tmpfs on a new directory in
    /tmp and return it; None where mounting is refused (not root, no ``mount``)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    # A short path: the preload's emulated netlink socket lives in the testbed tree,
    # and a socket's path may not be longer than 107 bytes.
    path = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        os.rmdir(path)
        return None
    return path


def unmount_tmpfs(path: str) -> None:
    """Given a directory from :func:`mount_tmpfs`, unmount it and remove it."""
    done = subprocess.run(["umount", path], capture_output=True, check=False)
    if done.returncode != 0:  # something still holds a file there: detach it anyway
        subprocess.run(["umount", "-l", path], capture_output=True, check=False)
    os.rmdir(path)


def open_testbed(workdir: Path, tmpdir: str | None) -> Testbed:
    """Given a directory for its log and maybe a tmpfs, return a testbed whose tree is
    made there. The programs under test get the caller's $TMPDIR back in ``env``."""
    saved = os.environ.get("TMPDIR")
    if tmpdir is not None:
        os.environ["TMPDIR"] = tmpdir
    try:
        testbed = Testbed(workdir)
    finally:
        if saved is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved
    if saved is None:
        testbed.env.pop("TMPDIR", None)
    else:
        testbed.env["TMPDIR"] = saved
    return testbed


def _with_preload(existing: str | None, guard: str) -> str:
    """Given a process's LD_PRELOAD and the close guard, return it with both, guard first.

    The guard must come before umockdev's preload: its wrappers run first and call on
    into umockdev's.
    """
    kept = [entry for entry in (existing or "").split() if entry not in (PRELOAD, guard)]
    return " ".join([guard, PRELOAD, *kept])


if __name__ == "__main__":
    # A quick manual check: python -m tests.support.testbed /tmp/bench
    with Testbed(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/testbed")) as bench:
        device = bench.plug("prusa_mk3")
        print(device)
        bench.unplug(device)
