"""The ``reconnectd`` command: run, check, devices, status, login."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TextIO

from reconnectd import __version__, exit_codes, logs, service_access
from reconnectd.boards import known_board
from reconnectd.config import (
    Config,
    ConfigError,
    MoonrakerConfig,
    OctoPrintConfig,
    PrinterConfig,
    config_path,
    load_config,
    missing_keys,
)
from reconnectd.daemon import Daemon
from reconnectd.devices import Device
from reconnectd.host import HostClient
from reconnectd.matching import matching_printers, stanza_for, suggested_name
from reconnectd.moonraker_api import MoonrakerApi
from reconnectd.octoprint_api import OctoPrintApi
from reconnectd.static_nodes import SYS_ROOT, node_device
from reconnectd.status import StatusUnavailable, load_status, render_table, status_path
from reconnectd.systemd import Notifier
from reconnectd.udev import UdevWatcher, list_serial_devices
from reconnectd.urls import mask_urls

# Exit codes (sysexits.h), promised in the contract.
EXIT_OK = exit_codes.OK
EXIT_STATUS_INVALID = exit_codes.FINDING  # `status`: the status file cannot be read or is invalid
EXIT_NOT_RUNNING = exit_codes.NOT_RUNNING
EXIT_USAGE = exit_codes.USAGE
EXIT_UNAVAILABLE = exit_codes.UNAVAILABLE
EXIT_CANTCREAT = exit_codes.CANTCREAT
EXIT_NOPERM = exit_codes.NOPERM
EXIT_CONFIG = exit_codes.CONFIG
EXIT_INTERRUPTED = exit_codes.INTERRUPTED


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser; usage errors exit 64."""
    parser = _Parser(
        prog="reconnectd",
        description="Reconnect OctoPrint to a USB printer that was switched off and on.",
    )
    parser.add_argument("-c", "--config", metavar="PATH", help="config file")
    parser.add_argument("--version", action="version", version=f"reconnectd {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug lines too")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = commands.add_parser("run", help="the daemon, in the foreground (default)")
    run.add_argument("--dry-run", action="store_true", help="decide and log, send no POST")
    check = commands.add_parser("check", help="validate the config")
    check.add_argument("--online", action="store_true", help="also reach every OctoPrint")
    devices = commands.add_parser("devices", help="list serial devices and matching printers")
    devices.add_argument("--json", action="store_true", help="machine-readable output")
    status = commands.add_parser("status", help="the running daemon's view of each printer")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    login_ = commands.add_parser(
        "login", help="get an API key from OctoPrint (Application Keys) and store it"
    )
    login_.add_argument("--url", help="OctoPrint's URL (default: the config's [octoprint] url)")
    login_.add_argument(
        "--key-file", metavar="PATH", help="where to store the key (default: beside the config)"
    )
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Given the arguments, run a command and return its exit code."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "status":
        return _status(args.json, env, sys.stdout)
    if command == "login":
        # Before the config is loaded: a config whose key file does not exist yet
        # is exactly what login is for.
        return _login(args, env, sys.stdout, sys.stderr)
    try:
        config = load_config(args.config, env)
    except ConfigError as error:
        # Under systemd (ExecStart=, ExecReload=) stderr is the journal: each problem is
        # an error there, so that `journalctl -p warning` shows it.
        error_mark = "<3>" if logs.is_journal(sys.stderr, env) else ""
        for problem in error.problems:
            print(error_mark + problem, file=sys.stderr)
        return EXIT_CONFIG
    if command == "check":
        path, _ = config_path(args.config, env)
        return _check(config, path, args.online, sys.stdout, logs.is_journal(sys.stderr, env))
    if command == "devices":
        return _devices(config, args.json, sys.stdout)
    return _run(config, args, env)


def _run(config: Config, args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    logs.setup_logging(args.verbose, environ)

    def loaded(new: Config) -> Config:
        # At start and on every reload: a reload may bring a new key or new warnings.
        for octoprint in _octoprints(new):
            if octoprint.api_key:
                logs.redact(octoprint.api_key)
        for warning in new.warnings:
            logging.getLogger(__name__).warning("%s", warning)
        return new

    loaded(config)
    daemon = Daemon(
        config,
        source=UdevWatcher(),
        api_factory=host_client,
        notifier=Notifier(environ),
        reload_config=lambda: loaded(load_config(args.config, environ)),
        environ=environ,
        dry_run=args.dry_run,
    )
    return daemon.run()


def _octoprints(config: Config) -> list[OctoPrintConfig]:
    seen: list[OctoPrintConfig] = []
    for octoprint in [config.octoprint, *(p.octoprint for p in config.printers)]:
        if octoprint not in seen:
            seen.append(octoprint)
    return seen


def _check(config: Config, path: Path, online: bool, out: TextIO, journal: bool = False) -> int:
    from reconnectd import online_check  # not the daemon's: see _login

    # As ExecReload= runs it, stderr is the journal: priorities, as the daemon's lines.
    warning_mark, error_mark = ("<4>", "<3>") if journal else ("", "")
    for warning in config.warnings:
        print(f"{warning_mark}warning: {warning}", file=sys.stderr)
    # Not an error to the daemon, which starts and warns: but a set-up whose
    # OctoPrint refuses every request is not one to call OK.
    problems = missing_keys(config, path)
    if os.geteuid() == 0:
        # `sudo reconnectd check` reads anything; the service runs as its own user.
        user = service_access.service_user()
        if user is not None:
            problems += service_access.unreadable(service_access.files_read(config), user)
    if problems:
        for problem in problems:
            print(error_mark + problem, file=sys.stderr)
        return EXIT_CONFIG
    source = config.source or "no config file (zero-config defaults)"
    names = ", ".join(p.name for p in config.printers) or "none"
    # Under ExecReload= this goes to the journal too, where a line without a priority
    # is an error (the unit's SyslogLevel=err, for Python's own crash output).
    print(f"{'<6>' if journal else ''}config OK: {source}; printers: {names}", file=out)
    if not online:
        return EXIT_OK
    try:
        devices = list_serial_devices()
    except OSError as error:  # no /sys (a bare container): check OctoPrint alone
        print(f"cannot list serial devices: {error}", file=out)
        devices = []

    def present(printer: PrinterConfig) -> list[Device]:
        found = online_check.devices_of(printer, config, devices)
        if not found and printer.port is not None:
            # A static node (LXC) that udev does not know: its presence is in sysfs.
            static = node_device(printer.port, SYS_ROOT)
            found = [static] if static is not None else []
        return found

    def api_for(octoprint: OctoPrintConfig) -> OctoPrintApi:
        return OctoPrintApi(
            octoprint.url, octoprint.api_key, octoprint.timeout, ca_file=octoprint.ca_file
        )

    def moonraker_for(moonraker: MoonrakerConfig) -> MoonrakerApi:
        return MoonrakerApi(
            moonraker.url, moonraker.api_key, moonraker.timeout, ca_file=moonraker.ca_file
        )

    return online_check.check_online(config, api_for, present, out, moonraker_for)


def _devices(config: Config, as_json: bool, out: TextIO) -> int:
    devices = list_serial_devices()
    rows = [_device_row(config, device) for device in devices]
    if as_json:
        json.dump(rows, out, indent=2)
        out.write("\n")
        return EXIT_OK
    if not rows:
        print("no serial devices found", file=out)
        return EXIT_OK
    for device, row in zip(devices, rows):
        print(device.node, file=out)
        for link in device.links:
            print(f"    link:     {link}", file=out)
        if device.usb_id:
            names = " ".join(x for x in (device.vendor, device.model) if x)
            print(f"    usb id:   {device.usb_id}  {names}".rstrip(), file=out)
        print(f"    serial:   {device.serial or '(none)'}", file=out)
        if device.usb_path:
            print(f"    usb path: {device.usb_path}", file=out)
        if row["board"]:
            print(f"    board:    {row['board']}", file=out)
        printers = row["printers"]
        assert isinstance(printers, list)
        print(f"    printer:  {', '.join(printers) or '(none matches)'}", file=out)
        print("    config:", file=out)
        for line in str(row["stanza"]).splitlines():
            print(f"        {line}", file=out)
        print(file=out)
    return EXIT_OK


def _device_row(config: Config, device: Device) -> dict[str, object]:
    board = known_board(device.vendor_id, device.product_id)
    return {
        "node": device.node,
        "devpath": device.devpath,
        "links": list(device.links),
        "vendor_id": device.vendor_id,
        "product_id": device.product_id,
        "serial": device.serial,
        "usb_path": device.usb_path,
        "vendor": device.vendor,
        "model": device.model,
        "board": board.name if board else None,
        "printers": [p.name for p in matching_printers(config.printers, device)],
        "stanza": stanza_for(device, suggested_name(device)),
    }


def host_client(host: OctoPrintConfig | MoonrakerConfig) -> HostClient:
    """Given a printer's host config, return its client: OctoPrint's or Moonraker's."""
    if isinstance(host, MoonrakerConfig):
        return MoonrakerApi(host.url, host.api_key, host.timeout, ca_file=host.ca_file)
    return OctoPrintApi(host.url, host.api_key, host.timeout, ca_file=host.ca_file)


def _status(as_json: bool, environ: Mapping[str, str], out: TextIO) -> int:
    try:
        document = load_status(status_path(environ))
    except StatusUnavailable as error:
        print(f"reconnectd status: {error}", file=sys.stderr)
        return EXIT_NOT_RUNNING if error.not_running else EXIT_STATUS_INVALID
    # A status file written before URLs were shown masked may hold a password.
    document = _masked(document)
    if as_json:
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        table = render_table(document)
        out.write(table if table.endswith("\n") else table + "\n")
    return EXIT_OK


def _masked(value: Any) -> Any:
    """Given a value read from JSON, return it with a password in any URL in it masked."""
    if isinstance(value, str):
        return mask_urls(value)
    if isinstance(value, list):
        return [_masked(item) for item in value]
    if isinstance(value, dict):
        return {key: _masked(item) for key, item in value.items()}
    return value


def _login(args: argparse.Namespace, environ: Mapping[str, str], out: TextIO, err: TextIO) -> int:
    """Given ``login``'s arguments, get a key, store it, point the config at it; return the code.

    The exit codes are explained in :mod:`reconnectd.login`.
    """
    # Imported here: the daemon never logs in, and these modules cost it 1.5 MB of
    # its ~32 MB (bench/run measures it).
    from reconnectd import config_edit, login

    # How it ends when no key was obtained: OctoPrint or its workflow not there, or
    # refusing for now (69); nobody granted the key (77).
    exit_codes = {
        login.Failure.UNREACHABLE: EXIT_UNAVAILABLE,
        login.Failure.NO_WORKFLOW: EXIT_UNAVAILABLE,
        login.Failure.REFUSED: EXIT_UNAVAILABLE,
        login.Failure.DENIED: EXIT_NOPERM,
        login.Failure.TIMED_OUT: EXIT_NOPERM,
    }
    path, _ = config_path(args.config, environ)
    config = config_edit.read_config(path)
    if args.url is None:
        if config.problem is not None:
            print(config.problem, file=err)
            print("Fix the file, or name OctoPrint with --url.", file=err)
            return EXIT_CONFIG
        url = config_edit.configured_url(config)
        problem = login.check_url(url)
        if problem is not None:
            print(f"{path}: octoprint.url: {problem}", file=err)
            print("Fix the file, or name OctoPrint with --url.", file=err)
            return EXIT_CONFIG
    else:
        problem = login.check_url(args.url)
        if problem is not None:
            print(f"reconnectd login: --url: {problem}", file=err)
            return EXIT_USAGE
        url = args.url.rstrip("/")
    table = config_edit.find_table(config, url)
    if args.key_file is not None:
        key_file = Path(os.path.abspath(args.key_file))
    else:
        key_file = config_edit.default_key_file(config, table, url)
    problem = login.key_file_problem(key_file)
    if problem is not None:
        print(f"reconnectd login: {problem}", file=err)
        return EXIT_CANTCREAT
    stored = False
    try:
        ca_file = table.ca_file if isinstance(table, config_edit.Table) else None
        result = login.request_api_key(url, out, ca_file=ca_file)
        if isinstance(result, login.LoginFailed):
            print(f"reconnectd login: {result.message}", file=err)
            if result.kind is login.Failure.NO_WORKFLOW:
                print(config_edit.manual_steps(key_file, table, path), file=err)
            return exit_codes[result.kind]
        try:
            owner = login.store_key(key_file, result.api_key)
        except OSError as error:
            reason = error.strerror or str(error)
            print(
                f'reconnectd login: cannot write the key to "{key_file}": {reason}. OctoPrint'
                f' keeps it: copy it from {login.MANUAL_PLACE} ("{login.APP_NAME}").',
                file=err,
            )
            return EXIT_CANTCREAT
        stored = True
        mode = f"mode 0600, owner {owner}" if owner else "mode 0600"
        print(f"Stored the key in {key_file} ({mode}).", file=out)
        outcome = config_edit.point_config(config, table, key_file, url)
        print(outcome.message, file=out if outcome.ok else err)
        print(
            "Then: sudo systemctl reload reconnectd; reconnectd check --online tells whether"
            " the key may connect the printer.",
            file=out,
        )
        return EXIT_OK
    except KeyboardInterrupt:
        done = f"the key is stored in {key_file}" if stored else "no key was stored"
        print(f"reconnectd login: interrupted; {done}.", file=err)
        return EXIT_INTERRUPTED
