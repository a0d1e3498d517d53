"""The installer and the uninstaller, run for real into a scratch root: what they lay
down and take away, and that the installed unit passes `systemd-analyze verify`.
Nothing is started there; tests/test_container.py runs both under a real systemd."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from reconnectd import __version__

REPO = Path(__file__).resolve().parents[1]


def install(root: Path, source: Path = REPO) -> subprocess.CompletedProcess[str]:
    """Given a scratch root (and a checkout), run the checkout's installer into it."""
    return script(source / "systemd" / "install", root)


def uninstall(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Given a scratch root, run the uninstaller on it."""
    return script(REPO / "systemd" / "uninstall", root, *args)


def script(path: Path, root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ROOT=str(root))
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        ["bash", str(path), *args],
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
    # The installed command accepts the example once it has a key, which is all
    # `reconnectd login` adds to it.
    key = installed / "octoprint.key"
    key.write_text("K" * 32 + "\n")
    key.chmod(0o600)
    example = config.read_text()
    assert "\n[octoprint]\n" in example
    keyed = installed / "keyed.toml"
    keyed.write_text(
        example.replace("\n[octoprint]\n", f'\n[octoprint]\napi_key_file = "{key}"\n', 1)
    )
    checked = subprocess.run(
        [str(real), "--config", str(keyed), "check"], capture_output=True, text=True, timeout=60
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


def test_a_group_named_like_the_user_is_joined_not_made_again(tmp_path: Path) -> None:
    # Left by an earlier install's userdel, or made by hand: useradd --user-group
    # would refuse ("group reconnectd exists").
    bare_system(tmp_path)
    with (tmp_path / "etc/group").open("a") as group:
        group.write("reconnectd:x:990:\n")
    with (tmp_path / "etc/gshadow").open("a") as gshadow:
        gshadow.write("reconnectd:!::\n")
    done = install(tmp_path)
    assert done.returncode == 0, done.stderr
    assert "made the system user reconnectd, in the existing group reconnectd" in done.stdout
    user = account(tmp_path, "passwd", "reconnectd")
    assert user is not None and user[3] == "990"
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert [line.split(":")[0] for line in groups].count("reconnectd") == 1


def files_in(directory: Path) -> dict[str, tuple[int, int]]:
    """Given a directory, return each path below it with its size and modification time."""
    return {
        str(path.relative_to(directory)): (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in directory.rglob("*")
    }


def test_builds_outside_the_checkout_and_an_upgrade_drops_deleted_modules(
    tmp_path: Path,
) -> None:
    # A checkout of its own, to delete a module from and to plant what the old
    # installer left in one: a build/ and an *.egg-info that both list that module.
    source = tmp_path / "checkout"
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    probe = source / "reconnectd" / "upgrade_probe.py"
    probe.write_text("PROBE = 1\n")
    root = tmp_path / "root"
    bare_system(root)
    before = files_in(source)
    first = install(root, source)
    assert first.returncode == 0, first.stderr
    assert files_in(source) == before, "the install wrote into the checkout"
    site = next((root / "opt/reconnectd/lib").glob("python3.*/site-packages"))
    assert (site / "reconnectd/upgrade_probe.py").exists()

    probe.unlink()
    stale = source / "build/lib/reconnectd/upgrade_probe.py"
    stale.parent.mkdir(parents=True)
    stale.write_text("PROBE = 1\n")
    (source / "reconnectd.egg-info").mkdir()
    (source / "reconnectd.egg-info/SOURCES.txt").write_text("reconnectd/upgrade_probe.py\n")
    before = files_in(source)
    second = install(root, source)
    assert second.returncode == 0, second.stderr
    assert files_in(source) == before, "the install wrote into the checkout"
    assert not (site / "reconnectd/upgrade_probe.py").exists(), "a deleted module survived"
    assert (site / "reconnectd/daemon.py").exists()


def test_a_failing_step_fails_the_install_and_is_named(tmp_path: Path) -> None:
    bare_system(tmp_path)
    (tmp_path / "opt").write_text("a file where a directory must go\n")
    done = install(tmp_path)
    assert done.returncode != 0
    assert f"install: FAILED while making the venv {tmp_path}/opt/reconnectd" in done.stderr
    assert not (tmp_path / "etc/reconnectd").exists(), "nothing after the failed step ran"


def test_uninstall_keeps_config_and_state_and_purge_removes_them(tmp_path: Path) -> None:
    bare_system(tmp_path)
    assert install(tmp_path).returncode == 0
    state = tmp_path / "var/lib/reconnectd"
    state.mkdir(parents=True)
    (state / "state.json").write_text("{}\n")
    config = tmp_path / "etc/reconnectd/reconnectd.toml"

    done = uninstall(tmp_path)
    assert done.returncode == 0, done.stderr
    for gone in ("etc/systemd/system/reconnectd.service", "opt/reconnectd"):
        assert not (tmp_path / gone).exists(), gone
    assert not (tmp_path / "usr/local/bin/reconnectd").is_symlink()
    assert config.exists() and (state / "state.json").exists()
    assert f"kept {tmp_path}/etc/reconnectd (config and keys)" in done.stdout
    assert f"kept {state} (holds)" in done.stdout
    assert account(tmp_path, "passwd", "reconnectd") is not None, "the user stays"
    again = uninstall(tmp_path)
    assert again.returncode == 0, again.stderr
    assert "uninstall: nothing left to remove" in again.stdout

    purged = uninstall(tmp_path, "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not (tmp_path / "etc/reconnectd").exists() and not state.exists()
    assert "removed the user reconnectd" in purged.stdout
    for file in ("passwd", "group", "shadow", "gshadow"):
        assert account(tmp_path, file, "reconnectd") is None, file
    assert account(tmp_path, "passwd", "root") is not None
    again = uninstall(tmp_path, "--purge")
    assert again.returncode == 0, again.stderr
    assert "uninstall: nothing left to remove" in again.stdout


def test_uninstall_refuses_an_unknown_argument(tmp_path: Path) -> None:
    done = uninstall(tmp_path, "--purg")
    assert done.returncode == 64
    assert "usage: sudo bash systemd/uninstall [--purge]" in done.stderr


def test_the_readme_gives_the_commands_the_tests_run() -> None:
    """The README's install, upgrade, uninstall and reload sections are what
    tests/test_container.py does as the user pi."""
    readme = (REPO / "README.md").read_text()
    for command in (
        "sudo bash systemd/install",
        "git pull",
        "sudo bash systemd/uninstall",
        "sudo bash systemd/uninstall --purge",
        "sudo systemctl reload reconnectd",
    ):
        assert command in readme, command
