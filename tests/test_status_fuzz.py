"""`reconnectd status` on status files made by Hypothesis: whatever the file holds,
the command shows it (exit 0), or says in one line naming the file what is wrong
with it (exit 1), or that the daemon it names has exited (exit 3); never a traceback.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reconnectd.cli import EXIT_NOT_RUNNING, EXIT_OK, EXIT_STATUS_INVALID, main
from tests.support.hostile_json import dump, has_huge
from tests.support.hostile_json import json_values as hostile_json_values

FUZZ = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


json_values = hostile_json_values(["version", "pid", "printers", "name", "holds"])


PRINTER: dict[str, object] = {
    "name": "mk3s",
    "state": "operational",
    "device": "/dev/ttyACM0",
    "octoprint": "http://127.0.0.1:5000",
    "decision": "connect",
    "reason": "device came back",
    "at": "2026-11-23T12:04:58Z",
    "holds": ["manual disconnect"],
    "attempts": 2,
    "connects": 1,
}
# Fields that say whether and which daemon runs, and which printers it has: when
# they are wrong, the file is invalid. Any other is dropped if odd.
REQUIRED = ("version", "pid", "printers")
TOP_FIELDS = (*REQUIRED, "started", "updated", "dry_run", "holds_unsaved", "future")
PRINTER_FIELDS = (*PRINTER, "future")


def _document() -> dict[str, object]:
    return {
        "version": 1,
        "pid": os.getpid(),
        "started": "2026-11-23T12:00:00Z",
        "updated": "2026-11-23T12:05:00Z",
        "dry_run": False,
        "holds_unsaved": None,
        "printers": [dict(PRINTER), dict(PRINTER, name="ender")],
    }


def _not_json(constant: str) -> object:
    raise AssertionError(f"status --json wrote {constant}, which is not JSON")


def _status_of(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes) -> int:
    """Write the status file, run `status` and `status --json`; check what both say.

    Return their exit code (the same for both).
    """
    path = tmp_path / "run" / "status.json"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    codes = []
    for args in ([], ["--json"]):
        capsys.readouterr()
        code = main(["status", *args], {"RUNTIME_DIRECTORY": str(path.parent)})
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        assert code in (EXIT_OK, EXIT_STATUS_INVALID, EXIT_NOT_RUNNING)
        if code == EXIT_OK:
            assert err == ""
            if args:
                json.loads(out, parse_constant=_not_json)
            else:
                # One line per row: no control character moves the cursor.
                assert out.endswith("\n")
                assert not any(c < " " or "\x7f" <= c <= "\x9f" for c in out.replace("\n", ""))
        else:
            assert out == ""
            assert err.startswith("reconnectd status: ")
            assert err.count("\n") == 1 and err.endswith("\n"), err
            assert str(path) in err
            # 3 only for a daemon that is gone: its pid was valid, just not running.
            assert (code == EXIT_NOT_RUNNING) == ("is stale" in err)
        codes.append(code)
    assert codes[0] == codes[1]
    return codes[0]


@FUZZ
@given(content=st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes
) -> None:
    _status_of(capsys, tmp_path, content)


@FUZZ
@given(document=json_values)
def test_fuzz_arbitrary_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], document: object
) -> None:
    _status_of(capsys, tmp_path, dump(document).encode())


@FUZZ
@given(key=st.sampled_from(TOP_FIELDS), value=json_values)
def test_fuzz_each_document_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], key: str, value: object
) -> None:
    document = _document()
    document[key] = value
    code = _status_of(capsys, tmp_path, dump(document).encode())
    if key not in REQUIRED and not has_huge(value):
        assert code == EXIT_OK


@FUZZ
@given(
    index=st.sampled_from([0, 1]),
    key=st.sampled_from(PRINTER_FIELDS) | st.none(),
    value=json_values,
)
def test_fuzz_each_printer_field(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    index: int,
    key: str | None,
    value: object,
) -> None:
    document = _document()
    printers = document["printers"]
    assert isinstance(printers, list)
    if key is None:  # the whole entry
        printers[index] = value
    else:
        printers[index][key] = value
    code = _status_of(capsys, tmp_path, dump(document).encode())
    if has_huge(value):
        return
    if key is not None or isinstance(value, dict):
        assert code == EXIT_OK
        capsys.readouterr()
        main(["status"], {"RUNTIME_DIRECTORY": str(tmp_path / "run")})
        # Both printers keep their rows, whatever one of them holds.
        assert len(capsys.readouterr().out.splitlines()) == 5
    else:
        assert code == EXIT_STATUS_INVALID
