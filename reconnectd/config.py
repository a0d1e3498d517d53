"""The configuration file: read it, check every value, and say plainly what is wrong.

Strict on purpose, like Klipper's configfile: an unknown key or a wrong type is an
error, never a silent default, because a typo in ``vendor_id`` would otherwise
leave a printer unwatched with nothing in the log to say why. Every problem in
the file is collected and reported at once, one line each, as
``FILE: key.path: what is wrong`` (contract: exit 78, no traceback), so that a
user fixes the whole file in one go instead of one error per restart.

The API key never appears in a message, a ``repr`` or a ``str``: it is only ever
reported by the name of the key that holds it.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
import stat
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, time
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlsplit

from reconnectd.devices import normalize_usb_id

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9 and 3.10 only
    import tomli as tomllib

DEFAULT_CONFIG_PATH = Path("/etc/reconnectd/reconnectd.toml")
CONFIG_ENV = "RECONNECTD_CONFIG"
ZERO_CONFIG_PRINTER = "printer"

DEFAULT_URL = "http://127.0.0.1:5000"
TIMEOUT_MAX = 60.0  # seconds; a longer request would starve the watchdog ping
SETTLE_MAX = 600.0
# Each attempt at a silent printer holds OctoPrint ~40 s, so polling faster than
# every 5 s would keep OctoPrint permanently busy connecting.
POLL_MIN = 5.0
# A day: longer is pointless for a fallback check, and a huge value would
# overflow the select() timeout computed from it.
POLL_MAX = 86400.0
# An API key is 32-43 characters; anything this large is the wrong file.
KEY_FILE_MAX_BYTES = 4096
# udev's ID_PATH of a device on port 2 of a hub on port 1 of an Intel xHCI.
USB_PATH_EXAMPLE = "pci-0000:00:14.0-usb-0:1.2:1.0"

_NAME_RE = re.compile(r"[A-Za-z0-9_.-]+")
_BARE_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


@dataclass(frozen=True)
class OctoPrintConfig:
    """How to reach one OctoPrint instance.

    ``api_key`` holds the key whether it was written inline or read from
    ``api_key_file`` (then ``api_key_file`` is the absolute path it came from).
    It is left out of ``repr`` so that logging a config cannot leak it.
    """

    url: str = DEFAULT_URL
    api_key: str | None = field(default=None, repr=False)
    api_key_file: Path | None = None
    timeout: float = 5.0


@dataclass(frozen=True)
class PrinterConfig:
    """One ``[[printer]]``: how to recognise its device and where its OctoPrint is."""

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


@dataclass(frozen=True)
class Config:
    """The whole configuration, checked and with every default filled in."""

    source: Path | None
    octoprint: OctoPrintConfig
    printers: tuple[PrinterConfig, ...]

    @property
    def zero_config(self) -> bool:
        """Given a config, return whether its printers come from the built-in board table."""
        return len(self.printers) == 1 and self.printers[0].known_boards


class ConfigError(Exception):
    """Every problem found in a configuration, one ``FILE: key.path: what`` line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)

    def __str__(self) -> str:
        return "\n".join(self.problems)


def zero_config(octoprint: OctoPrintConfig | None = None) -> tuple[PrinterConfig, ...]:
    """Given the shared OctoPrint, return the single printer that matches any known board."""
    return (
        PrinterConfig(
            name=ZERO_CONFIG_PRINTER,
            octoprint=octoprint if octoprint is not None else OctoPrintConfig(),
            known_boards=True,
        ),
    )


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

    A missing default file means zero-config. Raise :class:`ConfigError` if a named
    file is missing, if the file cannot be read, or if anything in it is wrong.
    """
    path, origin = _config_source(cli_path, os.environ if environ is None else environ)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        if origin is None:
            return Config(source=None, octoprint=OctoPrintConfig(), printers=zero_config())
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
    return parse_config(text, path)


def parse_config(text: str, source: Path) -> Config:
    """Given the text of a config file and its path, return the checked config.

    A relative ``api_key_file`` is relative to the directory of ``source``, and key
    files are read here. Raise :class:`ConfigError` listing every problem found.
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
    return _Checker(source).check(document)


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


def _redact_url(url: str) -> str:
    # A URL may carry a reverse proxy's password (http://user:pass@host/); a
    # regex rather than urlsplit, because the URL being shown may not parse.
    return re.sub(r"(//[^/@:]*:)[^/@]*@", r"\1***@", url)


# --- the checker -----------------------------------------------------------------


class _Missing:
    """The value of a key that is not in the file (distinct from any TOML value)."""


_MISSING = _Missing()

_OCTOPRINT_KEYS = ("url", "api_key", "api_key_file", "timeout")
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
)
_TOP_KEYS = ("octoprint", "printer")


class _Checker:
    """Walks a parsed TOML document, collecting every problem instead of stopping."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.problems: list[str] = []

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

        printers: list[PrinterConfig] = []
        raw_printers = document.get("printer", _MISSING)
        if isinstance(raw_printers, list):
            names: dict[str, str] = {}
            for index, raw in enumerate(raw_printers):
                path = f"printer[{index}]"
                if not isinstance(raw, dict):
                    self.problem(path, f"expected a table [[printer]], got {_describe(raw)}")
                    continue
                printer = self.printer(raw, path, shared_values, names)
                if printer is not None:
                    printers.append(printer)
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
        if isinstance(raw_printers, _Missing) or not raw_printers:
            # Contract: with no [[printer]], every known board is a printer of the
            # single [octoprint].
            return Config(source=self.source, octoprint=shared, printers=zero_config(shared))
        return Config(source=self.source, octoprint=shared, printers=tuple(printers))

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

    def octoprint_values(self, table: dict[str, Any], path: str) -> dict[str, Any]:
        """Given one OctoPrint table, return the fields it sets, checked (problems noted)."""
        self.unknown_keys(table, path, _OCTOPRINT_KEYS)
        values: dict[str, Any] = {}
        if "url" in table:
            url = self.url(table["url"], _key_path(path, "url"))
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
        has_key, has_file = "api_key" in table, "api_key_file" in table
        if has_key and has_file:
            self.problem(path, "api_key and api_key_file are both set; keep one")
        elif has_key:
            key = self.api_key(table["api_key"], _key_path(path, "api_key"))
            if key is not None:
                values["api_key"], values["api_key_file"] = key, None
        elif has_file:
            loaded = self.api_key_file(table["api_key_file"], _key_path(path, "api_key_file"))
            if loaded is not None:
                values["api_key_file"], values["api_key"] = loaded
        return values

    def url(self, value: object, path: str) -> str | None:
        expected = f'expected an http:// or https:// URL with a host like "{DEFAULT_URL}"'
        if not isinstance(value, str):
            self.problem(path, f"{expected}, got {_describe(value)}")
            return None
        try:
            parts = urlsplit(value)
            # .port raises ValueError for a port that is not a number in 1-65535.
            valid = (
                parts.scheme.lower() in ("http", "https")
                and bool(parts.hostname)
                and (parts.port is None or parts.port > 0)
                and not parts.query
                and not parts.fragment
                and not any(c.isspace() or not c.isprintable() for c in value)
            )
        except ValueError:
            valid = False
        if not valid:
            self.problem(path, f"{expected}, got {_describe(_redact_url(value))}")
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
        if not isinstance(value, str) or not value or "\0" in value:
            self.problem(
                path,
                'expected the path of a file holding the key like "/etc/reconnectd/octoprint.key",'
                f" got {_describe(value)}",
            )
            return None
        file = Path(value)
        if not file.is_absolute():
            # Relative to the config file, not to whatever directory the daemon
            # was started from.
            file = self.source.parent / file
        file = Path(os.path.abspath(file))
        try:
            # A FIFO or a terminal would block the daemon on open or read.
            if not stat.S_ISREG(file.stat().st_mode):
                self.problem(path, f'"{file}" is not a regular file')
                return None
            with file.open("rb") as handle:
                data = handle.read(KEY_FILE_MAX_BYTES + 1)
        except OSError as exc:
            self.problem(path, f'cannot read "{file}": {_os_reason(exc)}')
            return None
        if len(data) > KEY_FILE_MAX_BYTES:
            self.problem(
                path, f'"{file}" is larger than {KEY_FILE_MAX_BYTES} bytes: not a key file'
            )
            return None
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            self.problem(path, f'"{file}" is not UTF-8 text')
            return None
        key = self.key_text(text.strip(), path, f'"{file}" is empty')
        return None if key is None else (file, key)

    # -- [[printer]] --

    def printer(
        self,
        table: dict[str, Any],
        path: str,
        shared: dict[str, Any],
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
        self.optional(table, path, "serial", values, self.text)
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

        # Cross-checks only for keys that are absent: a present but malformed
        # vendor_id has its own message already.
        if "vendor_id" not in written:
            if "port" not in written:
                self.problem(path, "needs vendor_id or port to know which device is this printer")
            for key in ("product_id", "serial", "usb_path"):
                if key in table:
                    self.problem(_key_path(path, key), "needs vendor_id as well")

        octoprint = dict(shared)
        raw = table.get("octoprint", _MISSING)
        if isinstance(raw, dict):
            override = self.octoprint_values(raw, _key_path(path, "octoprint"))
            if "api_key" in raw or "api_key_file" in raw:
                # The key and its file are one setting: a printer that names its own
                # key file must not also inherit an inline key (that would be "both").
                octoprint.pop("api_key", None)
                octoprint.pop("api_key_file", None)
            octoprint.update(override)
        elif not isinstance(raw, _Missing):
            self.problem(
                _key_path(path, "octoprint"),
                f"expected a table [printer.octoprint], got {_describe(raw)}",
            )

        if len(self.problems) > before:
            return None
        fields = {key: value for key, value in values.items() if value is not None}
        return PrinterConfig(octoprint=OctoPrintConfig(**octoprint), **fields)

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
        if value <= 0:
            self.problem(path, f"must be a positive integer, got {_describe(value)}")
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
