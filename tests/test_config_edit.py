"""Pointing the config at a key file (:mod:`reconnectd.config_edit`): comments kept.

No OctoPrint takes part: the key is stored as ``reconnectd login`` stores it, the
config is edited in a temporary directory, and every result is loaded with the
daemon's own loader.
"""

from __future__ import annotations

import os
import pwd
import stat
from pathlib import Path

import pytest

from reconnectd.config import ConfigError, load_config
from reconnectd.config_edit import (
    ConfigFile,
    ConfigOutcome,
    NoTable,
    Table,
    default_key_file,
    find_table,
    point_config,
    read_config,
)
from reconnectd.login import store_key

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "reconnectd" / "example.toml"
KEY = "Ab3dE5gH1jK2mN4pQ6rS8tU0vW9xY7zA1bC3dE5fG7h"
URL = "http://127.0.0.1:5000"
ENDER = "http://127.0.0.1:5001"


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "reconnectd.toml"
    path.write_text(text)
    return path


def point(path: Path, url: str, key_file: Path | None = None) -> tuple[ConfigOutcome, Path]:
    """Store KEY as ``login`` would for ``url`` and point the config at it."""
    config = read_config(path)
    table = find_table(config, url)
    file = key_file or default_key_file(config, table, url)
    store_key(file, KEY, service_user=None)
    return point_config(config, table, file, url), file


def test_no_config_yet_is_created(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "reconnectd.toml"
    outcome, key_file = point(path, "http://octopi.local")
    assert outcome.ok, outcome.message
    assert key_file == tmp_path / "etc" / "octoprint.key"
    assert outcome.message == f"Wrote {path}: the [octoprint] table reads the key from the file."
    config = load_config(str(path), {})
    assert config.octoprint.url == "http://octopi.local"
    assert config.octoprint.api_key == KEY
    assert config.zero_config
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_inline_key_is_replaced_and_comments_survive(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        "# farm\n"
        "[octoprint]\n"
        "# the local OctoPrint\n"
        f'url = "{URL}"\n'
        '    api_key = "s3cret"   # from the UI\n'
        "timeout = 5\n"
        "\n"
        "[[printer]]\n"
        'name = "mk3s"  # the Prusa\n'
        'vendor_id = "2c99"\n',
    )
    outcome, key_file = point(path, URL)
    assert outcome.ok, outcome.message
    assert path.read_text() == (
        "# farm\n"
        "[octoprint]\n"
        "# the local OctoPrint\n"
        f'url = "{URL}"\n'
        f'    api_key_file = "{key_file}"   # from the UI\n'
        "timeout = 5\n"
        "\n"
        "[[printer]]\n"
        'name = "mk3s"  # the Prusa\n'
        'vendor_id = "2c99"\n'
    )
    assert "s3cret" not in outcome.message
    assert load_config(str(path), {}).printers[0].octoprint.api_key == KEY


def test_an_existing_key_file_setting_is_replaced(tmp_path: Path) -> None:
    path = write_config(
        tmp_path, f'[octoprint]\nurl = "{URL}"\napi_key_file = "old.key"  # keep me\n'
    )
    outcome, key_file = point(path, URL, tmp_path / "new.key")
    assert outcome.ok, outcome.message
    assert path.read_text() == (
        f'[octoprint]\nurl = "{URL}"\napi_key_file = "{key_file}"  # keep me\n'
    )


def test_the_file_the_config_names_is_the_default(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    path = write_config(tmp_path, f'[octoprint]\nurl = "{URL}"\napi_key_file = "keys/op.key"\n')
    text = path.read_text()
    outcome, key_file = point(path, URL)
    assert key_file == tmp_path / "keys" / "op.key"
    assert outcome == ConfigOutcome(True, f"{path} already reads the key from {key_file}.")
    assert path.read_text() == text
    assert load_config(str(path), {}).octoprint.api_key == KEY


def test_the_shipped_example_gets_the_line_under_its_commented_one(tmp_path: Path) -> None:
    example = EXAMPLE.read_text()
    path = write_config(tmp_path, example)
    outcome, key_file = point(path, URL)
    assert outcome.ok, outcome.message
    before, after = example.splitlines(), path.read_text().splitlines()
    at = before.index('#api_key_file = "/etc/reconnectd/octoprint.key"') + 1
    assert after == [*before[:at], f'api_key_file = "{key_file}"', *before[at:]]
    assert load_config(str(path), {}).octoprint.api_key == KEY


def test_a_printers_own_octoprint(tmp_path: Path) -> None:
    text = (
        f'[octoprint]\nurl = "{URL}"\napi_key = "shared"\n\n'
        '[[printer]]\nname = "mk3s"\nvendor_id = "2c99"\n\n'
        '[[printer]]\nname = "ender"\nvendor_id = "1a86"\n'
        f'[printer.octoprint]\nurl = "{ENDER}"\ntimeout = 3\n'
    )
    path = write_config(tmp_path, text)
    outcome, key_file = point(path, ENDER)
    # Not the shared octoprint.key: that would be the other OctoPrint's key.
    assert key_file == tmp_path / "ender.key"
    assert outcome.message == (
        f'Updated {path}: the [printer.octoprint] of printer "ender" table reads the key'
        " from the file."
    )
    assert path.read_text() == text.replace(
        f'url = "{ENDER}"\n', f'url = "{ENDER}"\napi_key_file = "{key_file}"\n'
    )
    config = load_config(str(path), {})
    assert config.octoprint.api_key == "shared"
    assert [p.octoprint.api_key for p in config.printers] == ["shared", KEY]


def test_a_url_no_table_has_leaves_the_config_alone(tmp_path: Path) -> None:
    text = f'[octoprint]\nurl = "{URL}"\napi_key_file = "octoprint.key"\n'
    path = write_config(tmp_path, text)
    (tmp_path / "octoprint.key").write_text("shared-key\n")
    outcome, key_file = point(path, ENDER)
    # octoprint.key holds the shared OctoPrint's key: not overwritten.
    assert key_file == tmp_path / "octoprint-5001.key"
    assert (tmp_path / "octoprint.key").read_text() == "shared-key\n"
    assert not outcome.ok
    assert outcome.message == (
        f'{path} was not changed: no table of {path} has url = "{ENDER}"'
        f' ([octoprint] has "{URL}").\n'
        "To use the key, add this line in the [printer.octoprint] table of the printer that"
        f' uses this OctoPrint in {path} (with url = "{ENDER}"):\n'
        f'    api_key_file = "{key_file}"'
    )
    assert path.read_text() == text


def test_messages_show_urls_with_the_password_masked(tmp_path: Path) -> None:
    text = '[octoprint]\nurl = "http://proxy:Secr3t@127.0.0.1:5000"\n'
    path = write_config(tmp_path, text)
    table = find_table(read_config(path), "http://proxy:0ther@127.0.0.1:5001")
    assert isinstance(table, NoTable)
    assert table.reason == (
        f'no table of {path} has url = "http://proxy:***@127.0.0.1:5001"'
        ' ([octoprint] has "http://proxy:***@127.0.0.1:5000")'
    )
    assert table.advice.endswith('(with url = "http://proxy:***@127.0.0.1:5001")')
    assert path.read_text() == text


def test_several_tables_with_the_url_leave_the_config_alone(tmp_path: Path) -> None:
    text = "".join(
        f'[[printer]]\nname = "{name}"\nvendor_id = "1a86"\n[printer.octoprint]\nurl = "{ENDER}"\n'
        for name in ("a", "b")
    )
    path = write_config(tmp_path, text)
    outcome, key_file = point(path, ENDER, tmp_path / "ender.key")
    assert not outcome.ok
    assert outcome.message.startswith(
        f"{path} was not changed: several [printer.octoprint] tables of {path} have url ="
        f' "{ENDER}" (printers "a", "b").\n'
    )
    assert outcome.message.endswith(
        f'in each of those tables in {path}:\n    api_key_file = "{key_file}"'
    )
    assert path.read_text() == text


def test_text_that_only_looks_like_the_table_is_not_edited(tmp_path: Path) -> None:
    # A header inside a multi-line string is no header: the edit is checked by parsing.
    text = (
        '[[printer]]\nname = "a"\nvendor_id = "2c99"\nprofile = """\n[octoprint]\n"""\n'
        f'[octoprint]\nurl = "{URL}"\n'
    )
    path = write_config(tmp_path, text)
    outcome, key_file = point(path, URL)
    assert not outcome.ok
    assert outcome.message == (
        f"{path} was not changed: its [octoprint] table is not written in a way this"
        " command can edit safely.\n"
        f"To use the key, add this line to the [octoprint] table of {path}:\n"
        f'    api_key_file = "{key_file}"'
    )
    assert path.read_text() == text


def test_dotted_keys_are_not_edited(tmp_path: Path) -> None:
    text = f'octoprint.url = "{URL}"\noctoprint.api_key = "x"\n'
    path = write_config(tmp_path, text)
    outcome, _ = point(path, URL)
    assert not outcome.ok
    assert "(and remove its api_key line):" in outcome.message
    assert path.read_text() == text


def test_an_edit_that_would_not_load_is_not_made(tmp_path: Path) -> None:
    text = f'[octoprint]\nurl = "{URL}"\n'
    path = write_config(tmp_path, text)
    config = read_config(path)
    gone = tmp_path / "never-written.key"
    outcome = point_config(config, find_table(config, URL), gone, URL)
    assert not outcome.ok
    assert outcome.message == (
        f"{path} was not changed: the edited file would not load:\n"
        f'    {path}: octoprint.api_key_file: cannot read "{gone}": No such file or directory\n'
        f"To use the key, add this line to the [octoprint] table of {path}:\n"
        f'    api_key_file = "{gone}"'
    )
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == ["reconnectd.toml"]


def test_problems_the_config_had_do_not_stop_the_edit(tmp_path: Path) -> None:
    # The key file it names does not exist yet (what login is for), and a typo.
    text = (
        f'[octoprint]\nurl = "{URL}"\napi_key_file = "missing.key"\n'
        '[[printer]]\nname = "a"\nvendorid = "2c99"\n'
    )
    path = write_config(tmp_path, text)
    outcome, key_file = point(path, URL, tmp_path / "octoprint.key")
    assert outcome.ok, outcome.message
    assert outcome.message.endswith(
        f"\n{path} still has other problems; reconnectd check lists them."
    )
    assert path.read_text() == text.replace("missing.key", str(key_file))
    with pytest.raises(ConfigError) as raised:
        load_config(str(path), {})
    assert [p.split(": ")[1] for p in raised.value.problems] == ["printer[0].vendorid"]


def test_both_inline_and_file_is_fixed(tmp_path: Path) -> None:
    text = f'[octoprint]\nurl = "{URL}"\napi_key = "x"\napi_key_file = "old.key"\n'
    path = write_config(tmp_path, text)
    outcome, key_file = point(path, URL, tmp_path / "octoprint.key")
    assert outcome.ok, outcome.message
    assert path.read_text() == f'[octoprint]\nurl = "{URL}"\napi_key_file = "{key_file}"\n'


def test_a_systemd_credential_is_left_in_place(tmp_path: Path) -> None:
    text = f'[octoprint]\nurl = "{URL}"\napi_key_credential = "octoprint.key"\n'
    path = write_config(tmp_path, text)
    outcome, key_file = point(path, URL)
    assert outcome.ok
    assert outcome.message == (
        f"{path} was left as it is: its [octoprint] table reads the key from the systemd"
        ' credential "octoprint.key". The unit needs'
        f" LoadCredential=octoprint.key:{key_file} (systemctl edit reconnectd), then a restart."
    )
    assert path.read_text() == text


def test_mode_owner_and_link_of_the_config_are_kept(tmp_path: Path) -> None:
    real = tmp_path / "real" / "reconnectd.toml"
    real.parent.mkdir()
    real.write_text(f'[octoprint]\nurl = "{URL}"\n')
    real.chmod(0o640)
    owner = (os.geteuid(), os.getegid())
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        owner = (nobody.pw_uid, nobody.pw_gid)
        os.chown(real, *owner)
    link = tmp_path / "reconnectd.toml"
    link.symlink_to(real)
    outcome, key_file = point(link, URL, tmp_path / "octoprint.key")
    assert outcome.ok, outcome.message
    assert link.is_symlink()
    assert real.read_text() == f'[octoprint]\nurl = "{URL}"\napi_key_file = "{key_file}"\n'
    info = real.stat()
    assert (stat.S_IMODE(info.st_mode), info.st_uid, info.st_gid) == (0o640, *owner)
    assert sorted(p.name for p in real.parent.iterdir()) == ["reconnectd.toml"]


def test_an_unreadable_config_gets_instructions(tmp_path: Path) -> None:
    path = tmp_path / "reconnectd.toml"
    path.mkdir()  # reading it fails, whoever runs the test
    config = read_config(path)
    assert config == ConfigFile(path, None, None, f"{path}: cannot read the file: Is a directory")
    table = find_table(config, URL)
    assert isinstance(table, NoTable)
    outcome = point_config(config, table, tmp_path / "octoprint.key", URL)
    assert outcome.message.startswith(
        f"{path} was not changed: {path}: cannot read the file: Is a directory.\n"
        f"To use the key, add this line in the [octoprint] table of {path}:\n"
    )


def test_urls_match_whatever_their_trailing_slash_and_case(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[[printer]]\nname = "e"\nport = "/dev/ttyUSB0"\n'
        '[printer.octoprint]\nurl = "HTTP://LocalHost:5001/"\n',
    )
    table = find_table(read_config(path), "http://localhost:5001")
    assert isinstance(table, Table)
    assert (table.printer, table.name) == (0, '[printer.octoprint] of printer "e"')
