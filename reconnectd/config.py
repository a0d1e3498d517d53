"""The configuration file: read it, check every value, and say plainly what is wrong.

Strict on purpose, like Klipper's configfile: an unknown key or a wrong type is an
error, never a silent default, because a typo in ``vendor_id`` would otherwise
leave a printer unwatched with nothing in the log to say why. Every problem in
the file is collected and reported at once, one line each, as
``FILE: key.path: what is wrong`` (contract: exit 78, no traceback), so that a
user fixes the whole file in one go instead of one error per restart.

The API key never appears in a message, a ``repr`` or a ``str``: it is only ever
reported by the name of the key that holds it. It comes from one of three places:
inline (``api_key``), a file (``api_key_file``), or a systemd credential
(``api_key_credential``, read from ``$CREDENTIALS_DIRECTORY`` as ``LoadCredential=``
puts it there). A key file, or a config file holding an inline key, that users
other than the daemon's own can read is not an error but a warning, kept apart in
:attr:`Config.warnings` for the daemon to log and ``check`` to print.

``ca_file`` names the PEM bundle of a private CA that signed an https OctoPrint's
certificate; it is loaded here once, so that a wrong file is a config error rather
than every request failing later. There is no way to turn verification off.
"""

from __future__ import annotations

import dataclasses
import difflib
import grp
import json
import math
import os
import re
import shlex
import ssl
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path, PurePosixPath
from typing import Any

from reconnectd.devices import normalize_usb_id, udev_serial
from reconnectd.urls import instance_of, shown_url, url_problem

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9 and 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/reconnectd/reconnectd.toml")
CONFIG_ENV = "RECONNECTD_CONFIG"
ZERO_CONFIG_PRINTER = "printer"
ZERO_CONFIG_KLIPPER = "klipper"

DEFAULT_URL = "http://127.0.0.1:5000"
DEFAULT_MOONRAKER_URL = "http://127.0.0.1:7125"
# The unit's Group=: a secret this group may read is not exposed.
SERVICE_GROUP = "reconnectd"
TIMEOUT_MAX = 60.0  # seconds; a longer request would starve the watchdog ping
SETTLE_MAX = 600.0
STUCK_AFTER_MAX = 600.0
# A day, as for poll: the backoff of a printer that never answers.
RETRY_MAX = 86400.0
# Each attempt at a silent printer holds OctoPrint ~40 s, so polling faster than
# every 5 s would keep OctoPrint permanently busy connecting.
POLL_MIN = 5.0
# A day: longer is pointless for a fallback check, and a huge value would
# overflow the select() timeout computed from it.
POLL_MAX = 86400.0
# A serial port's plausible speeds, in bits per second. 300 is the slowest rate a
# terminal program still offers; 4,000,000 is the fastest that Linux's termios names
# (B4000000), far above what any printer firmware runs (Marlin 115200 or 250000,
# Klipper and RepRapFirmware up to 1,000,000 or 2,000,000). Outside these, the number
# is a typo (a missing or extra digit), not a speed.
BAUDRATE_MIN = 300
BAUDRATE_MAX = 4_000_000
# An API key is 32-43 characters; anything this large is the wrong file.
KEY_FILE_MAX_BYTES = 4096
# Where systemd puts the files of LoadCredential=NAME:PATH, one per NAME.
CREDENTIALS_ENV = "CREDENTIALS_DIRECTORY"
# systemd's own limit: a credential name is a file name of printable ASCII
# without ":" (which separates it from the path in LoadCredential=).
_CREDENTIAL_RE = re.compile(r"[!-9;-~]{1,255}")
# udev's ID_PATH of a device on port 2 of a hub on port 1 of an Intel xHCI.
USB_PATH_EXAMPLE = "pci-0000:00:14.0-usb-0:1.2:1.0"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class HostConfig:
    """How to reach one printer host: an OctoPrint, or a Moonraker in front of Klipper.

    ``api_key`` holds the key whether it was written inline, read from
    ``api_key_file`` (then ``api_key_file`` is the absolute path it came from) or
    from the systemd credential named ``api_key_credential``. It is left out of
    ``repr`` so that logging a config cannot leak it. ``ca_file`` is the absolute
    path of the CA bundle an https URL is verified against (None: the system's).
    """

    url: str = DEFAULT_URL
    api_key: str | None = field(default=None, repr=False)
    api_key_file: Path | None = None
    timeout: float = 5.0
    api_key_credential: str | None = None
    ca_file: Path | None = None

    @property
    def shown_url(self) -> str:
        """The URL as every message, log line and status shows it: a password masked."""
        return shown_url(self.url)


@dataclass(frozen=True)
class OctoPrintConfig(HostConfig):
    """How to reach one OctoPrint (``api_key`` sent as ``X-Api-Key``)."""


@dataclass(frozen=True)
class MoonrakerConfig(HostConfig):
    """How to reach one Moonraker, the API server in front of a Klipper host
    (``api_key`` sent as ``X-Api-Key``; a client Moonraker trusts needs none)."""

    url: str = DEFAULT_MOONRAKER_URL


@dataclass(frozen=True)
class PrinterConfig:
    """One ``[[printer]]``: how to recognise its device and where its host is.

    ``moonraker`` set makes it a Klipper printer (its ``octoprint`` is then unused).
    """

    name: str
    octoprint: OctoPrintConfig
    vendor_id: str | None = None
    product_id: str | None = None
    serial: str | None = None
    usb_path: str | None = None
    port: str | None = None
    baudrate: int | None = None
    profile: str | None = None
    settle: float = 1.0
    poll: float = 0.0
    known_boards: bool = False
    moonraker: MoonrakerConfig | None = None
    # How long "Opening serial connection" may last before it counts as stuck (rule 6),
    # and the backoff of failed connects (rule 7): the contract's numbers by default.
    stuck_after: float = 20.0
    retry_first: float = 5.0
    retry_max: float = 300.0

    @property
    def host(self) -> OctoPrintConfig | MoonrakerConfig:
        """The printer's host: its Moonraker for a Klipper printer, else its OctoPrint."""
        return self.moonraker if self.moonraker is not None else self.octoprint


@dataclass(frozen=True)
class Config:
    """The whole configuration, checked and with every default filled in.

    ``warnings`` are problems that do not stop the daemon (a secret others can
    read), one line each naming the file and the fix.
    """

    source: Path | None
    octoprint: OctoPrintConfig
    printers: tuple[PrinterConfig, ...]
    warnings: tuple[str, ...] = ()
    moonraker: MoonrakerConfig = field(default_factory=lambda: MoonrakerConfig())

    @property
    def zero_config(self) -> bool:
        """Given a config, return whether its printers come from the built-in board table."""
        return bool(self.printers) and all(p.known_boards for p in self.printers)


class ConfigError(Exception):
    """Every problem found in a configuration, one ``FILE: key.path: what`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


def zero_config(
    octoprint: OctoPrintConfig | None = None, moonraker: MoonrakerConfig | None = None
) -> tuple[PrinterConfig, ...]:
    """Given the shared OctoPrint (and Moonraker), return the printers of the built-in
    board table: one of [octoprint] for every known board but Klipper's, and, with a
    Moonraker, one of [moonraker] for Klipper's own USB id (contract, Klipper printers)."""
    shared = octoprint if octoprint is not None else OctoPrintConfig()
    printers = [PrinterConfig(name=ZERO_CONFIG_PRINTER, octoprint=shared, known_boards=True)]
    if moonraker is not None:
        printers.append(
            PrinterConfig(
                name=ZERO_CONFIG_KLIPPER, octoprint=shared, known_boards=True, moonraker=moonraker
            )
        )
    return tuple(printers)


def config_path(cli_path: str | None, environ: Mapping[str, str]) -> tuple[Path, bool]:
    """Given ``--config`` and the environment, return the config path and whether it was named.

    ``--config`` wins over ``$RECONNECTD_CONFIG``, which wins over the default. An
    empty ``$RECONNECTD_CONFIG`` counts as unset, as ``VAR= command`` usually means.
    """
    path, origin = _config_source(cli_path, environ)
    return path, origin is not None


def _config_source(cli_path: str | None, environ: Mapping[str, str]) -> tuple[Path, str | None]:
    if cli_path is not None:
        return Path(cli_path), "--config"
    from_env = environ.get(CONFIG_ENV, "")
    if from_env:
        return Path(from_env), f"${CONFIG_ENV}"
    return DEFAULT_CONFIG_PATH, None


def load_config(cli_path: str | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Given ``--config`` and the environment, return the checked config.

    A missing default file means zero-config. ``environ`` also gives
    ``$CREDENTIALS_DIRECTORY`` for ``api_key_credential``. A config file holding an
    inline ``api_key`` that others can read earns a warning. Raise
    :class:`ConfigError` if a named file is missing, if the file cannot be read, or
    if anything in it is wrong.
    """
    env = os.environ if environ is None else environ
    path, origin = _config_source(cli_path, env)
    try:
        with path.open("rb") as handle:
            status = os.fstat(handle.fileno())
            data = handle.read()
    except FileNotFoundError:
        if origin is None:
            return Config(
                source=None,
                octoprint=OctoPrintConfig(),
                printers=zero_config(OctoPrintConfig(), MoonrakerConfig()),
            )
        raise ConfigError([f"{path}: no such file (named by {origin})"]) from None
    except (OSError, ValueError) as exc:
        raise ConfigError([f"{path}: cannot read the file: {_os_reason(exc)}"]) from None
    try:
        # utf-8-sig: a byte-order mark from a Windows editor is harmless, and
        # TOML's own error for it ("Invalid statement") would mislead.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            [f"{path}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"]
        ) from None
    config = parse_config(text, path, env)
    held = _inline_secrets(config)
    if held:
        exposed = exposure(path, status, os.geteuid(), os.getegid())
        if exposed is not None:
            who, fix = exposed
            warning = f"{path}: holds {' and '.join(held)} and is readable by {who}; run: {fix}"
            if "an inline api_key" in held:
                warning += " (or move the key to api_key_file)"
            config = dataclasses.replace(config, warnings=(warning, *config.warnings))
    return config


def parse_config(text: str, source: Path, environ: Mapping[str, str] | None = None) -> Config:
    """Given the text of a config file, its path and the environment, return the checked config.

    A relative ``api_key_file`` or ``ca_file`` is relative to the directory of
    ``source``; key files, credentials (from ``$CREDENTIALS_DIRECTORY`` in
    ``environ``, default ``os.environ``) and CA bundles are read here, and a key
    file others can read earns a warning. Raise :class:`ConfigError` listing every
    problem found.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{source}: {_toml_error(str(exc))}"]) from None
    except RecursionError:
        raise ConfigError([f"{source}: arrays or tables are nested too deeply"]) from None
    except ValueError as exc:
        # Python refuses integers of more than 4300 digits while parsing (its
        # wording varies between versions, hence ours).
        what = "an integer has too many digits" if "digits" in str(exc) else str(exc)
        raise ConfigError([f"{source}: {what}"]) from None
    return _Checker(source, os.environ if environ is None else environ).check(document)


def missing_keys(config: Config, path: Path) -> list[str]:
    """Given a checked config and the path it was read from (or would have been), return
    a ``FILE: key.path: what is wrong`` line for each printer whose OctoPrint has no key.

    The daemon starts without a key, and warns: OctoPrint then refuses it everything,
    so ``reconnectd check`` calls it a problem rather than OK. Klipper printers are
    left out: Moonraker may trust its local clients without a key.
    """
    source = config.source or path
    how = (
        'run "reconnectd login" to get one from OctoPrint (it stores the key and sets'
        " api_key_file), or set api_key_file to a file holding one"
    )
    lines = []
    for index, printer in enumerate(config.printers):
        octoprint = printer.octoprint
        if printer.moonraker is not None or octoprint.api_key is not None:
            continue
        table = "octoprint" if octoprint == config.octoprint else f"printer[{index}].octoprint"
        if printer.known_boards:
            user = "which every known printer board uses (there is no [[printer]])"
        else:
            user = f'which printer "{printer.name}" uses'
        lines.append(
            f"{source}: {table}: no API key for the OctoPrint at {octoprint.shown_url},"
            f" {user}; {how}"
        )
    return list(dict.fromkeys(lines))


def toml_string(text: str) -> str:
    """Given any text, return it as a TOML basic string, quotes included."""
    # A JSON string is a TOML basic string, except for the few escapes JSON writes
    # as \u for non-ASCII when asked, and DEL, which TOML wants escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_error(message: str) -> str:
    # tomllib and tomli end every message with "(at line L, column C)" or
    # "(at end of document)"; put the position first, like a compiler does.
    match = re.fullmatch(r"(.*) \(at line (\d+), column (\d+)\)", message, re.DOTALL)
    if match:
        return f"line {match[2]}, column {match[3]}: {match[1]}"
    match = re.fullmatch(r"(.*) \(at end of document\)", message, re.DOTALL)
    if match:
        return f"end of file: {match[1]}"
    return message


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


# --- secrets others can read ------------------------------------------------------


def exposure(file: Path, status: os.stat_result, euid: int, egid: int) -> tuple[str, str] | None:
    """Given a secret file, its status and the daemon's ids, return who else reads it and the fix.

    Return who else can read it ("other users", "group adm") and a shell command
    that stops them while the daemon can still read it, or None if nobody else can.
    The daemon's own group may read it: that is the root:reconnectd 0640 set-up. So
    may the service's group when someone else checks the file (``sudo reconnectd
    check`` runs as root, whose group is not the service's).
    """
    mode = status.st_mode
    world = bool(mode & stat.S_IROTH)
    group = bool(mode & stat.S_IRGRP) and status.st_gid not in (egid, service_gid())
    if not (world or group):
        return None
    who = "other users" if world else f"group {_group_name(status.st_gid)}"
    quoted = shlex.quote(str(file))
    if euid == status.st_uid:
        fix = f"chmod 600 {quoted}"
    elif status.st_gid == egid:
        fix = f"chmod 640 {quoted}"
    elif euid == 0:
        fix = f"chmod 600 {quoted}"
    else:
        # Neither its owner nor its group: the daemon reads it only because others
        # may, so hand the file to the daemon's group before closing it to others.
        fix = f"chgrp {_group_name(egid)} {quoted} && chmod 640 {quoted}"
    return who, fix


def service_gid() -> int | None:
    """Return the gid of the group the service runs as (systemd/install makes it), if any."""
    try:
        return grp.getgrnam(SERVICE_GROUP).gr_gid
    except KeyError:
        return None


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


def _inline_secrets(config: Config) -> list[str]:
    """Given a config, return which secrets its file holds itself: an inline key, a
    password in a URL (basic auth), both or none."""
    octoprints = (config.octoprint, *(p.octoprint for p in config.printers))
    held = []
    if any(
        octoprint.api_key is not None
        and octoprint.api_key_file is None
        and octoprint.api_key_credential is None
        for octoprint in octoprints
    ):
        held.append("an inline api_key")
    if any(shown_url(octoprint.url) != octoprint.url for octoprint in octoprints):
        held.append("a password in a url")
    return held


# --- describing values in messages ---------------------------------------------


def _describe(value: object) -> str:
    """Given a TOML value, return how a message should show it (short, TOML-like)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 60 else text[:56] + '..."'
    if isinstance(value, int):
        try:
            text = str(value)
        except ValueError:  # more digits than Python will print
            return "a number too large to print"
        return text if len(text) <= 30 else f"{text[:20]}... ({len(text)} digits)"
    if isinstance(value, float):
        if _is_nan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, datetime):
        return "a date-time"
    if isinstance(value, date):
        return "a date"
    if isinstance(value, time):
        return "a time"
    return type(value).__name__


def _kind(value: object) -> str:
    """Given a TOML value, return its kind only: for secrets, whose value must not be shown."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    return _describe(value)


def is_usb_path(text: str) -> bool:
    """Given a string, return whether it can be udev's ``ID_PATH``: one printable word."""
    return bool(text) and not any(c.isspace() or not c.isprintable() for c in text)


def _is_nan(value: float) -> bool:
    # math.isnan() converts to float first, which overflows for a huge integer.
    return isinstance(value, float) and math.isnan(value)


def _key_path(parent: str, key: str) -> str:
    # Quote keys a user could only have written quoted, so that the path reads
    # back as the TOML that names it.
    shown = key if _BARE_KEY_RE.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{parent}.{shown}" if parent else shown


# --- the checker -----------------------------------------------------------------


class _Missing:
    """The value of a key that is not in the file (distinct from any TOML value)."""


_MISSING = _Missing()

_OCTOPRINT_KEYS = ("url", "api_key", "api_key_file", "api_key_credential", "ca_file", "timeout")
# The three places a key can come from; a table sets at most one.
_KEY_SOURCES = ("api_key", "api_key_file", "api_key_credential")
_PRINTER_KEYS = (
    "name",
    "vendor_id",
    "product_id",
    "serial",
    "usb_path",
    "port",
    "baudrate",
    "profile",
    "settle",
    "poll",
    "octoprint",
    "moonraker",
    "stuck_after",
    "retry_first",
    "retry_max",
)
_TOP_KEYS = ("octoprint", "moonraker", "printer")
# Keys of a printer that only OctoPrint reads: Klipper's config names its serial.
_OCTOPRINT_ONLY = ("baudrate", "profile")


class _Checker:
    """Walks a parsed TOML document, collecting every problem instead of stopping."""

    def __init__(self, source: Path, environ: Mapping[str, str]) -> None:
        self.source = source
        self.environ = environ
        self.problems: list[str] = []
        self.warnings: list[str] = []

    def problem(self, path: str, what: str) -> None:
        self.problems.append(f"{self.source}: {path}: {what}" if path else f"{self.source}: {what}")

    def check(self, document: dict[str, Any]) -> Config:
        self.unknown_keys(document, "", _TOP_KEYS)

        shared_values: dict[str, Any] = {}
        raw_octoprint = document.get("octoprint", _MISSING)
        if not isinstance(raw_octoprint, _Missing):
            if isinstance(raw_octoprint, dict):
                shared_values = self.octoprint_values(raw_octoprint, "octoprint")
            else:
                self.problem(
                    "octoprint", f"expected a table [octoprint], got {_describe(raw_octoprint)}"
                )
        shared = OctoPrintConfig(**shared_values)
        moonraker_values: dict[str, Any] = {}
        raw_moonraker = document.get("moonraker", _MISSING)
        if not isinstance(raw_moonraker, _Missing):
            if isinstance(raw_moonraker, dict):
                moonraker_values = self.octoprint_values(
                    raw_moonraker, "moonraker", DEFAULT_MOONRAKER_URL
                )
            else:
                self.problem(
                    "moonraker", f"expected a table [moonraker], got {_describe(raw_moonraker)}"
                )
        shared_moonraker = MoonrakerConfig(**moonraker_values)

        printers: list[PrinterConfig] = []
        raw_printers = document.get("printer", _MISSING)
        if isinstance(raw_printers, list):
            names: dict[str, str] = {}
            hosts: dict[tuple[str, str], PrinterConfig] = {}
            for index, raw in enumerate(raw_printers):
                path = f"printer[{index}]"
                if not isinstance(raw, dict):
                    self.problem(path, f"expected a table [[printer]], got {_describe(raw)}")
                    continue
                printer = self.printer(raw, path, shared_values, moonraker_values, names)
                if printer is not None:
                    printers.append(printer)
                    self.own_host(printer, raw, path, hosts)
        elif isinstance(raw_printers, dict):
            self.problem(
                "printer", "expected an array of tables written [[printer]], got a table [printer]"
            )
        elif not isinstance(raw_printers, _Missing):
            self.problem(
                "printer", f"expected an array of tables [[printer]], got {_describe(raw_printers)}"
            )

        if self.problems:
            raise ConfigError(self.problems)
        # One key file named in several tables is one warning.
        warnings = tuple(dict.fromkeys(self.warnings))
        if isinstance(raw_printers, _Missing) or not raw_printers:
            # Contract: with no [[printer]], every known board is a printer of the
            # single [octoprint], Klipper's own USB id one of [moonraker].
            printers = list(zero_config(shared, shared_moonraker))
        return Config(
            source=self.source,
            octoprint=shared,
            printers=tuple(printers),
            warnings=warnings,
            moonraker=shared_moonraker,
        )

    def own_host(
        self,
        printer: PrinterConfig,
        table: dict[str, Any],
        path: str,
        hosts: dict[tuple[str, str], PrinterConfig],
    ) -> None:
        """Note a printer whose host instance an earlier printer uses already.

        One OctoPrint drives one printer connection: two printers of one instance
        would connect and disconnect each other's printer. Two URLs name one instance
        when scheme, host (any case), port (80 and 443 written or not) and path (a
        trailing "/" or not) are the same; a user name and password do not count.
        """
        kind = "moonraker" if printer.moonraker is not None else "octoprint"
        first = hosts.setdefault((kind, instance_of(printer.host.url)), printer)
        if first is printer:
            return
        urls = first.host.shown_url
        if printer.host.shown_url != urls:
            urls += f" and {printer.host.shown_url}"
        own = table.get(kind)
        inherited = not (isinstance(own, dict) and "url" in own)
        name = "Moonraker" if kind == "moonraker" else "OctoPrint"
        self.problem(
            _key_path(_key_path(path, kind), "url"),
            f'printer "{first.name}" and printer "{printer.name}" both use the {name} at {urls}'
            + (f" ([{kind}]'s, as this printer has no [printer.{kind}] url)" if inherited else "")
            + f": one {name} instance drives one printer connection; give each printer its own"
            f" [printer.{kind}] url",
        )

    def unknown_keys(self, table: dict[str, Any], path: str, known: tuple[str, ...]) -> set[str]:
        """Note every key of ``table`` not in ``known``; return the known keys suggested."""
        suggested: set[str] = set()
        for key in table:
            if key in known:
                continue
            close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
            if close:
                suggested.add(close[0])
                hint = f'did you mean "{close[0]}"?'
            else:
                hint = "expected one of: " + ", ".join(known)
            self.problem(_key_path(path, key), f'unknown key "{key}" ({hint})')
        return suggested

    # -- [octoprint] and [printer.octoprint] --

    def octoprint_values(
        self, table: dict[str, Any], path: str, example_url: str = DEFAULT_URL
    ) -> dict[str, Any]:
        """Given one OctoPrint (or Moonraker: the same keys) table, return the fields it
        sets, checked (problems noted)."""
        self.unknown_keys(table, path, _OCTOPRINT_KEYS)
        values: dict[str, Any] = {}
        if "url" in table:
            url = self.url(table["url"], _key_path(path, "url"), example_url)
            if url is not None:
                values["url"] = url
        if "timeout" in table:
            timeout = self.seconds(
                table["timeout"],
                _key_path(path, "timeout"),
                low=0.0,
                high=TIMEOUT_MAX,
                low_open=True,
            )
            if timeout is not None:
                values["timeout"] = timeout
        if "ca_file" in table:
            ca_file = self.ca_file(table["ca_file"], _key_path(path, "ca_file"))
            if ca_file is not None:
                values["ca_file"] = ca_file
        sources = [key for key in _KEY_SOURCES if key in table]
        if len(sources) == 2:
            self.problem(path, f"{sources[0]} and {sources[1]} are both set; keep one")
        elif len(sources) == 3:
            self.problem(path, "api_key, api_key_file and api_key_credential are all set; keep one")
        elif sources == ["api_key"]:
            key = self.api_key(table["api_key"], _key_path(path, "api_key"))
            if key is not None:
                values.update(api_key=key, api_key_file=None, api_key_credential=None)
        elif sources == ["api_key_file"]:
            loaded = self.api_key_file(table["api_key_file"], _key_path(path, "api_key_file"))
            if loaded is not None:
                values.update(api_key_file=loaded[0], api_key=loaded[1], api_key_credential=None)
        elif sources == ["api_key_credential"]:
            name = table["api_key_credential"]
            key = self.api_key_credential(name, _key_path(path, "api_key_credential"))
            if key is not None:
                values.update(api_key_credential=name, api_key=key, api_key_file=None)
        return values

    def url(self, value: object, path: str, example: str = DEFAULT_URL) -> str | None:
        if not isinstance(value, str):
            expected = f'expected an http:// or https:// URL with a host like "{example}"'
            self.problem(path, f"{expected}, got {_describe(value)}")
            return None
        # The message shows the URL with any password in it masked.
        problem = url_problem(value, example)
        if problem is not None:
            self.problem(path, f"{problem}, got {_describe(shown_url(value))}")
            return None
        return value.rstrip("/")

    def api_key(self, value: object, path: str) -> str | None:
        # Never show the value: the key is a secret even when it is malformed.
        if not isinstance(value, str):
            self.problem(path, f"expected the key as a string, got {_kind(value)}")
            return None
        return self.key_text(value.strip(), path, "must not be empty")

    def key_text(self, key: str, path: str, empty: str) -> str | None:
        if not key:
            self.problem(path, empty)
            return None
        if any(c.isspace() or not c.isprintable() for c in key):
            # It goes into an HTTP header, where a space or newline is invalid.
            self.problem(path, "the key must be a single word with no spaces or line breaks")
            return None
        return key

    def api_key_file(self, value: object, path: str) -> tuple[Path, str] | None:
        file = self.file_path(
            value, path, 'the path of a file holding the key like "/etc/reconnectd/octoprint.key"'
        )
        if file is None:
            return None
        read = self.read_key(file, path, f'"{file}"')
        if read is None:
            return None
        status, key = read
        exposed = exposure(file, status, os.geteuid(), os.getegid())
        if exposed is not None:
            who, fix = exposed
            self.warnings.append(f"{file}: readable by {who}; run: {fix}")
        return file, key

    def api_key_credential(self, value: object, path: str) -> str | None:
        example = (
            'like "octoprint.key" (LoadCredential=octoprint.key:/etc/reconnectd/octoprint.key)'
        )
        if isinstance(value, str) and "/" in value:
            # The usual slip: the path of the key instead of the name systemd gives it.
            self.problem(
                path,
                f"expected the name of a credential, not a path: LoadCredential=NAME:PATH"
                f" makes PATH the credential NAME, got {_describe(value)}",
            )
            return None
        if (
            not isinstance(value, str)
            or not _CREDENTIAL_RE.fullmatch(value)
            or value in (".", "..")
        ):
            self.problem(
                path, f"expected the name of a systemd credential {example}, got {_describe(value)}"
            )
            return None
        directory = self.environ.get(CREDENTIALS_ENV, "")
        if not directory:
            self.problem(
                path,
                f"${CREDENTIALS_ENV} is not set: reconnectd was not started by systemd"
                f" with LoadCredential={value}:PATH",
            )
            return None
        file = Path(directory) / value
        if not os.path.lexists(file):
            self.problem(
                path,
                f'no credential "{value}" in ${CREDENTIALS_ENV} ({directory}): add'
                f" LoadCredential={value}:PATH to the service and restart it",
            )
            return None
        # systemd owns the credential files and their modes: no exposure check.
        read = self.read_key(file, path, f'credential "{value}" at "{file}"')
        return None if read is None else read[1]

    def read_key(self, file: Path, path: str, what: str) -> tuple[os.stat_result, str] | None:
        """Given a key file's absolute path, return its status and the key (problems noted)."""
        try:
            # A FIFO or a terminal would block the daemon on open or read.
            if not stat.S_ISREG(file.stat().st_mode):
                self.problem(path, f"{what} is not a regular file")
                return None
            with file.open("rb") as handle:
                status = os.fstat(handle.fileno())
                data = handle.read(KEY_FILE_MAX_BYTES + 1)
        except OSError as exc:
            self.problem(path, f"cannot read {what}: {_os_reason(exc)}")
            return None
        if len(data) > KEY_FILE_MAX_BYTES:
            self.problem(path, f"{what} is larger than {KEY_FILE_MAX_BYTES} bytes: not a key file")
            return None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            self.problem(path, f"{what} is not UTF-8 text")
            return None
        key = self.key_text(text.strip(), path, f"{what} is empty")
        return None if key is None else (status, key)

    def ca_file(self, value: object, path: str) -> Path | None:
        file = self.file_path(
            value, path, 'the path of a PEM file of CA certificates like "/etc/reconnectd/ca.pem"'
        )
        if file is None:
            return None
        try:
            # A FIFO would block the daemon; a directory would be taken by requests
            # as an OpenSSL hash directory, which is not what this key promises.
            if not stat.S_ISREG(file.stat().st_mode):
                self.problem(path, f'"{file}" is not a regular file')
                return None
            # Loaded once here so that a DER file, a key or an empty file is named
            # now, not as a TLS failure on every request.
            ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(file))
        except ssl.SSLError:
            self.problem(
                path,
                f'"{file}" holds no PEM certificate ("-----BEGIN CERTIFICATE-----" block)',
            )
            return None
        except OSError as exc:
            self.problem(path, f'cannot read "{file}": {_os_reason(exc)}')
            return None
        return file

    def file_path(self, value: object, path: str, expected: str) -> Path | None:
        """Given a path as written, return it absolute, relative to the config file's directory."""
        if not isinstance(value, str) or not value or "\0" in value:
            self.problem(path, f"expected {expected}, got {_describe(value)}")
            return None
        file = Path(value)
        if not file.is_absolute():
            # Relative to the config file, not to whatever directory the daemon
            # was started from.
            file = self.source.parent / file
        return Path(os.path.abspath(file))

    # -- [[printer]] --

    def printer(
        self,
        table: dict[str, Any],
        path: str,
        shared: dict[str, Any],
        shared_moonraker: dict[str, Any],
        names: dict[str, str],
    ) -> PrinterConfig | None:
        """Given one [[printer]] table, return it checked, or None if it has problems."""
        before = len(self.problems)
        # A misspelt key counts as written for the cross-checks below, so that
        # "vendorid" gives one message, not a second one about a missing vendor_id.
        written = set(table) | self.unknown_keys(table, path, _PRINTER_KEYS)
        values: dict[str, Any] = {}

        name = table.get("name", _MISSING)
        if isinstance(name, _Missing):
            self.problem(
                _key_path(path, "name"),
                'missing: every [[printer]] needs a unique name like "mk3s"',
            )
        elif not isinstance(name, str) or not _NAME_RE.fullmatch(name) or set(name) == {"."}:
            self.problem(
                _key_path(path, "name"),
                'expected a name of letters, digits, "_", "." and "-" like "mk3s",'
                f" got {_describe(name)}",
            )
        elif name in names:
            self.problem(_key_path(path, "name"), f'"{name}" is also the name of {names[name]}')
        else:
            names[name] = path
            values["name"] = name

        for key in ("vendor_id", "product_id"):
            if key in table:
                values[key] = self.usb_id(table[key], _key_path(path, key))
        self.optional(table, path, "serial", values, self.serial)
        self.optional(table, path, "usb_path", values, self.usb_path)
        self.optional(table, path, "port", values, self.port)
        self.optional(table, path, "baudrate", values, self.baudrate)
        self.optional(table, path, "profile", values, self.text)
        if "settle" in table:
            values["settle"] = self.seconds(
                table["settle"], _key_path(path, "settle"), 0.0, SETTLE_MAX
            )
        if "poll" in table:
            values["poll"] = self.poll(table["poll"], _key_path(path, "poll"))
        # A slow board (ModemManager holding a new ttyACM, OctoPrint 2.0's "Connecting"
        # that covers the firmware's greeting) needs longer than 20 s; under a second
        # would take every opening port for stuck.
        if "stuck_after" in table:
            values["stuck_after"] = self.seconds(
                table["stuck_after"], _key_path(path, "stuck_after"), 1.0, STUCK_AFTER_MAX
            )
        if "retry_first" in table:
            values["retry_first"] = self.seconds(
                table["retry_first"], _key_path(path, "retry_first"), 1.0, RETRY_MAX
            )
        if "retry_max" in table:
            values["retry_max"] = self.seconds(
                table["retry_max"], _key_path(path, "retry_max"), 1.0, RETRY_MAX
            )
        first = values.get("retry_first", PrinterConfig.retry_first)
        cap = values.get("retry_max", PrinterConfig.retry_max)
        if first is not None and cap is not None and cap < first:
            self.problem(
                _key_path(path, "retry_max"),
                f"must be at least retry_first ({first:g} s), got {cap:g}"
                + ("" if "retry_max" in table else " (the default)"),
            )

        # Cross-checks only for keys that are absent: a present but malformed
        # vendor_id has its own message already.
        if "vendor_id" not in written:
            if "port" not in written:
                self.problem(path, "needs vendor_id or port to know which device is this printer")
            for key in ("product_id", "serial", "usb_path"):
                if key in table:
                    self.problem(_key_path(path, key), "needs vendor_id as well")

        octoprint = self.own_host_values(table, path, "octoprint", shared, DEFAULT_URL)
        moonraker = self.own_host_values(
            table, path, "moonraker", shared_moonraker, DEFAULT_MOONRAKER_URL
        )
        klipper = isinstance(table.get("moonraker"), dict)
        if klipper and isinstance(table.get("octoprint"), dict):
            self.problem(
                path,
                "has both [printer.octoprint] and [printer.moonraker]: a printer is driven by "
                "OctoPrint or by Klipper (through Moonraker), keep one",
            )
        if klipper:
            for key in _OCTOPRINT_ONLY:
                if key in table:
                    self.problem(
                        _key_path(path, key),
                        f"does not apply to a Klipper printer ([printer.moonraker]): Klipper's "
                        f"own config sets the serial line; remove {key}",
                    )

        if len(self.problems) > before:
            return None
        fields = {key: value for key, value in values.items() if value is not None}
        if klipper:
            fields["moonraker"] = MoonrakerConfig(**moonraker)
        return PrinterConfig(octoprint=OctoPrintConfig(**octoprint), **fields)

    def own_host_values(
        self,
        table: dict[str, Any],
        path: str,
        kind: str,
        shared: dict[str, Any],
        example_url: str,
    ) -> dict[str, Any]:
        """Given a [[printer]] table, return its [printer.octoprint] (or
        [printer.moonraker]) values over the shared table's."""
        values = dict(shared)
        raw = table.get(kind, _MISSING)
        if isinstance(raw, dict):
            override = self.octoprint_values(raw, _key_path(path, kind), example_url)
            if any(key in raw for key in _KEY_SOURCES):
                # The key and where it comes from are one setting: a printer that
                # names its own key file must not also inherit an inline key (that
                # would be "both").
                for key in _KEY_SOURCES:
                    values.pop(key, None)
            values.update(override)
        elif not isinstance(raw, _Missing):
            self.problem(
                _key_path(path, kind), f"expected a table [printer.{kind}], got {_describe(raw)}"
            )
        return values

    def optional(
        self,
        table: dict[str, Any],
        path: str,
        key: str,
        values: dict[str, Any],
        check: Callable[[object, str], Any],
    ) -> None:
        if key in table:
            values[key] = check(table[key], _key_path(path, key))

    def usb_id(self, value: object, path: str) -> str | None:
        normalized = normalize_usb_id(value) if isinstance(value, str) else None
        if normalized is None:
            # A bare TOML number (vendor_id = 0x2c99) is the usual slip: say quotes.
            quoted = " in quotes" if not isinstance(value, str) else ""
            self.problem(path, f'expected 4 hex digits{quoted} like "2c99", got {_describe(value)}')
        return normalized

    def text(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and value.strip():
            return value
        self.problem(path, f"expected a non-empty string, got {_describe(value)}")
        return None

    def serial(self, value: object, path: str) -> str | None:
        text = self.text(value, path)
        if text is None:
            return None
        # Matched against udev's ID_SERIAL_SHORT, which never holds what udev
        # replaces: a serial written otherwise would never match any device.
        sanitised = udev_serial(text)
        if sanitised != text:
            self.problem(
                path,
                "udev reports a USB serial number with white space and every character but"
                ' letters, digits and "#+-.:=@_" replaced by "_" (as reconnectd devices'
                f" prints it): write {_describe(sanitised)}, got {_describe(text)}",
            )
            return None
        return text

    def usb_path(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and is_usb_path(value):
            return value
        self.problem(
            path,
            'expected a USB path without spaces as "reconnectd devices" prints it,'
            f' like "{USB_PATH_EXAMPLE}", got {_describe(value)}',
        )
        return None

    def port(self, value: object, path: str) -> str | None:
        if isinstance(value, str) and "\0" not in value:
            parts = PurePosixPath(value).parts
            if len(parts) > 2 and parts[:2] == ("/", "dev") and ".." not in parts:
                return value
        self.problem(
            path,
            f'expected an absolute path under /dev like "/dev/ttyACM0", got {_describe(value)}',
        )
        return None

    def baudrate(self, value: object, path: str) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.problem(path, f"expected an integer, got {_describe(value)}")
            return None
        if not BAUDRATE_MIN <= value <= BAUDRATE_MAX:
            self.problem(
                path,
                f"must be a serial speed between {BAUDRATE_MIN} and {BAUDRATE_MAX} bits per"
                f" second like 115200 or 250000, got {_describe(value)}",
            )
            return None
        return value

    def seconds(
        self,
        value: object,
        path: str,
        low: float,
        high: float,
        low_open: bool = False,
    ) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(path, f"expected a number of seconds, got {_describe(value)}")
            return None
        # Compare before converting: float() of a huge TOML integer overflows.
        too_low = value <= low if low_open else value < low
        if _is_nan(value) or too_low or value > high:
            lower = f"more than {low:g}" if low_open else f"at least {low:g}"
            self.problem(
                path, f"must be {lower} and at most {high:g} seconds, got {_describe(value)}"
            )
            return None
        return float(value)

    def poll(self, value: object, path: str) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.problem(path, f"expected a number of seconds, got {_describe(value)}")
            return None
        if value == 0:
            return 0.0
        if _is_nan(value) or value < POLL_MIN or value > POLL_MAX:
            self.problem(
                path,
                f"must be 0 (off) or between {POLL_MIN:g} and {POLL_MAX:g} seconds,"
                f" got {_describe(value)}",
            )
            return None
        return float(value)
