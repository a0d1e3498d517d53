"""The status file and STATUS=, with an injected clock: written on a change, held back
for a request in flight at most STATUS_MAY_LAG, a failing file said once."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from reconnectd.status_publisher import STATUS_MAY_LAG, StatusPublisher


class Lines:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def status(self, text: str) -> None:
        self.sent.append(text)


ROW: dict[str, object] = {"name": "mk3s", "state": "operational"}


def publisher(path: Path, now: list[float], lines: Lines) -> StatusPublisher:
    return StatusPublisher(
        path, lines, dry_run=False, clock=lambda: now[0], wall_clock=lambda: 1.8e9 + now[0]
    )


def test_a_change_is_written_at_once_when_no_request_is_on_its_way(tmp_path: Path) -> None:
    now, lines = [10.0], Lines()
    status = publisher(tmp_path / "status.json", now, lines)
    status.publish(lambda: [ROW], busy=False, holds_unsaved=None)
    document = json.loads((tmp_path / "status.json").read_text())
    assert document["printers"] == [ROW] and document["holds_unsaved"] is None
    assert lines.sent == ["mk3s: operational"]
    assert status.deadline is None


def test_a_request_in_flight_holds_the_status_back_at_most_the_lag(tmp_path: Path) -> None:
    now, lines = [10.0], Lines()
    status = publisher(tmp_path / "status.json", now, lines)
    asked: list[float] = []

    def rows() -> list[dict[str, object]]:
        asked.append(now[0])
        return [ROW]

    status.publish(rows, busy=True, holds_unsaved=None)
    assert asked == [] and status.deadline == pytest.approx(10.0 + STATUS_MAY_LAG)
    now[0] += STATUS_MAY_LAG
    status.publish(rows, busy=True, holds_unsaved=None)
    assert asked == [10.0 + STATUS_MAY_LAG], "a slow request: where things stand is shown"
    assert (tmp_path / "status.json").exists()


def test_an_unwritable_status_file_is_said_once_and_again_when_it_works(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    blocker = tmp_path / "file"
    blocker.write_text("")
    now, lines = [10.0], Lines()
    status = publisher(blocker / "status.json", now, lines)
    for _ in range(3):
        status.publish(lambda: [ROW], busy=False, holds_unsaved="disk full")
    blocker.unlink()
    status.publish(lambda: [ROW], busy=False, holds_unsaved="disk full")
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if "cannot write the status file" in m]) == 1
    assert messages[-1] == f"the status file {blocker / 'status.json'} is written again"
    assert json.loads((blocker / "status.json").read_text())["holds_unsaved"] == "disk full"
    assert lines.sent[-1] == "mk3s: operational", "STATUS= goes out whatever the file does"
