"""`sudo reconnectd check` judges the files the service reads with the service's rights."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconnectd import cli, service_access
from reconnectd.service_access import ServiceUser, service_user, unreadable

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown files")

NOBODY = pwd.getpwnam("nobody")


@pytest.fixture
def tmp_path() -> Iterator[Path]:
    """A scratch directory every user may enter (pytest's own are 0700 under root's)."""
    scratch = Path(tempfile.mkdtemp(prefix="reconnectd-access-", dir="/tmp"))
    scratch.chmod(0o755)
    yield scratch
    shutil.rmtree(scratch)


USER = ServiceUser("nobody", NOBODY.pw_uid, NOBODY.pw_gid, frozenset({NOBODY.pw_gid}))


def key_file(tmp_path: Path, mode: int, gid: int = 0) -> Path:
    tmp_path.chmod(0o755)
    key = tmp_path / "octoprint.key"
    key.write_text("K3Y\n")
    os.chown(key, 0, gid)
    key.chmod(mode)
    return key


def test_a_key_only_root_may_read_is_named_with_the_fix(tmp_path: Path) -> None:
    key = key_file(tmp_path, 0o600)
    [line] = unreadable([key], USER)
    assert line.startswith(f"{key}: the service user nobody cannot read it: owner root:root")
    assert line.endswith(f"mode 0600; fix: chgrp nogroup {key}; chmod 640 {key}")


@pytest.mark.parametrize(("mode", "gid"), [(0o640, NOBODY.pw_gid), (0o644, 0)])
def test_a_key_its_group_or_everyone_may_read_passes(tmp_path: Path, mode: int, gid: int) -> None:
    assert unreadable([key_file(tmp_path, mode, gid)], USER) == []


def test_a_directory_it_may_not_enter_is_named(tmp_path: Path) -> None:
    key = key_file(tmp_path, 0o644)
    tmp_path.chmod(0o700)
    [line] = unreadable([key], USER)
    assert f"it may not enter {tmp_path} (owner root:root, mode 0700)" in line


def test_the_unit_names_the_user(tmp_path: Path) -> None:
    unit = tmp_path / "reconnectd.service"
    unit.write_text("[Service]\nUser=nobody\nGroup=nogroup\n")
    found = service_user(unit)
    assert found is not None and (found.name, found.uid) == ("nobody", NOBODY.pw_uid)
    unit.write_text("[Service]\nExecStart=/usr/local/bin/reconnectd run\n")
    assert service_user(unit) is None, "no User=: root runs it"
    assert service_user(tmp_path / "absent.service") is None


def test_sudo_check_fails_for_a_key_the_service_cannot_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    unit = tmp_path / "reconnectd.service"
    unit.write_text("[Service]\nUser=nobody\n")
    monkeypatch.setattr(service_access, "UNIT", unit)
    key = key_file(tmp_path, 0o600)
    config = tmp_path / "reconnectd.toml"
    config.write_text(
        f'[octoprint]\napi_key_file = "{key}"\n\n[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\n'
    )
    config.chmod(0o644)
    assert cli.main(["-c", str(config), "check"]) == 78
    err = capsys.readouterr().err
    assert f"{key}: the service user nobody cannot read it" in err
    assert f"fix: chgrp nogroup {key}; chmod 640 {key}" in err
    os.chown(key, 0, NOBODY.pw_gid)
    key.chmod(0o640)
    assert cli.main(["-c", str(config), "check"]) == 0
