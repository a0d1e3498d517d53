"""The state file's reader and writer: damage never stops the daemon, a failed write
is never taken as done. Example tests, then Hypothesis fuzzing of the reader."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconnectd.hold_store import HoldStore, parse_state
from reconnectd.jsonfiles import MAX_BYTES, write_json_atomic
from tests.support.hostile_json import dump
from tests.support.hostile_json import json_values as hostile_json_values

GOOD: dict[str, object] = {
    "version": 1,
    "printers": {
        "mk3s": {
            "holds": [{"kind": "manual", "reason": "disconnected in OctoPrint", "instance": "7"}],
            "connected_instance": "7",
            "last_instance": "7",
        }
    },
}


def store(tmp_path: Path, **kw: Any) -> HoldStore:
    return HoldStore(tmp_path / "state.json", wall_clock=lambda: 1_800_000_000.0, **kw)


def test_a_good_file_is_read_back_and_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps(GOOD))
    holds = store(tmp_path)
    assert holds.load() == GOOD["printers"]
    before = path.stat().st_ino
    holds.save(GOOD["printers"], now=0.0)
    assert path.stat().st_ino == before, "an unchanged memory is not written again"


def test_a_missing_file_is_a_first_start(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert store(tmp_path).load() == {}
    assert caplog.records == []


def test_a_damaged_file_is_moved_aside_with_the_time_and_said_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"version": 1, "printers": {"mk3s": {"holds": "yes"}}}')
    assert store(tmp_path).load() == {}
    assert not path.exists()
    aside = tmp_path / "state.json.corrupt-20270115T080000Z"
    assert aside.exists()
    assert [r.getMessage() for r in caplog.records] == [
        f'ignoring stored holds: {path} is damaged (printer "mk3s": holds is a string, not a '
        "list); moved to state.json.corrupt-20270115T080000Z; starting with no holds"
    ]


def test_the_readable_printers_of_a_partly_damaged_file_are_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    document = json.loads(json.dumps(GOOD))
    document["printers"]["ender"] = {"holds": [{"kind": "sulk", "reason": "", "instance": ""}]}
    (tmp_path / "state.json").write_text(json.dumps(document))
    assert store(tmp_path).load() == GOOD["printers"], "a hold the user made is not thrown away"
    assert "starting with the holds of mk3s only" in caplog.records[0].getMessage()
    assert 'hold kind "sulk" is not one of manual, fatal' in caplog.records[0].getMessage()


def test_a_huge_file_is_not_read(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "state.json").write_bytes(b" " * (MAX_BYTES + 1) + b"{}")
    assert store(tmp_path).load() == {}
    assert f"larger than {MAX_BYTES} bytes" in caplog.records[0].getMessage()
    assert list(tmp_path.glob("state.json.corrupt-*")), "set aside like any damage"


def test_a_failed_write_is_kept_said_once_and_tried_again_until_it_lands(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    failing = [True]

    def write(path: Path, document: object, mode: int = 0o644) -> None:
        if failing[0]:
            raise OSError(28, "No space left on device")
        write_json_atomic(path, document, mode)

    holds = store(tmp_path, write=write)
    memory = GOOD["printers"]
    for now in (1.0, 2.0, 3.0):
        holds.save(memory, now=now)  # type: ignore[arg-type]
        assert holds.unsaved is not None and "No space left on device" in holds.unsaved
        assert holds.retry_at == now + 5.0, "the loop is asked to wake up for the next try"
    failing[0] = False
    holds.save(memory, now=4.0)  # type: ignore[arg-type]
    assert holds.unsaved is None and holds.retry_at is None
    assert json.loads((tmp_path / "state.json").read_text()) == GOOD
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot store holds" in m]) == 1, messages
    assert messages[-1] == f"holds are stored in {tmp_path / 'state.json'} again"


def test_a_change_undone_while_the_disk_failed_needs_no_write(tmp_path: Path) -> None:
    calls: list[object] = []

    def write(path: Path, document: object, mode: int = 0o644) -> None:
        calls.append(document)
        if len(calls) == 2:
            raise OSError(30, "Read-only file system")
        write_json_atomic(path, document, mode)

    holds = store(tmp_path, write=write)
    holds.save({"mk3s": {"holds": []}}, now=0.0)
    holds.save(GOOD["printers"], now=1.0)  # type: ignore[arg-type]
    assert holds.unsaved is not None
    holds.save({"mk3s": {"holds": []}}, now=2.0)  # the hold was released meanwhile
    assert holds.unsaved is None, "what is on disk is what should be"
    assert len(calls) == 2


# --- fuzzing the reader -----------------------------------------------------------


json_values = hostile_json_values(["version", "printers", "holds", "kind", "instance"])

FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _load_never_raises(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "state.json"
    for leftover in tmp_path.glob("state.json*"):
        leftover.unlink()
    path.write_bytes(content)
    loaded = store(tmp_path).load()
    # Whatever was loaded is valid memory: it passes the parser unchanged.
    assert parse_state({"version": 1, "printers": loaded}) == (loaded, [])
    # A file that was not taken whole was moved aside, never destroyed.
    if path.exists():
        assert path.read_bytes() == content
    else:
        assert [p.read_bytes() for p in tmp_path.glob("state.json.corrupt-*")] == [content]


@FUZZ
@given(content=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(tmp_path: Path, content: bytes) -> None:
    _load_never_raises(tmp_path, content)


@FUZZ
@given(document=json_values)
def test_fuzz_arbitrary_json(tmp_path: Path, document: object) -> None:
    _load_never_raises(tmp_path, dump(document).encode())


@FUZZ
@given(name=st.text(max_size=10), memory=json_values)
def test_fuzz_arbitrary_printer_memory(tmp_path: Path, name: str, memory: object) -> None:
    _load_never_raises(tmp_path, dump({"version": 1, "printers": {name: memory}}).encode())


@pytest.mark.parametrize("depth", [50, 5_000, 200_000])
def test_deep_nesting_at_any_depth(tmp_path: Path, depth: int) -> None:
    _load_never_raises(tmp_path, b"[" * depth + b"]" * depth)
