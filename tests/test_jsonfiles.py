"""Atomic JSON files, on real files, with real failures."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from reconnectd.jsonfiles import MAX_BYTES, JsonFileError, read_json, shown_value, write_json_atomic


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_round_trip_keeps_order_and_unicode(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    document = {"version": 1, "printers": [{"name": "Принтер", "reason": "came back…"}]}
    write_json_atomic(path, document)
    assert read_json(path) == document
    text = path.read_text(encoding="utf-8")
    assert text.startswith('{\n  "version": 1,')
    assert "Принтер" in text
    assert text.endswith("}\n")


@pytest.mark.parametrize("mode", [0o644, 0o600, 0o640])
def test_mode_is_exact_whatever_the_umask(tmp_path: Path, mode: int) -> None:
    path = tmp_path / "f.json"
    old = os.umask(0o077)
    try:
        write_json_atomic(path, [], mode=mode)
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_default_mode_is_0644(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    write_json_atomic(path, {})
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_missing_parent_is_created(tmp_path: Path) -> None:
    path = tmp_path / "run" / "reconnectd" / "status.json"
    write_json_atomic(path, {"a": 1})
    assert read_json(path) == {"a": 1}
    assert _leftovers(path.parent) == []


def test_replace_keeps_no_temp_files(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    for i in range(20):
        write_json_atomic(path, {"i": i})
    assert read_json(path) == {"i": 19}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_reader_never_sees_a_partial_file(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    # Large enough to take several write() calls, so an in-place rewrite would show.
    documents = [{"n": n, "pad": [chr(65 + n) * 100] * 2000} for n in range(3)]
    write_json_atomic(path, documents[0])
    stop = threading.Event()
    problems: list[str] = []
    reads = 0

    def reader() -> None:
        nonlocal reads
        while not stop.is_set():
            try:
                document = read_json(path)
            except JsonFileError as exc:
                problems.append(str(exc))
                return
            if document not in documents:
                problems.append("a document that was never written")
                return
            reads += 1

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        for i in range(300):
            write_json_atomic(path, documents[i % 3])
    finally:
        stop.set()
        thread.join()
    assert problems == []
    assert reads > 0
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_old_file_and_no_temp(tmp_path: Path) -> None:
    """A write that fails half-way (file size limit: EFBIG) changes nothing visible."""
    path = tmp_path / "status.json"
    write_json_atomic(path, {"old": True})
    # The limit and the ignored SIGXFSZ are per process: keep them out of pytest's.
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from pathlib import Path
        from reconnectd.jsonfiles import write_json_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_json_atomic(Path(sys.argv[1]), {"new": "x" * 100000})
        except OSError as exc:
            print(type(exc).__name__, exc.errno)
            sys.exit(0)
        sys.exit("no OSError")
        """
    )
    repo = str(Path(__file__).resolve().parent.parent)
    pythonpath = os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))
    result = subprocess.run(
        [sys.executable, "-c", script, str(path)],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "PYTHONPATH": pythonpath},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OSError 27")  # EFBIG
    assert read_json(path) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_failed_rename_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "status.json"
    target.mkdir()
    (target / "keep").write_text("x")
    with pytest.raises(OSError):
        write_json_atomic(target, {"a": 1})
    assert (target / "keep").read_text() == "x"
    assert _leftovers(tmp_path) == []


def test_unserialisable_document_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "f.json"
    write_json_atomic(path, {"old": True})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"when": object()})
    assert read_json(path) == {"old": True}
    assert _leftovers(tmp_path) == []


def test_parent_that_is_a_file_is_oserror(tmp_path: Path) -> None:
    (tmp_path / "run").write_text("")
    with pytest.raises(OSError):
        write_json_atomic(tmp_path / "run" / "status.json", {})


def test_unwritable_directory_is_oserror(tmp_path: Path) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        if os.access(directory, os.W_OK):
            pytest.skip("running as root: permissions do not stop us")
        with pytest.raises(PermissionError):
            write_json_atomic(directory / "status.json", {})
    finally:
        directory.chmod(0o755)


def test_read_only_file_system_is_oserror() -> None:
    """/proc refuses new files even to root: a real unwritable directory."""
    with pytest.raises(OSError):
        write_json_atomic(Path("/proc/self/reconnectd-status.json"), {})


def test_read_missing(tmp_path: Path) -> None:
    path = tmp_path / "none.json"
    with pytest.raises(JsonFileError, match=r"none\.json: no such file$") as info:
        read_json(path)
    assert info.value.missing
    assert info.value.path == path


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", r"is empty, not JSON$"),
        (b"  \n", r"is empty, not JSON$"),
        (b'{"version": 1,', r"not JSON: Expecting property name .* at line 1 column 15$"),
        (b'{"a": 1}\n{"b"', r"not JSON: Extra data at line 2 column 1$"),
        (b'{"a": "\xff"}', r"not JSON: not valid UTF-8 at byte 7$"),
    ],
)
def test_read_corrupt(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_bytes(content)
    with pytest.raises(JsonFileError, match=r"bad\.json: " + message) as info:
        read_json(path)
    assert not info.value.missing


def test_read_directory(tmp_path: Path) -> None:
    with pytest.raises(JsonFileError, match=r"is a directory, not a file$"):
        read_json(tmp_path)


def test_read_unreadable(tmp_path: Path) -> None:
    """A path through a regular file cannot be read by anyone, root included."""
    (tmp_path / "file").write_text("")
    with pytest.raises(JsonFileError, match=r"cannot read: Not a directory$"):
        read_json(tmp_path / "file" / "x.json")


def test_a_fifo_or_device_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "status.json"
    os.mkfifo(fifo)
    with pytest.raises(JsonFileError, match="is not a regular file"):
        read_json(fifo)  # a plain read would wait for a writer forever
    link = tmp_path / "zero.json"
    link.symlink_to("/dev/zero")
    with pytest.raises(JsonFileError, match="is not a regular file"):
        read_json(link)


def test_a_huge_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "big.json"
    path.write_bytes(b" " * (MAX_BYTES + 10) + b"{}")
    with pytest.raises(JsonFileError, match="larger than"):
        read_json(path)


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (None, "null"),
        (True, "true"),
        (12, "12"),
        (10**30, "a huge integer"),
        (float("nan"), "NaN"),
        (float("-inf"), "-Infinity"),
        (0.5, "0.5"),
        ("mk3s", '"mk3s"'),
        ("x" * 50, '"' + "x" * 40 + '"…'),
        ("a\nb", '"a\\nb"'),
        ({"kind": "sulk"}, '{"kind": "sulk"}'),
        ([1, None, True], "[1, null, true]"),
        (list(range(30)), "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, …"),
        ([10**5000], "a list"),  # more digits than Python writes out
        ({"n": 10**5000}, "an object"),
    ],
)
def test_a_value_is_shown_in_json_spelling_and_short(value: object, shown: str) -> None:
    assert shown_value(value) == shown
