"""JSON files that other processes read while the daemon rewrites them.

The status file is read by ``reconnectd status`` at any moment, and the holds file
must survive a power cut mid-write; both are therefore replaced, never rewritten in
place: the new content goes to a temporary file in the same directory (a rename is
atomic only within one file system), is flushed to disk, and is renamed over the old.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import stat
import tempfile
from pathlib import Path


class JsonFileError(Exception):
    """A JSON file that is missing, unreadable or not JSON; the message says which.

    ``missing`` is true when the file does not exist, which callers often treat
    differently ("not running yet") from a broken file; ``unreadable`` when it exists
    but cannot be read (permissions, I/O), which says nothing about its content.
    """

    def __init__(
        self, path: Path, problem: str, *, missing: bool = False, unreadable: bool = False
    ) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.problem = problem
        self.missing = missing
        self.unreadable = unreadable


def write_json_atomic(path: Path, document: object, mode: int = 0o644) -> None:
    """Given a path and a JSON-serialisable document, replace the file atomically.

    A reader sees the old content or the new, never a mixture. The file gets exactly
    ``mode`` whatever the umask; a missing parent directory is created. Raise
    ``OSError`` if it cannot be written (the old file, if any, is then untouched and
    no temporary file is left); ``TypeError`` or ``ValueError`` if the document is
    not serialisable, before anything is written.
    """
    data = (json.dumps(document, indent=2, ensure_ascii=False) + "\n").encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    # The leading dot and the suffix keep a leftover (after a crash) out of globs
    # such as *.json, and make clear what it was.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with open(fd, "wb") as tmp:
            os.fchmod(tmp.fileno(), mode)
            tmp.write(data)
            tmp.flush()
            # Without this, a crash soon after the rename can leave an empty file
            # under the new name (ext4 delayed allocation).
            os.fsync(tmp.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Given a directory, flush its entries so that a rename in it survives a crash."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        # Some file systems refuse fsync on a directory (EINVAL); the rename has
        # happened, only its durability is less certain.
        pass
    finally:
        os.close(fd)


# Far more than any file of ours holds (a few hundred bytes per printer); a file this
# large is not ours, and reading it whole would cost the memory a Pi does not have.
MAX_BYTES = 4 << 20


def _read_regular_file(path: Path) -> bytes | None:
    """Given a path, return the content of the regular file there, at most MAX_BYTES
    and one more; None for anything else (a FIFO would block, /dev/zero never end)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with open(fd, "rb") as file:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return file.read(MAX_BYTES + 1)


def read_json(path: Path) -> object:
    """Given a path, return the JSON document it holds.

    Raise ``JsonFileError`` if the file is missing, cannot be read, or is not JSON
    (invalid UTF-8 included); its message names the file and the problem.
    """
    try:
        data = _read_regular_file(path)
    except FileNotFoundError:
        raise JsonFileError(path, "no such file", missing=True) from None
    except IsADirectoryError:
        raise JsonFileError(path, "is a directory, not a file", unreadable=True) from None
    except OSError as exc:
        raise JsonFileError(path, f"cannot read: {exc.strerror or exc}", unreadable=True) from None
    if data is None:
        raise JsonFileError(path, "is not a regular file", unreadable=True)
    if len(data) > MAX_BYTES:
        raise JsonFileError(path, f"is larger than {MAX_BYTES} bytes")
    if not data.strip():
        # Plainer than json's "Expecting value: line 1 column 1" for the same thing.
        raise JsonFileError(path, "is empty, not JSON")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise JsonFileError(path, f"not JSON: not valid UTF-8 at byte {exc.start}") from None
    except json.JSONDecodeError as exc:
        problem = f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        raise JsonFileError(path, problem) from None
    except RecursionError:
        # json's decoder recurses per nesting level: a hostile file need not be large.
        raise JsonFileError(path, "not JSON we can read: nested too deeply") from None
    except ValueError as exc:
        # Python 3.11+ refuses to turn over 4300 digits into an int (CVE-2020-10735).
        raise JsonFileError(path, f"not JSON we can read: {exc}") from None


def shown_value(value: object, limit: int = 40) -> str:
    """Given a value read from one of these files, return it as a message shows it.

    JSON's own spelling (``null``, ``true``, ``"text"``, ``NaN``), cut to about
    ``limit`` characters whatever the value: a huge integer is named rather than
    spelled out (Python 3.11+ refuses to), and a list or object too deep or too large
    to write back out is named by its kind.
    """
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if value.bit_length() <= 64 else "a huge integer"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "Infinity" if value > 0 else "-Infinity"
        return repr(value)
    if isinstance(value, str):
        cut = value[:limit]
        # json.dumps escapes quotes, controls and surrogates: the line stays one line.
        return json.dumps(cut) + ("…" if len(value) > len(cut) else "")
    kind = "a list" if isinstance(value, list) else "an object"
    try:
        text = json.dumps(value)
    except (ValueError, TypeError, RecursionError):
        return kind
    return text if len(text) <= limit else text[: limit - 1] + "…"
