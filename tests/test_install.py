"""The installer, run for real into a scratch root: what it lays down, and that the
installed unit passes `systemd-analyze verify`. Nothing is started there."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reconnectd import __version__

REPO = Path(__file__).resolve().parents[1]


def install(root: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ROOT=str(root))
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        ["bash", str(REPO / "systemd" / "install")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def bare_system(root: Path) -> None:
    """Given an empty dir, give it the account files of a system with only root."""
    etc = root / "etc"
    etc.mkdir(parents=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (etc / "group").write_text("root:x:0:\n")
    (etc / "shadow").write_text("root:*:19000:0:99999:7:::\n")
    (etc / "gshadow").write_text("root:*::\n")
    for name in ("shadow", "gshadow"):
        (etc / name).chmod(0o640)


def account(root: Path, file: str, name: str) -> list[str] | None:
    for line in (root / "etc" / file).read_text().splitlines():
        fields = line.split(":")
        if fields[0] == name:
            return fields
    return None


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    bare_system(root)
    done = install(root)
    assert done.returncode == 0, done.stderr
    assert "wrote the example config" in done.stdout
    assert "made the system user reconnectd" in done.stdout
    return root


def test_installs_venv_command_unit_and_example_config(installed: Path) -> None:
    command = installed / "usr/local/bin/reconnectd"
    assert os.readlink(command) == "/opt/reconnectd/bin/reconnectd"
    real = installed / "opt/reconnectd/bin/reconnectd"
    version = subprocess.run([str(real), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"reconnectd {__version__}"
    # The system's Python, whatever is first on PATH: the service user must reach it.
    if Path("/usr/bin/python3").exists():
        python = installed / "opt/reconnectd/bin/python"
        assert os.path.realpath(python) == os.path.realpath("/usr/bin/python3")
    unit = installed / "etc/systemd/system/reconnectd.service"
    assert unit.read_text() == (REPO / "systemd/reconnectd.service").read_text()
    config = installed / "etc/reconnectd/reconnectd.toml"
    assert config.read_text() == (REPO / "reconnectd/example.toml").read_text()
    assert config.stat().st_mode & 0o777 == 0o640
    checked = subprocess.run(
        [str(real), "--config", str(config), "check"], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0, checked.stderr


def test_installed_unit_passes_systemd_analyze_verify(installed: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.fail("systemd-analyze is missing (tests/bootstrap installs systemd)")
    unit = (installed / "etc/systemd/system/reconnectd.service").read_text()
    # verify checks that ExecStart exists on this host: point it at the installed copy.
    real = installed / "opt/reconnectd/bin/reconnectd"
    assert "ExecStart=/usr/local/bin/reconnectd run" in unit
    checked_unit = tmp_path / "reconnectd.service"
    checked_unit.write_text(unit.replace("/usr/local/bin/reconnectd", str(real)))
    done = subprocess.run(
        ["systemd-analyze", "verify", str(checked_unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "reconnectd.service" not in done.stderr, done.stderr


def test_running_it_again_upgrades_in_place_and_keeps_the_config(installed: Path) -> None:
    config = installed / "etc/reconnectd/reconnectd.toml"
    config.write_text('[[printer]]\nname = "mine"\nvendor_id = "2c99"\n')
    done = install(installed)
    assert done.returncode == 0, done.stderr
    assert "kept the existing config" in done.stdout
    assert config.read_text() == '[[printer]]\nname = "mine"\nvendor_id = "2c99"\n'


def test_makes_the_service_user_and_gives_it_the_config_by_group(installed: Path) -> None:
    user = account(installed, "passwd", "reconnectd")
    group = account(installed, "group", "reconnectd")
    assert user is not None and group is not None
    assert user[3] == group[2], "its primary group is its own"
    assert user[5:] == ["/nonexistent", "/usr/sbin/nologin"]
    assert 100 <= int(user[2]) < 1000, "a system uid"
    gid = int(group[2])
    etc = installed / "etc/reconnectd"
    assert (etc.stat().st_gid, etc.stat().st_mode & 0o777) == (gid, 0o750)
    config = etc / "reconnectd.toml"
    assert (config.stat().st_uid, config.stat().st_gid) == (0, gid)


def test_an_upgrade_from_a_root_service_hands_its_keys_to_the_group(installed: Path) -> None:
    etc = installed / "etc/reconnectd"
    key = etc / "octoprint.key"
    key.write_text("K" * 32 + "\n")
    key.chmod(0o600)
    os.chown(key, 0, 0)
    done = install(installed)
    assert done.returncode == 0, done.stderr
    assert f"{key} is now readable by group reconnectd" in done.stdout
    assert "made the system user" not in done.stdout, "the user exists already"
    group = account(installed, "group", "reconnectd")
    assert group is not None
    assert (key.stat().st_gid, key.stat().st_mode & 0o777) == (int(group[2]), 0o640)
    lines = (installed / "etc/passwd").read_text().splitlines()
    assert [line.split(":")[0] for line in lines].count("reconnectd") == 1


def test_a_scratch_root_without_accounts_gets_no_user(tmp_path: Path) -> None:
    done = install(tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{tmp_path} has no /etc/passwd; the user reconnectd is not made there" in done.stdout
    etc = tmp_path / "etc/reconnectd"
    assert (etc.stat().st_gid, etc.stat().st_mode & 0o777) == (0, 0o750)
