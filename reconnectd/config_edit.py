"""Point reconnectd's config at the key file that ``reconnectd login`` stored.

The config is edited as text, line by line, so the user's comments and layout
survive; the edited text must parse to exactly the old document with only that one
setting changed, and must load with no problem the old file did not have, before it
replaces the old file. Otherwise the file is left alone and the line to add is
printed.

Which table is edited follows the URL that login asked: ``[octoprint]`` when it is
that table's URL (or there is no file yet), else the one ``[printer.octoprint]``
with that URL. A table that reads the key from a systemd credential is left alone;
a missing config is written afresh with only an ``[octoprint]`` table.
"""

from __future__ import annotations

import copy
import errno
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from reconnectd.config import DEFAULT_URL, ConfigError, load_config, toml_string
from reconnectd.login import (
    APP_NAME,
    MANUAL_PLACE,
    SERVICE_USER,
    replace_atomically,
    service_owner,
    write_temp,
)
from reconnectd.urls import shown_url

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.9 and 3.10 only
    import tomli as tomllib

# The key file's name beside the config when the table names none.
KEY_FILE_NAME = "octoprint.key"


# -- the config ------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigFile:
    """The config file as found: its text and document, or why it cannot be used.

    ``text`` is None when there is no file yet; ``document`` is None when there is
    no file or it is not TOML (``problem`` then says why).
    """

    path: Path
    text: str | None
    document: dict[str, Any] | None
    problem: str | None = None


@dataclass(frozen=True)
class Table:
    """The table of the config that says how to reach one OctoPrint.

    ``printer`` is the index of the ``[[printer]]`` whose ``[printer.octoprint]`` it
    is, or None for ``[octoprint]``; ``key_file`` the ``api_key_file`` it names now,
    ``credential`` its ``api_key_credential``, and ``ca_file`` the CA bundle that
    OctoPrint's https URL is verified against (its own or inherited).
    """

    printer: int | None
    name: str
    key_file: Path | None = None
    has_inline_key: bool = False
    credential: str | None = None
    ca_file: Path | None = None


@dataclass(frozen=True)
class NoTable:
    """No single table of the config can be pointed at the key: why, and what to add."""

    reason: str
    advice: str


@dataclass(frozen=True)
class ConfigOutcome:
    """What became of the config, and a message saying so.

    ``ok``: the config reads the key from where it was stored, or needs nothing
    done; else the message says which line to add where.
    """

    ok: bool
    message: str


def read_config(path: Path) -> ConfigFile:
    """Given the config path, return the file's text and document (or why not).

    Never raises: a missing file is ``text`` None, anything else a ``problem``.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ConfigFile(path, None, None)
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        return ConfigFile(path, None, None, f"{path}: cannot read the file: {reason}")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return ConfigFile(path, None, None, f"{path}: not UTF-8 text")
    try:
        document = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError) as exc:
        return ConfigFile(path, text, None, f"{path}: not valid TOML: {exc}")
    return ConfigFile(path, text, document)


def configured_url(config: ConfigFile) -> str:
    """Given the config file, return the URL of its ``[octoprint]`` (the default if unset)."""
    shared = (config.document or {}).get("octoprint")
    url = shared.get("url") if isinstance(shared, dict) else None
    return url.rstrip("/") if isinstance(url, str) else DEFAULT_URL


def find_table(config: ConfigFile, url: str) -> Table | NoTable:
    """Given the config file and a URL, return the one table to point at the key.

    That is ``[octoprint]`` when the URL is its URL (or there is no file yet), else
    the one ``[printer.octoprint]`` whose ``url`` it is. Return :class:`NoTable` if
    the file cannot be read, or no table or several tables have that URL.
    """
    path = config.path
    line_for_shared = f"in the [octoprint] table of {path}"
    if config.problem is not None:
        return NoTable(config.problem, line_for_shared)
    document = config.document
    if document is None:
        return Table(None, "[octoprint]")
    shared = document.get("octoprint", {})
    if not isinstance(shared, dict):
        return NoTable(f"{path}: octoprint is not a table", line_for_shared)
    if _same_url(url, configured_url(config)):
        return _table(config, None, "[octoprint]", shared, shared)
    matches: list[tuple[int, str, dict[str, Any]]] = []
    printers = document.get("printer", [])
    for index, printer in enumerate(printers if isinstance(printers, list) else []):
        own = printer.get("octoprint") if isinstance(printer, dict) else None
        if isinstance(own, dict) and isinstance(own.get("url"), str) and _same_url(url, own["url"]):
            name = printer.get("name")
            matches.append((index, name if isinstance(name, str) else f"#{index + 1}", own))
    # Shown with a password in it masked: these are messages, not the file's text.
    shown = toml_string(shown_url(url))
    advice = (
        f"in the [printer.octoprint] table of the printer that uses this OctoPrint in {path}"
        f" (with url = {shown})"
    )
    if not matches:
        return NoTable(
            f"no table of {path} has url = {shown}"
            f" ([octoprint] has {toml_string(shown_url(configured_url(config)))})",
            advice,
        )
    if len(matches) > 1:
        names = ", ".join(f'"{name}"' for _, name, _ in matches)
        return NoTable(
            f"several [printer.octoprint] tables of {path} have url = {shown} (printers {names})",
            f"in each of those tables in {path}",
        )
    index, name, own = matches[0]
    return _table(config, index, f'[printer.octoprint] of printer "{name}"', own, shared)


def _table(
    config: ConfigFile,
    printer: int | None,
    name: str,
    table: dict[str, Any],
    shared: dict[str, Any],
) -> Table:
    credential = table.get("api_key_credential")
    ca_file = table.get("ca_file", shared.get("ca_file"))
    return Table(
        printer,
        name,
        key_file=_named_file(config, table.get("api_key_file")),
        has_inline_key="api_key" in table,
        credential=credential if isinstance(credential, str) else None,
        ca_file=_named_file(config, ca_file),
    )


def default_key_file(config: ConfigFile, table: Table | NoTable, url: str) -> Path:
    """Given the config, its table for the URL and the URL, return where the key goes.

    The file the table names already; else ``octoprint.key`` beside the config for
    ``[octoprint]``, ``NAME.key`` for a printer's own OctoPrint (never the shared
    file: that holds another OctoPrint's key), and for a URL no table names,
    ``octoprint.key`` unless a table uses that file already.
    """
    directory = Path(os.path.abspath(config.path)).parent
    if isinstance(table, Table):
        if table.key_file is not None:
            return table.key_file
        if table.printer is None:
            return directory / KEY_FILE_NAME
        name = _printer_name(config, table.printer)
        return directory / f"{name}.key"
    shared = directory / KEY_FILE_NAME
    if shared not in _all_key_files(config):
        return shared
    port = urlsplit(url).port or (443 if url.lower().startswith("https:") else 80)
    return directory / f"octoprint-{port}.key"


def point_config(
    config: ConfigFile, table: Table | NoTable, key_file: Path, url: str
) -> ConfigOutcome:
    """Given the config, the table for the URL and the stored key file, point the config at it.

    Edit the text line by line (comments survive), check that it parses to the old
    document with only ``api_key_file`` set (and an inline ``api_key`` gone) in that
    table, write it beside the config with the old mode and owner, load it with the
    daemon's loader, and replace the config only if it has no problem the old file
    did not have. A missing file is created. Return what was done, or why nothing was
    and the exact line to add where: never raises for the file's content.
    """
    line = f"api_key_file = {toml_string(str(key_file))}"
    if isinstance(table, NoTable):
        return ConfigOutcome(
            False,
            f"{config.path} was not changed: {table.reason}.\n"
            f"To use the key, add this line {table.advice}:\n    {line}",
        )
    manual = (
        f"To use the key, add this line to the {table.name} table of {config.path}"
        + (" (and remove its api_key line)" if table.has_inline_key else "")
        + f":\n    {line}"
    )
    unsafe = (
        f"{config.path} was not changed: its {table.name} table is not written in a way"
        f" this command can edit safely.\n{manual}"
    )
    if table.credential is not None:
        # The key reaches the daemon through systemd, from whatever file the unit's
        # LoadCredential= names: pointing the config elsewhere would bypass that.
        return ConfigOutcome(
            True,
            f"{config.path} was left as it is: its {table.name} table reads the key from"
            f' the systemd credential "{table.credential}". The unit needs'
            f" LoadCredential={table.credential}:{key_file} (systemctl edit reconnectd),"
            " then a restart.",
        )
    if table.key_file == key_file and not table.has_inline_key:
        return ConfigOutcome(True, f"{config.path} already reads the key from {key_file}.")
    if config.text is None:
        new_text = (
            "# reconnectd configuration, written by reconnectd login.\n"
            "# The commented example: reconnectd/example.toml in the package.\n\n"
            f"[octoprint]\nurl = {toml_string(url)}\n{line}\n"
        )
        expected: dict[str, Any] = {"octoprint": {"url": url, "api_key_file": str(key_file)}}
    else:
        assert config.document is not None
        edited = edit_text(config.text, table.printer, str(key_file))
        expected = _expected_document(config.document, table.printer, str(key_file))
        if edited is None:
            return ConfigOutcome(False, unsafe)
        new_text = edited
    try:
        parsed = tomllib.loads(new_text)
    except (tomllib.TOMLDecodeError, RecursionError, ValueError):
        parsed = None
    if parsed != expected:
        return ConfigOutcome(False, unsafe)
    return _replace_config(config, new_text, manual, table)


def manual_steps(key_file: Path, table: Table | NoTable, config_path: Path) -> str:
    """Given where the key goes, return how to copy a key from OctoPrint by hand."""
    quoted = shlex.quote(str(key_file))
    steps = [
        f"Copy a key by hand instead: in OctoPrint open {MANUAL_PLACE}, generate a key"
        f' for "{APP_NAME}" and copy it. Then write it to the key file with',
        f"    sudo sh -c {shlex.quote(f'umask 077 && cat > {quoted}')}",
        "paste the key, press Enter and then Ctrl-D.",
    ]
    if service_owner(SERVICE_USER) is not None:
        steps.append(f"Let the service read it: sudo chown {SERVICE_USER}: {quoted}")
    where = table.name if isinstance(table, Table) else "[octoprint]"
    steps.append(
        f"Point the config at it: api_key_file = {toml_string(str(key_file))}"
        f" in the {where} table of {config_path}."
    )
    return "\n".join(steps)


def _replace_config(config: ConfigFile, new_text: str, manual: str, table: Table) -> ConfigOutcome:
    path = config.path
    real = Path(os.path.realpath(path))
    try:
        if config.text is None:
            real.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            mode, owner = 0o644, None
        else:
            info = real.stat()
            mode = info.st_mode & 0o7777
            same = info.st_uid == os.geteuid() and info.st_gid == os.getegid()
            owner = None if same else (info.st_uid, info.st_gid)
        temp = write_temp(real, new_text.encode(), mode, owner)
    except OSError as exc:
        return ConfigOutcome(False, f"{path} was not changed: {_os_reason(exc)}.\n{manual}")
    try:
        after = _problems(temp, real)
        before = [] if config.text is None else _problems(real, real)
        new_problems = [p for p in after if p not in before]
        if new_problems:
            temp.unlink(missing_ok=True)
            shown = "\n".join(f"    {p}" for p in new_problems)
            return ConfigOutcome(
                False,
                f"{path} was not changed: the edited file would not load:\n{shown}\n{manual}",
            )
        replace_atomically(temp, real)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        return ConfigOutcome(False, f"{path} was not changed: {_os_reason(exc)}.\n{manual}")
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    verb = "Wrote" if config.text is None else "Updated"
    removed = " (its api_key line is gone)" if table.has_inline_key else ""
    message = f"{verb} {path}: the {table.name} table reads the key from the file{removed}."
    if after:
        message += f"\n{path} still has other problems; reconnectd check lists them."
    return ConfigOutcome(True, message)


def _problems(file: Path, shown_as: Path) -> list[str]:
    """Given a config file, return its problems as for ``shown_as`` (empty: it loads)."""
    try:
        load_config(str(file), {})
    except ConfigError as error:
        prefix, shown = f"{file}:", f"{shown_as}:"
        return [shown + p[len(prefix) :] if p.startswith(prefix) else p for p in error.problems]
    return []


def _os_reason(exc: OSError) -> str:
    if exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return str(exc) or errno.errorcode.get(exc.errno or 0, "error")


def _expected_document(
    document: dict[str, Any], printer: int | None, key_file: str
) -> dict[str, Any]:
    expected = copy.deepcopy(document)
    if printer is None:
        table = expected.setdefault("octoprint", {})
    else:
        table = expected["printer"][printer]["octoprint"]
    table.pop("api_key", None)
    table["api_key_file"] = key_file
    return expected


# -- editing TOML as text ----------------------------------------------------------

_HEADER = re.compile(r"^[ \t]*(\[\[?)[ \t]*([^\[\]#]+?)[ \t]*(\]\]?)[ \t]*(?:#.*)?$")
_COMMENTED_HEADER = re.compile(r"^[ \t]*#[ \t]*\[")
_KEY_LINE = r"^[ \t]*{}[ \t]*="
# A key, a one-line string value and what follows it: the comment to keep.
_STRING_VALUE = re.compile(r"""^[ \t]*[A-Za-z_]+[ \t]*=[ \t]*(?:"(?:[^"\\]|\\.)*"|'[^']*')(.*)$""")


def edit_text(text: str, printer: int | None, key_file: str) -> str | None:
    """Given config text, set ``api_key_file`` in one table and drop its ``api_key`` line.

    ``printer`` None means ``[octoprint]`` (appended if the file has none), else the
    ``[printer.octoprint]`` of that ``[[printer]]``. An existing ``api_key_file`` or
    ``api_key`` line is replaced in place, keeping its comment; otherwise the line
    goes after a commented-out ``#api_key_file`` example, after ``url``, or after
    the header. Return None if the table's header cannot be found (an inline table,
    dotted keys): the caller then checks the result by parsing it anyway.
    """
    lines = text.splitlines(keepends=True)
    newline = "\r\n" if "\r\n" in text else "\n"
    headers = _headers(lines)
    body = _table_body(headers, len(lines), printer)
    setting = f"api_key_file = {toml_string(key_file)}"
    if body is None:
        if printer is not None or any(name == "octoprint" for _, _, name in headers):
            return None
        if lines and not lines[-1].endswith(("\n", "\r")):
            lines[-1] += newline
        gap = [newline] if lines else []
        return "".join([*lines, *gap, f"[octoprint]{newline}", f"{setting}{newline}"])
    start, end = body
    file_at = _find(lines, start, end, "api_key_file")
    key_at = _find(lines, start, end, "api_key")
    if file_at is not None or key_at is not None:
        at = file_at if file_at is not None else key_at
        assert at is not None
        lines[at] = _rewritten(lines[at], setting, newline)
        if file_at is not None and key_at is not None:
            del lines[key_at]
        return "".join(lines)
    at = _insertion_point(lines, start, end)
    indent = _indent(lines[at - 1]) if at > start else ""
    lines.insert(at, f"{indent}{setting}{newline}")
    if at > 0 and not lines[at - 1].endswith(("\n", "\r")):
        lines[at - 1] += newline
    return "".join(lines)


def _headers(lines: list[str]) -> list[tuple[int, bool, str]]:
    """Given the lines, return each table header: line index, whether [[array]], name."""
    found = []
    for index, line in enumerate(lines):
        match = _HEADER.match(line.rstrip("\r\n"))
        if match and (match[1] == "[[") == (match[3] == "]]"):
            parts = [part.strip().strip("\"'") for part in match[2].split(".")]
            found.append((index, match[1] == "[[", ".".join(parts)))
    return found


def _table_body(
    headers: list[tuple[int, bool, str]], count: int, printer: int | None
) -> tuple[int, int] | None:
    """Given the headers, return the line range of the table's keys, or None if absent."""
    wanted: int | None = None
    if printer is None:
        wanted = next(
            (i for i, (_, array, name) in enumerate(headers) if not array and name == "octoprint"),
            None,
        )
    else:
        arrays = [i for i, (_, array, name) in enumerate(headers) if array and name == "printer"]
        if printer >= len(arrays):
            return None
        for i in range(arrays[printer] + 1, len(headers)):
            _, array, name = headers[i]
            if array or not name.startswith("printer."):
                break
            if name == "printer.octoprint":
                wanted = i
                break
    if wanted is None:
        return None
    end = headers[wanted + 1][0] if wanted + 1 < len(headers) else count
    return headers[wanted][0] + 1, end


def _find(lines: list[str], start: int, end: int, key: str) -> int | None:
    pattern = re.compile(_KEY_LINE.format(re.escape(key)))
    return next((i for i in range(start, end) if pattern.match(lines[i])), None)


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip(" \t"))]


def _rewritten(line: str, setting: str, newline: str) -> str:
    indent = _indent(line)
    match = _STRING_VALUE.match(line.rstrip("\r\n"))
    rest = match[1] if match and re.fullmatch(r"[ \t]*(#.*)?", match[1]) else ""
    return f"{indent}{setting}{rest.rstrip()}{newline}"


def _insertion_point(lines: list[str], start: int, end: int) -> int:
    """Given a table's line range, return where a new key line reads best."""
    example = re.compile(r"^[ \t]*#[ \t]*api_key_file[ \t]*=")
    for i in range(start, end):
        if _COMMENTED_HEADER.match(lines[i]):
            break
        if example.match(lines[i]):
            return i + 1
    url_at = _find(lines, start, end, "url")
    if url_at is not None:
        return url_at + 1
    return start


def _same_url(a: str, b: str) -> bool:
    return _normal_url(a) == _normal_url(b)


def _normal_url(url: str) -> str:
    try:
        parts = urlsplit(url.strip())
    except ValueError:
        return url
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}{parts.path.rstrip('/')}"


def _named_file(config: ConfigFile, value: object) -> Path | None:
    if not isinstance(value, str) or not value or "\0" in value:
        return None
    file = Path(value)
    if not file.is_absolute():
        file = Path(os.path.abspath(config.path)).parent / file
    return Path(os.path.abspath(file))


def _all_key_files(config: ConfigFile) -> set[Path]:
    document = config.document or {}
    tables = [document.get("octoprint")]
    printers = document.get("printer")
    for printer in printers if isinstance(printers, list) else []:
        tables.append(printer.get("octoprint") if isinstance(printer, dict) else None)
    files = {_named_file(config, t.get("api_key_file")) for t in tables if isinstance(t, dict)}
    return {f for f in files if f is not None}


def _printer_name(config: ConfigFile, index: int) -> str:
    printer = (config.document or {})["printer"][index]
    name = printer.get("name")
    if isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9_.-]*", name):
        return name
    return f"printer{index + 1}"
