"""The main loop: one thread, one selector, every deadline in one place.

The selector watches three file descriptors: the udev monitor, a socketpair that
signals are written to (``signal.set_wakeup_fd``), and the request workers' wake
socket. Deadlines (settle windows, retries, confirmation looks, the watchdog) set
the select timeout. Nothing here sleeps, and no other thread touches state.

What the loop does on each wake-up: route device events to the printer they
belong to, hand OctoPrint answers to the core that asked, run cores whose deadline
passed, execute the actions they return, then write the holds when they changed
(``hold_store``), and the status file and ``STATUS=`` when something changed and no
request is on its way (``status_publisher``).

Each of those steps is a public method (:meth:`Daemon.start`, :meth:`Daemon.on_udev`,
:meth:`Daemon.on_results`, :meth:`Daemon.after_select`), which :meth:`Daemon.run`
calls from its selector; tests/test_model.py calls them in whatever order the world
can produce, with a fake clock and workers whose answers it delivers when it likes.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, Union

from reconnectd import __version__, exit_codes
from reconnectd.boards import known_board
from reconnectd.config import (
    Config,
    ConfigError,
    MoonrakerConfig,
    OctoPrintConfig,
    PrinterConfig,
    load_config,
)
from reconnectd.core import (
    Action,
    Connect,
    CoreSettings,
    Disconnect,
    Log,
    PrinterCore,
    ReadHost,
    State,
)
from reconnectd.devices import Device, DeviceAdded, DeviceEvent, DeviceRemoved
from reconnectd.hold_store import HoldStore, Writer
from reconnectd.host import (
    CommandResult,
    HostClient,
    PluginChecked,
    ReadResult,
    Refused,
    Unreachable,
)
from reconnectd.jsonfiles import write_json_atomic
from reconnectd.matching import matching_printers
from reconnectd.static_nodes import SYS_ROOT, node_device
from reconnectd.status import state_dir, status_path, summary_line
from reconnectd.status_publisher import StatusPublisher, printer_rows
from reconnectd.urls import shown_url
from reconnectd.workers import Completed, Job, RequestWorkers

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
# A service we need (udev's netlink) is not there.
EXIT_UNAVAILABLE = exit_codes.UNAVAILABLE
# udevd's control socket: libudev's own test for "udevd is running".
UDEV_CONTROL = "/run/udev/control"


class DeviceSource(Protocol):
    """Where device events come from: ``udev.UdevWatcher`` in production."""

    def start(self) -> list[Device]: ...
    def fileno(self) -> int: ...
    def drain(self) -> list[DeviceEvent]: ...
    def close(self) -> None: ...


class Workers(Protocol):
    """Where requests run: ``workers.RequestWorkers`` in production.

    Requests with the same key (a printer's name) run one after another, in the
    order submitted; the daemon relies on that (see ``Daemon._apply_config``).
    """

    def fileno(self) -> int: ...
    def submit(self, key: str, owner: object, request: object, job: Job) -> None: ...
    def collect(self) -> list[Completed[object]]: ...
    def retire(self, key: str) -> None: ...
    def close(self) -> None: ...


class Notifier(Protocol):
    """The service manager: ``systemd.Notifier`` in production."""

    def ready(self, status: str) -> None: ...
    def status(self, text: str) -> None: ...
    def reloading(self) -> None: ...
    def stopping(self) -> None: ...
    def watchdog_ping(self) -> None: ...
    @property
    def watchdog_interval(self) -> float | None: ...


ApiFactory = Callable[[Union[OctoPrintConfig, MoonrakerConfig]], HostClient]


@dataclass
class _Printer:
    config: PrinterConfig
    core: PrinterCore
    api: HostClient
    devpath: str | None = None  # the device it owns now
    static: bool = False  # that device was found behind a static node, not by udev
    next_static_check: float | None = None
    # The settle window of the core this one replaced (a reload changed the config),
    # for the device it takes over: a reload must not cut a burst short (rule 2).
    settle_until: float | None = None
    # Zero config: present devices its core would not connect (not known as a printer).
    passed_over: set[str] = field(default_factory=set)


def settings_for(config: PrinterConfig, dry_run: bool) -> CoreSettings:
    """Given a printer's config, return what its decision core needs."""
    return CoreSettings(
        name=config.name,
        settle=config.settle,
        poll=config.poll,
        port=config.port,
        baudrate=config.baudrate,
        profile=config.profile,
        dry_run=dry_run,
        # Klipper's own USB id is Klipper's alone: no stick shares it.
        only_known_devices=config.known_boards and config.moonraker is None,
        host="Klippy" if config.moonraker is not None else "OctoPrint",
        # Klippy notices a lost MCU 4.5 to 5.5 s after it went (klipper-facts).
        recheck_after_return=10.0 if config.moonraker is not None else 5.0,
        stuck_after=config.stuck_after,
        retry_first=config.retry_first,
        retry_cap=config.retry_max,
    )


class Daemon:
    """reconnectd's long-running part. Create, then call :meth:`run` from the main thread."""

    def __init__(
        self,
        config: Config,
        *,
        source: DeviceSource,
        api_factory: ApiFactory,
        notifier: Notifier,
        reload_config: Callable[[], Config] | None = None,
        environ: Mapping[str, str] | None = None,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sys_root: str = SYS_ROOT,
        workers: Workers | None = None,
        write_state: Writer = write_json_atomic,
    ) -> None:
        env = os.environ if environ is None else environ
        self._config = config
        self._source = source
        self._api_factory = api_factory
        self._notifier = notifier
        self._reload_config = reload_config or (lambda: load_config(None, env))
        self._dry_run = dry_run
        self._sys_root = sys_root
        self._clock = clock
        self._wall_clock = wall_clock
        self._status = StatusPublisher(
            status_path(env), notifier, dry_run=dry_run, clock=clock, wall_clock=wall_clock
        )
        self._holds = HoldStore(state_file(env), write=write_state, wall_clock=wall_clock)
        self._printers: dict[str, _Printer] = {}
        self._present: dict[str, Device] = {}
        self._enumerated: set[str] = set()  # present devices found at start, not seen arrive
        self._workers: Workers = RequestWorkers() if workers is None else workers
        # select(), not epoll: its timeout is in microseconds, where epoll's is rounded
        # up to the millisecond, twice over by Python, so every deadline (a settle
        # window's end) came 1-2 ms late. Its limit, descriptors below 1024, is no
        # limit here: the three it watches are opened at start.
        self._selector = selectors.SelectSelector()
        self._signal_reader: socket.socket | None = None
        self._stop_requested = False
        self._reload_requested = False
        self._next_watchdog: float | None = None
        self._unmatched_warned: set[str] = set()
        self._plugins_checked: set[str] = set()  # OctoPrint URLs asked about reconnect plugins

    # --- the loop -------------------------------------------------------------

    def run(self) -> int:
        """Run until SIGTERM or SIGINT; return the exit code (0 for a clean stop)."""
        signal_reader, restore_signals = _route_signals_to_socket()
        self._signal_reader = signal_reader
        try:
            self._selector.register(signal_reader, selectors.EVENT_READ, self._on_signals)
            exit_code = self.start()
            if exit_code is not None:
                return exit_code
            while not self._stop_requested:
                for key, _ in self._selector.select(self._select_timeout()):
                    key.data()
                self.after_select()
            log.info("stopping on request")
            return 0
        finally:
            self._notifier.stopping()
            self.close()
            restore_signals()
            signal_reader.close()

    def start(self) -> int | None:
        """Listen, load what the last run stored, take stock of the present devices and
        say READY=1; return an exit code if the daemon cannot run, else None."""
        self._selector.register(self._workers.fileno(), selectors.EVENT_READ, self.on_results)
        try:
            present = self._source.start()
            self._selector.register(self._source.fileno(), selectors.EVENT_READ, self.on_udev)
        except OSError as error:
            if not _static_printers(self._config):
                log.error("cannot listen to udev for device events: %s", error)
                return EXIT_UNAVAILABLE
            log.warning(
                "cannot listen to udev for device events (%s): running on polling only",
                error,
            )
            present = []
        self._log_start()
        memory = self._holds.load()
        self._apply_config(self._config, memory)
        now = self._clock()
        for device in present:
            self._on_device_event(DeviceAdded(device, enumerated=True), now)
        self._check_static_nodes(now, at_start=True)
        self._after_wake()
        self._notifier.ready(self._summary())
        if self._notifier.watchdog_interval is not None:
            self._next_watchdog = self._clock()
        return None

    def request_reload(self) -> None:
        """Reload the config on the next :meth:`after_select` (what SIGHUP does)."""
        self._reload_requested = True

    def after_select(self) -> None:
        """After the selector's callbacks: reload if asked, run what is due, then store
        and publish what changed."""
        if self._reload_requested:
            self._reload_requested = False
            self._reload()
        self._run_due(self._clock())
        self._after_wake()

    @property
    def holds_unsaved(self) -> str | None:
        """Why the state file does not yet say what the cores remember, or None."""
        return self._holds.unsaved

    @property
    def printer_cores(self) -> dict[str, PrinterCore]:
        """Each printer's decision core, by name (for the status and the model)."""
        return {name: printer.core for name, printer in self._printers.items()}

    def next_deadline(self) -> float | None:
        """The monotonic time of the next thing the loop must do, or None."""
        deadlines = [p.core.deadline for p in self._printers.values()]
        deadlines += [p.next_static_check for p in self._printers.values()]
        deadlines += [self._next_watchdog, self._holds.retry_at]
        deadlines.append(self._status.deadline)
        pending = [d for d in deadlines if d is not None]
        return min(pending) if pending else None

    def _select_timeout(self) -> float | None:
        deadline = self.next_deadline()
        return None if deadline is None else max(0.0, deadline - self._clock())

    def _run_due(self, now: float) -> None:
        if self._next_watchdog is not None and now >= self._next_watchdog:
            # Pinged from the loop itself: a wedged loop stops the pings and systemd
            # restarts us, which a free-running thread would hide.
            self._notifier.watchdog_ping()
            interval = self._notifier.watchdog_interval
            self._next_watchdog = None if interval is None else now + interval
        self._check_static_nodes(now)
        for printer in list(self._printers.values()):
            deadline = printer.core.deadline
            if deadline is not None and deadline <= now:
                self._execute(printer, printer.core.tick(now))

    # --- inputs -----------------------------------------------------------------

    def _on_signals(self) -> None:
        assert self._signal_reader is not None
        for signum in _read_signals(self._signal_reader):
            if signum in (signal.SIGTERM, signal.SIGINT):
                log.info("received %s", signal.Signals(signum).name)
                self._stop_requested = True
            elif signum == signal.SIGHUP:
                self.request_reload()

    def on_udev(self) -> None:
        """Take the device events waiting at the source."""
        now = self._clock()
        for event in self._source.drain():
            self._on_device_event(event, now)

    def on_results(self) -> None:
        """Hand the requests' answers waiting at the workers to the cores that asked."""
        now = self._clock()
        for completed in self._workers.collect():
            if isinstance(completed.request, _PluginCheck):
                self._workers.retire(completed.key)
                if not isinstance(completed.result, list):
                    self._plugins_checked.discard(completed.request.url)  # a reload asks again
                _log_reconnect_plugins(shown_url(completed.request.url), completed.result)
                continue
            printer = self._printers.get(completed.key)
            if printer is None or printer.core is not completed.owner:
                continue  # the printer was removed or replaced by a reload, or a closing
            result: Any = completed.result
            if isinstance(result, BaseException):
                result = Unreachable(f"internal error: {result}")
            if isinstance(completed.request, ReadHost):
                actions = printer.core.host_read(result, now)
            else:
                actions = printer.core.command_done(result, now)
            self._execute(printer, actions)
            if printer.core.state == State.UNKNOWN_DEVICE:
                self._try_another_device(printer, now)

    def _on_device_event(self, event: DeviceEvent, now: float) -> None:
        if isinstance(event, DeviceRemoved):
            # Only the node a printer owns now counts: the old node's remove can reach
            # us after the new node's add when the cable moved to another USB port
            # (udev orders events only for related paths).
            self._present.pop(event.devpath, None)
            self._enumerated.discard(event.devpath)
            for candidate in self._printers.values():
                candidate.passed_over.discard(event.devpath)
            gone = self._owner_of(event.devpath)
            if gone is not None:
                gone.devpath = None
                gone.static = False
                self._execute(gone, gone.core.device_removed(now))
                successor = self._waiting_device(gone)
                if successor is not None:
                    log.info(
                        "%s: %s went; %s, which came meanwhile, is the printer now",
                        gone.config.name,
                        event.devpath.rsplit("/", 1)[-1],
                        successor.node,
                    )
                    self._on_device_event(DeviceAdded(successor), now)
            return
        device = event.device
        self._present[device.devpath] = device
        if event.enumerated:
            self._enumerated.add(device.devpath)
        else:
            self._enumerated.discard(device.devpath)
        printer = self._owner_of(device.devpath) or self._route(device, now)
        if printer is None:
            return
        printer.devpath = device.devpath
        settle_until, printer.settle_until = printer.settle_until, None
        self._execute(
            printer,
            printer.core.device_added(
                device, now, enumerated=event.enumerated, settle_until=settle_until
            ),
        )

    def _try_another_device(self, printer: _Printer, now: float) -> None:
        """Zero config: the core will not connect its device (nothing says it is the
        printer); give it the next present device that matches and was not passed over."""
        assert printer.devpath is not None
        printer.passed_over.add(printer.devpath)
        configs = [p.config for p in self._printers.values()]
        owned = {p.devpath for p in self._printers.values()}
        for device in self._present.values():
            if device.devpath in owned or device.devpath in printer.passed_over:
                continue
            claims = matching_printers(configs, device)
            if claims and claims[0].name == printer.config.name:
                self._switch_device(printer, device, now)
                return

    def _switch_device(self, printer: _Printer, device: Device, now: float) -> None:
        self._execute(printer, printer.core.let_go(now))
        printer.devpath = device.devpath
        enumerated = device.devpath in self._enumerated
        self._execute(printer, printer.core.device_added(device, now, enumerated=enumerated))

    def _waiting_device(self, printer: _Printer) -> Device | None:
        """Given a printer that just lost its device, return the newest present device
        that matches it and that no printer owns (it came while the old one was there)."""
        configs = [p.config for p in self._printers.values()]
        owned = {p.devpath for p in self._printers.values()}
        for device in reversed(list(self._present.values())):
            if device.devpath in owned:
                continue
            claims = matching_printers(configs, device)
            if claims and claims[0].name == printer.config.name:
                return device
        return None

    def _check_static_nodes(self, now: float, *, at_start: bool = False) -> None:
        """Look behind each polled printer's static node (``port``) in sysfs.

        No udev event comes for a node made with mknod in a container: presence is
        read from sysfs once per poll period, and changes become the same device
        events udev would have sent. A device that udev reports is left to udev.
        """
        for printer in list(self._printers.values()):
            port, poll = printer.config.port, printer.config.poll
            if port is None or poll <= 0:
                continue
            due = printer.next_static_check
            if not at_start and due is not None and now < due:
                continue
            printer.next_static_check = now + poll
            if printer.devpath is not None and not printer.static:
                continue
            device = node_device(port, self._sys_root)
            current = self._present.get(printer.devpath) if printer.devpath else None
            if current is not None and (device is None or device.instance != current.instance):
                self._on_device_event(DeviceRemoved(current.devpath), now)
                current = None
            if device is not None and current is None:
                self._on_device_event(DeviceAdded(device, enumerated=at_start), now)
                if printer.devpath == device.devpath:
                    printer.static = True

    def _owner_of(self, devpath: str) -> _Printer | None:
        for printer in self._printers.values():
            if printer.devpath == devpath:
                return printer
        return None

    def _route(self, device: Device, now: float) -> _Printer | None:
        configs = [p.config for p in self._printers.values()]
        claims = matching_printers(configs, device)
        if not claims:
            board = known_board(device.vendor_id, device.product_id)
            if board is not None and device.devpath not in self._unmatched_warned:
                self._unmatched_warned.add(device.devpath)
                log.warning(
                    "%s looks like a printer (%s, %s) but matches no [[printer]]; "
                    "`reconnectd devices` prints a stanza for it",
                    device.node,
                    device.usb_id,
                    board.name,
                )
            return None
        if len(claims) > 1:
            log.warning(
                "%s matches several printers: %s; it goes to %s — make the entries "
                "more specific (serial, port)",
                device.node,
                ", ".join(c.name for c in claims),
                claims[0].name,
            )
        printer = self._printers[claims[0].name]
        if printer.core.state == State.UNKNOWN_DEVICE and printer.devpath is not None:
            # Zero config: the device it has is not known as a printer; try this one.
            printer.passed_over.add(printer.devpath)
            self._execute(printer, printer.core.let_go(now))
            return printer
        if printer.devpath is not None and printer.devpath in self._present:
            # Also the first sign of a cable moved to another port: the old node's
            # remove may still be on its way, and then this device takes over.
            current = self._present[printer.devpath]
            log.warning(
                "%s: %s matches too, but the printer is already %s; ignoring %s while %s is there",
                printer.config.name,
                device.node,
                current.node,
                device.node,
                current.node,
            )
            return None
        return printer

    # --- actions ----------------------------------------------------------------

    def _execute(self, printer: _Printer, actions: Sequence[Action]) -> None:
        api = printer.api
        for action in actions:
            if isinstance(action, Log):
                log.log(action.level, "%s", action.message)
            elif isinstance(action, ReadHost):
                self._workers.submit(
                    printer.config.name, printer.core, action, _bind_read(api, action)
                )
            elif isinstance(action, Connect):
                self._workers.submit(
                    printer.config.name, printer.core, action, _bind_act(api, action)
                )
            elif isinstance(action, Disconnect):
                self._workers.submit(printer.config.name, printer.core, action, api.recover)

    # --- config -----------------------------------------------------------------

    def _apply_config(self, config: Config, memory: Mapping[str, object]) -> None:
        """Given a (new) config, keep unchanged printers as they are and rebuild the rest."""
        old = self._printers
        self._printers = {}
        for printer_config in config.printers:
            kept = old.pop(printer_config.name, None)
            if kept is not None and kept.config == printer_config:
                self._printers[printer_config.name] = kept
                continue
            if kept is not None and self._still_the_same_printer(kept, printer_config):
                self._reconfigure(kept, printer_config)
                continue
            core = PrinterCore(settings_for(printer_config, self._dry_run))
            remembered = kept.core.memory() if kept is not None else memory.get(printer_config.name)
            if remembered is not None:
                for problem in core.restore(remembered):
                    log.warning("%s", problem)
            replacement = _Printer(printer_config, core, self._api_factory(printer_config.host))
            if kept is not None:
                replacement.settle_until = kept.core.settling_until
                # Closed in the printer's own worker, after a request still running on
                # it: the new core's first read then comes after the old core's
                # connect, sees it, and does not connect a second time (rule 2).
                self._workers.submit(kept.config.name, None, _Closing(), kept.api.close)
            self._printers[printer_config.name] = replacement
        for gone in old.values():
            log.info("%s: removed from the config", gone.config.name)
            self._workers.submit(gone.config.name, None, _Closing(), gone.api.close)
            self._workers.retire(gone.config.name)
        self._config = config
        self._check_plugins()

    def _still_the_same_printer(self, printer: _Printer, config: PrinterConfig) -> bool:
        """Whether a changed config still describes the printer this core knows: the
        same OctoPrint instance, and the device it owns (if any) still matches."""
        if printer.config.host.url != config.host.url:
            return False
        device = self._present.get(printer.devpath) if printer.devpath else None
        return device is None or bool(matching_printers([config], device))

    def _reconfigure(self, printer: _Printer, config: PrinterConfig) -> None:
        """Given a printer and its changed config, keep its core and what it knows of
        the device and OctoPrint (a settle window running, a return not yet acted on,
        a connection it saw); only the settings change."""
        printer.core.reconfigure(settings_for(config, self._dry_run))
        if printer.config.host != config.host:
            # A new key or timeout: a new client, the old one closed behind its requests.
            self._workers.submit(config.name, None, _Closing(), printer.api.close)
            printer.api = self._api_factory(config.host)
        printer.config = config
        self._printers[config.name] = printer

    def _check_plugins(self) -> None:
        """Ask each OctoPrint not asked before whether a reconnect plugin runs in it.

        In a thread of its own per OctoPrint, like every request: a hung OctoPrint
        delays neither the loop nor its printers' first look.
        """
        for printer in self._printers.values():
            url = printer.config.host.url
            if url in self._plugins_checked:
                continue
            api = printer.api
            if not isinstance(api, PluginChecked):
                continue  # Klipper: no plugin of its own reconnects
            self._plugins_checked.add(url)
            # No printer name has a space: this thread is never a printer's.
            key = f"plugins of {shown_url(url)}"
            self._workers.submit(key, self, _PluginCheck(url), api.reconnect_plugins)

    def _reload(self) -> None:
        try:
            config = self._reload_config()
        except ConfigError as error:
            for problem in error.problems:
                log.error("reload: %s", problem)
            log.error("reload: the new config is invalid; keeping the old one")
            return
        self._notifier.reloading()
        log.info("reloading the config")
        self._apply_config(config, {})
        now = self._clock()
        for printer in self._printers.values():
            if printer.devpath is not None:
                self._execute(printer, printer.core.reconcile(now, "config reloaded"))
        # Printers added or changed by the reload own no device yet: the present
        # devices are routed to them exactly as at start-up.
        for device in list(self._present.values()):
            if self._owner_of(device.devpath) is None:
                self._on_device_event(DeviceAdded(device, enumerated=True), now)
        self._after_wake()
        self._notifier.ready(self._summary())

    # --- what survives, what is shown ---------------------------------------------

    def _after_wake(self) -> None:
        self._holds.save(
            {name: p.core.memory() for name, p in self._printers.items()}, now=self._clock()
        )
        self._status.publish(
            self._rows,
            busy=any(p.core.awaiting_answer for p in self._printers.values()),
            holds_unsaved=self._holds.unsaved,
        )

    def _rows(self) -> list[dict[str, object]]:
        printers = {name: (p.config, p.core) for name, p in self._printers.items()}
        return printer_rows(printers, self._clock(), self._wall_clock())

    def _summary(self) -> str:
        return summary_line(self._rows())

    def _log_start(self) -> None:
        config = self._config
        if config.zero_config:
            log.info(
                "reconnectd %s: %s, so every known printer board is the printer of OctoPrint "
                "at %s, and a board running Klipper that of Moonraker at %s",
                __version__,
                f"no [[printer]] in {config.source}" if config.source else "no config file",
                config.octoprint.shown_url,
                config.moonraker.shown_url,
            )
        else:
            log.info(
                "reconnectd %s: config %s, printers: %s%s",
                __version__,
                config.source,
                ", ".join(p.name for p in config.printers) or "none",
                " (dry run: no connect or disconnect is sent)" if self._dry_run else "",
            )
        if not os.path.exists(UDEV_CONTROL):
            polled = _static_printers(config)
            if polled:
                log.info(
                    "udevd is not running here (no %s): running on polling only; "
                    "%s found behind their static nodes once per poll period",
                    UDEV_CONTROL,
                    ", ".join(polled),
                )
            else:
                log.warning(
                    "udevd is not running here (no %s): without its events, only a "
                    "printer with port and poll set can be found, and none is",
                    UDEV_CONTROL,
                )
        for printer in config.printers:
            # Moonraker trusts local clients without a key (its trusted_clients).
            if printer.moonraker is None and printer.octoprint.api_key is None:
                log.warning(
                    "%s: no API key for OctoPrint at %s; set api_key_file in the config",
                    printer.name,
                    printer.octoprint.shown_url,
                )

    def close(self) -> None:
        """Stop the workers, close every client and the device source."""
        self._workers.close()
        for printer in self._printers.values():
            printer.api.close()
        self._source.close()
        self._selector.close()


@dataclass(frozen=True)
class _Closing:
    """Closing a replaced printer's OctoPrint client, queued behind its requests."""


@dataclass(frozen=True)
class _PluginCheck:
    """The request for an OctoPrint's reconnect plugins (see ``Daemon._check_plugins``)."""

    url: str


def _log_reconnect_plugins(url: str, result: object) -> None:
    """Given an OctoPrint's URL and what asking for its reconnect plugins gave, warn
    once per plugin found. A failed check never stops anything: a refused one (a key
    without SETTINGS_READ) is said at info level, an unanswered one at debug."""
    if isinstance(result, Refused):
        # A key without the SETTINGS_READ permission: worth knowing, never fatal.
        log.info(
            "cannot check OctoPrint at %s for reconnect plugins: HTTP %d: %s",
            url,
            result.status,
            result.reason,
        )
        return
    if not isinstance(result, list):
        log.debug("cannot check OctoPrint at %s for reconnect plugins: %s", url, result)
        return
    if not result:
        log.debug("OctoPrint at %s runs no reconnect plugin", url)
    for identifier, name in result:
        log.warning(
            "OctoPrint at %s runs the %s plugin (%s), which reconnects the printer too: "
            "two reconnectors fight (it reconnects after your Disconnect); disable one",
            url,
            name,
            identifier,
        )


def _static_printers(config: Config) -> list[str]:
    """Given a config, return the printers found by polling a static node."""
    return [p.name for p in config.printers if p.port is not None and p.poll > 0]


def _bind_read(api: HostClient, action: ReadHost) -> Callable[[], ReadResult]:
    return lambda: api.read(detail=action.detail)


def _bind_act(api: HostClient, action: Connect) -> Callable[[], CommandResult]:
    return lambda: api.act(action.port, action.baudrate, action.profile)


def _route_signals_to_socket() -> tuple[socket.socket, Callable[[], None]]:
    """Make SIGTERM, SIGINT and SIGHUP readable bytes on a socket the selector watches.

    The handlers do nothing: ``signal.set_wakeup_fd`` writes each signal's number to
    the socket, and the loop reads it there, so no decision runs in a handler.
    """
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    previous_fd = signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    previous: dict[int, Any] = {}

    def ignore(signum: int, frame: FrameType | None) -> None:
        del signum, frame

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        previous[signum] = signal.signal(signum, ignore)

    def restore() -> None:
        signal.set_wakeup_fd(previous_fd)
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        writer.close()

    return reader, restore


def _read_signals(reader: socket.socket) -> list[int]:
    received: list[int] = []
    try:
        while chunk := reader.recv(64):
            received.extend(chunk)
    except BlockingIOError:
        pass
    return received


def state_file(environ: Mapping[str, str]) -> Path:
    """Given the environment, return the file that holds survive a restart in."""
    return state_dir(environ) / STATE_FILE
