"""``reconnectd check --online``: can the daemon do its job with this config, right now?

For each OctoPrint it reaches the API, proves the key may read and change the
connection, and for each printer whose device is present now, that OctoPrint offers
a port for it: a printer OctoPrint does not list can never be connected (OctoPrint
answers 400), which is otherwise found out only at the first power cycle. The same
goes for a printer's ``profile`` that is not one of OctoPrint's printer profiles.

Nothing is connected or changed: the permission probe names a port no OctoPrint
lists, which a key that may connect gets refused with 400, and one that may not
with 403.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, TextIO

from reconnectd import exit_codes
from reconnectd.config import Config, MoonrakerConfig, OctoPrintConfig, PrinterConfig
from reconnectd.core import choose_port, glob_hint
from reconnectd.devices import Device
from reconnectd.host import CommandResult, HostView, ReadResult, Refused, Unreachable
from reconnectd.matching import matching_printers
from reconnectd.moonraker_state import mcu_serials

PERMISSION_PROBE_PORT = "/dev/reconnectd-permission-probe"

# Exit codes, worst last: see cli.py and the README.
OK = exit_codes.OK
PORT_NOT_OFFERED = exit_codes.FINDING
PROFILE_NOT_OFFERED = exit_codes.FINDING
NO_PERMISSION = exit_codes.NOPERM
UNREACHABLE = exit_codes.UNAVAILABLE
_SEVERITY = {OK: 0, PORT_NOT_OFFERED: 1, NO_PERMISSION: 2, UNREACHABLE: 3}


class OctoPrint(Protocol):
    """What the check needs of an OctoPrint client: ``octoprint_api.OctoPrintApi``."""

    def read(self, *, detail: bool = True) -> ReadResult: ...
    def connect(self, port: str, baudrate: int | None, profile: str | None) -> CommandResult: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class Finding:
    """One line of the report and the exit code it calls for."""

    code: int
    line: str


def worst(findings: Iterable[Finding]) -> int:
    """Given findings, return the exit code of the worst (0 when there are none)."""
    return max((f.code for f in findings), key=_SEVERITY.__getitem__, default=OK)


def check_online(
    config: Config,
    api_for: Callable[[OctoPrintConfig], OctoPrint],
    present: Callable[[PrinterConfig], list[Device]],
    out: TextIO,
    moonraker_for: Callable[[MoonrakerConfig], Moonraker] | None = None,
) -> int:
    """Given a config, client factories and what devices each printer has now, print
    a line per finding to ``out`` and return the exit code of the worst."""
    findings: list[Finding] = []
    views: dict[OctoPrintConfig, HostView] = {}
    octoprint_printers = [p for p in config.printers if p.moonraker is None]
    klipper_printers = [p for p in config.printers if p.moonraker is not None]
    targets = (
        [config.octoprint] if config.zero_config else [p.octoprint for p in octoprint_printers]
    )
    if moonraker_for is not None:
        for printer in klipper_printers:
            devices = present(printer)
            if printer.known_boards and not devices:
                continue  # zero config and no board running Klipper: no Moonraker to ask
            for finding in check_klipper(printer, moonraker_for, devices):
                findings.append(finding)
                print(finding.line, file=out)
    for octoprint in dict.fromkeys(targets):
        api = api_for(octoprint)
        try:
            finding, view = check_octoprint(api)
        finally:
            api.close()
        findings.append(Finding(finding.code, f"{octoprint.shown_url}: {finding.line}"))
        print(findings[-1].line, file=out)
        if view is not None:
            views[octoprint] = view
    for printer in octoprint_printers:
        view = views.get(printer.octoprint)
        if view is None:
            continue  # its OctoPrint already has a finding of its own
        for finding in [
            *check_profile(printer, view),
            *check_ports(printer, present(printer), view.ports),
        ]:
            findings.append(finding)
            print(finding.line, file=out)
    return worst(findings)


class Moonraker(Protocol):
    """What the check needs of a Moonraker client: ``moonraker_api.MoonrakerApi``."""

    def server_info(self) -> dict[str, Any] | Unreachable | Refused: ...
    def config_settings(self) -> dict[str, Any] | Unreachable | Refused: ...
    def close(self) -> None: ...


def check_klipper(
    printer: PrinterConfig,
    moonraker_for: Callable[[MoonrakerConfig], Moonraker],
    devices: list[Device],
) -> list[Finding]:
    """Given a Klipper printer, a client factory and its devices present now, return
    whether Moonraker answers and takes the key, what Klippy reports, and whether the
    matched device is the one Klipper's ``[mcu] serial`` names (a warning when not)."""
    assert printer.moonraker is not None
    url = printer.moonraker.shown_url
    api = moonraker_for(printer.moonraker)
    try:
        info = api.server_info()
        if isinstance(info, Unreachable):
            return [Finding(UNREACHABLE, f"{url}: unreachable: {info.reason}")]
        if isinstance(info, Refused):
            code = NO_PERMISSION if info.key_rejected else UNREACHABLE
            return [Finding(code, f"{url}: {info.reason}")]
        state = info.get("klippy_state", "unknown")
        findings = [Finding(OK, f"{url}: OK: Moonraker answers; Klippy is {state}")]
        settings = api.config_settings()
    finally:
        api.close()
    if not isinstance(settings, dict):
        reason = settings.reason
        findings.append(Finding(OK, f"{printer.name}: cannot read Klipper's MCUs: {reason}"))
        return findings
    serial = mcu_serials(settings).get("mcu")
    for device in devices:
        if serial is None:
            line = f"{printer.name}: warning: Klipper's config names no [mcu] serial"
        elif _same_node(serial, device):
            line = f"{printer.name}: {device.node} is Klipper's [mcu] serial ({serial})"
        else:
            line = (
                f"{printer.name}: warning: {device.node} matches this printer, but Klipper's "
                f"[mcu] serial is {serial}, not {device.paths[0]}: is it the right board?"
            )
        findings.append(Finding(OK, line))
    if not devices:
        findings.append(Finding(OK, f"{printer.name}: no device present now; nothing to match"))
    return findings


def _same_node(path: str, device: Device) -> bool:
    """Whether ``path`` names the device: one of its paths, or a link resolving to it."""
    if path in device.paths:
        return True
    return os.path.realpath(path) == os.path.realpath(device.node)


def check_octoprint(api: OctoPrint) -> tuple[Finding, HostView | None]:
    """Given a client, return what the key may do, and OctoPrint's view if it may."""
    read = api.read()
    if isinstance(read, Unreachable):
        return Finding(UNREACHABLE, f"unreachable: {read.reason}"), None
    if isinstance(read, Refused):
        return Finding(
            NO_PERMISSION, f"the API key may not read the connection: {read.reason}"
        ), None
    probe = api.connect(PERMISSION_PROBE_PORT, None, None)
    if isinstance(probe, Refused) and probe.key_rejected:
        return Finding(NO_PERMISSION, "the API key may read but not change the connection"), None
    if isinstance(probe, Unreachable):
        return Finding(UNREACHABLE, f"unreachable: {probe.reason}"), None
    ports = ", ".join(read.ports) or "none"
    return Finding(OK, f"OK: state {read.state}; ports offered: {ports}"), read


def check_ports(
    printer: PrinterConfig, devices: list[Device], offered: tuple[str, ...]
) -> list[Finding]:
    """Given a printer, its devices present now and the ports its OctoPrint offers,
    return a finding per device: the port the daemon would connect, or why none."""
    if not devices:
        return [Finding(OK, f"{printer.name}: no device present now; nothing to match")]
    findings = []
    for device in devices:
        port = choose_port(device, offered, printer.port)
        if port is not None:
            findings.append(Finding(OK, f"{printer.name}: {device.node} is offered as {port}"))
            continue
        wanted = printer.port or device.paths[0]
        findings.append(
            Finding(
                PORT_NOT_OFFERED,
                f"{printer.name}: {device.node} is present but {printer.octoprint.shown_url}"
                " does not"
                f" offer it (nor {', '.join(device.links) or 'any link to it'}); in OctoPrint's"
                f" serial settings add {glob_hint(wanted)} to the additional ports, or take it off"
                " the blacklisted ports",
            )
        )
    return findings


def check_profile(printer: PrinterConfig, view: HostView) -> list[Finding]:
    """Given a printer and its OctoPrint's view, return a finding if the printer's
    ``profile`` is not one of the printer profiles OctoPrint offers.

    OctoPrint refuses a connect naming a profile it does not have (400), so such a
    printer would never be connected. Nothing is said when the printer names no
    profile, or when OctoPrint listed none (it always has "_default": an answer
    without the list is not one to judge by).
    """
    wanted = printer.profile
    if wanted is None or not view.profiles or wanted in view.profiles:
        return []
    named = {i: i for i in view.profiles} | dict(zip(view.profiles, view.profile_names))
    offered = ", ".join(
        f'"{identifier}"' + (f" ({named[identifier]})" if named[identifier] != identifier else "")
        for identifier in view.profiles
    )
    line = (
        f'{printer.name}: profile "{wanted}" is not a printer profile of OctoPrint at'
        f" {printer.octoprint.shown_url}, which offers {offered}; OctoPrint refuses to"
        " connect with a profile it does not have"
    )
    # The usual slip: the name OctoPrint's settings show instead of the profile's id.
    same_name = [i for i, name in named.items() if name.casefold() == wanted.casefold()]
    if same_name:
        line += f'; "{wanted}" is the name of the profile whose id is "{same_name[0]}":'
        line += f' write profile = "{same_name[0]}"'
    return [Finding(PROFILE_NOT_OFFERED, line)]


def devices_of(printer: PrinterConfig, config: Config, devices: list[Device]) -> list[Device]:
    """Given a printer and the devices present, return those the daemon routes to it
    (a device several printers claim goes to the first, as in the daemon)."""
    return [d for d in devices if matching_printers(config.printers, d)[:1] == [printer]]
