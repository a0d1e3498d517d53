"""What the service may read: ``sudo reconnectd check`` judges with the service's rights.

Run as root, ``check`` can read every file, so a key file only root may read
(root:root 0600, as an editor or ``cp`` as root leaves it) passed the check and then
failed the service, which runs as its own user (the unit's ``User=``). Here each file
the service reads is judged as that user: the file's mode for its owner, group or
others, and search permission on every directory above it.
"""

from __future__ import annotations

import grp
import os
import pwd
import shlex
import stat
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from reconnectd.config import Config

UNIT = Path("/etc/systemd/system/reconnectd.service")


@dataclass(frozen=True)
class ServiceUser:
    """The user the installed unit runs the daemon as, with its groups."""

    name: str
    uid: int
    gid: int  # its own group: the one to hand a file to
    gids: frozenset[int]


def service_user(unit: Path | None = None) -> ServiceUser | None:
    """Given the installed unit (default :data:`UNIT`), return its ``User=`` with its
    groups; None without a unit, a ``User=`` line, or such a user (then root runs it,
    and may read anything)."""
    try:
        lines = (UNIT if unit is None else unit).read_text().splitlines()
    except OSError:
        return None
    names = [line.split("=", 1)[1].strip() for line in lines if line.startswith("User=")]
    if not names:
        return None
    try:
        entry = pwd.getpwnam(names[-1])
    except KeyError:
        return None
    gids = {entry.pw_gid, *(g.gr_gid for g in grp.getgrall() if entry.pw_name in g.gr_mem)}
    return ServiceUser(entry.pw_name, entry.pw_uid, entry.pw_gid, frozenset(gids))


def files_read(config: Config) -> list[Path]:
    """Given a config, return every file the service reads: the config itself, key
    files and CA bundles (credentials are read by systemd, as root)."""
    files: list[Path] = [] if config.source is None else [config.source]
    hosts = [config.octoprint, config.moonraker]
    for printer in config.printers:
        hosts += [printer.octoprint] + ([printer.moonraker] if printer.moonraker else [])
    for host in hosts:
        files += [f for f in (host.api_key_file, host.ca_file) if f is not None]
    return list(dict.fromkeys(files))


def unreadable(files: Iterable[Path], user: ServiceUser) -> list[str]:
    """Given files and the service's user, return one line per file that user cannot
    read, naming what stops it and the fix."""
    problems = []
    for file in files:
        problem = _blocked(file, user)
        if problem is not None:
            problems.append(f"{file}: the service user {user.name} cannot read it: {problem}")
    return problems


def _blocked(file: Path, user: ServiceUser) -> str | None:
    for directory in reversed(file.parents):
        try:
            status = directory.stat()
        except OSError:
            return None  # reading the file itself says what is wrong
        if not _may(status, user, stat.S_IXUSR, stat.S_IXGRP, stat.S_IXOTH):
            return (
                f"it may not enter {directory} ({_owner(status)}, mode "
                f"{stat.S_IMODE(status.st_mode):04o}); fix: chmod o+x {shlex.quote(str(directory))}"
            )
    try:
        status = file.stat()
    except OSError:
        return None
    if _may(status, user, stat.S_IRUSR, stat.S_IRGRP, stat.S_IROTH):
        return None
    quoted = shlex.quote(str(file))
    group = _group(user.gid)
    return (
        f"{_owner(status)}, mode {stat.S_IMODE(status.st_mode):04o}; "
        f"fix: chgrp {group} {quoted}; chmod 640 {quoted}"
    )


def _may(status: os.stat_result, user: ServiceUser, owner: int, group: int, other: int) -> bool:
    if user.uid == 0:
        return True
    if status.st_uid == user.uid:
        return bool(status.st_mode & owner)
    if status.st_gid in user.gids:
        return bool(status.st_mode & group)
    return bool(status.st_mode & other)


def _owner(status: os.stat_result) -> str:
    try:
        owner = pwd.getpwuid(status.st_uid).pw_name
    except KeyError:
        owner = str(status.st_uid)
    return f"owner {owner}:{_group(status.st_gid)}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)
