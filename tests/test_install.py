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


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("root")
    done = install(root)
    assert done.returncode == 0, done.stderr
    assert "wrote the example config" in done.stdout
    return root


def test_installs_venv_command_unit_and_example_config(installed: Path) -> None:
    command = installed / "usr/local/bin/reconnectd"
    assert os.readlink(command) == "/opt/reconnectd/bin/reconnectd"
    real = installed / "opt/reconnectd/bin/reconnectd"
    version = subprocess.run([str(real), "--version"], capture_output=True, text=True, timeout=60)
    assert version.stdout.strip() == f"reconnectd {__version__}"
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
