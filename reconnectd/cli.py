"""The ``reconnectd`` command: run, check, devices, status."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from typing import NoReturn, TextIO

from reconnectd import __version__, logs
from reconnectd.boards import known_board
from reconnectd.config import Config, ConfigError, OctoPrintConfig, load_config
from reconnectd.daemon import Daemon
from reconnectd.devices import Device
from reconnectd.matching import matching_printers, stanza_for, suggested_name
from reconnectd.octoprint_api import OctoPrintApi
from reconnectd.octoprint_state import Refused, Unreachable
from reconnectd.status import StatusUnavailable, load_status, render_table, status_path
from reconnectd.systemd import Notifier
from reconnectd.udev import UdevWatcher, list_serial_devices

# Exit codes (sysexits.h), promised in the contract.
EXIT_OK = 0
EXIT_NOT_RUNNING = 3  # `status` with no daemon running, as `systemctl status` says it
EXIT_USAGE = 64
EXIT_UNAVAILABLE = 69
EXIT_NOPERM = 77
EXIT_CONFIG = 78

# A path no OctoPrint lists: connecting to it is refused with 400 by a key that may
# connect, and 403 by one that may not, and nothing else happens.
PERMISSION_PROBE_PORT = "/dev/reconnectd-permission-probe"


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
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    """Given the arguments, run a command and return its exit code."""
    env = os.environ if environ is None else environ
    args = build_parser().parse_args(argv)
    command = args.command or "run"
    if command == "status":
        return _status(args.json, env, sys.stdout)
    try:
        config = load_config(args.config, env)
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        return EXIT_CONFIG
    if command == "check":
        return _check(config, args.online, sys.stdout)
    if command == "devices":
        return _devices(config, args.json, sys.stdout)
    return _run(config, args, env)


def _run(config: Config, args: argparse.Namespace, environ: Mapping[str, str]) -> int:
    logs.setup_logging(args.verbose, environ)
    for octoprint in _octoprints(config):
        if octoprint.api_key:
            logs.redact(octoprint.api_key)

    def api_for(octoprint: OctoPrintConfig) -> OctoPrintApi:
        return OctoPrintApi(octoprint.url, octoprint.api_key, octoprint.timeout)

    daemon = Daemon(
        config,
        source=UdevWatcher(),
        api_factory=api_for,
        notifier=Notifier(environ),
        reload_config=lambda: load_config(args.config, environ),
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


def _check(config: Config, online: bool, out: TextIO) -> int:
    source = config.source or "no config file (zero-config defaults)"
    names = ", ".join(p.name for p in config.printers) or "none"
    print(f"config OK: {source}; printers: {names}", file=out)
    if not online:
        return EXIT_OK
    worst = EXIT_OK
    targets = _octoprints(config) if config.zero_config else [p.octoprint for p in config.printers]
    for octoprint in dict.fromkeys(targets):
        api = OctoPrintApi(octoprint.url, octoprint.api_key, octoprint.timeout)
        try:
            code, message = _check_octoprint(api)
        finally:
            api.close()
        print(f"{octoprint.url}: {message}", file=out)
        worst = max(worst, code, key=_severity)
    return worst


def _severity(code: int) -> int:
    return {EXIT_OK: 0, EXIT_NOPERM: 1, EXIT_UNAVAILABLE: 2}.get(code, 0)


def _check_octoprint(api: OctoPrintApi) -> tuple[int, str]:
    """Given a client, return the exit code and a line saying what the key may do."""
    read = api.read()
    if isinstance(read, Unreachable):
        return EXIT_UNAVAILABLE, f"unreachable: {read.reason}"
    if isinstance(read, Refused):
        return EXIT_NOPERM, f"the API key may not read the connection: {read.reason}"
    probe = api.connect(PERMISSION_PROBE_PORT, None, None)
    if isinstance(probe, Refused) and probe.status == 403:
        return EXIT_NOPERM, "the API key may read but not change the connection"
    if isinstance(probe, Unreachable):
        return EXIT_UNAVAILABLE, f"unreachable: {probe.reason}"
    ports = ", ".join(read.ports) or "none"
    return EXIT_OK, f"OK: state {read.state}; ports offered: {ports}"


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


def _status(as_json: bool, environ: Mapping[str, str], out: TextIO) -> int:
    try:
        document = load_status(status_path(environ))
    except StatusUnavailable as error:
        print(f"reconnectd status: {error}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    if as_json:
        json.dump(document, out, indent=2)
        out.write("\n")
    else:
        table = render_table(document)
        out.write(table if table.endswith("\n") else table + "\n")
    return EXIT_OK
