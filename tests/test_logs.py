"""Log lines as a terminal and as journald see them, and secrets kept out of both."""

from __future__ import annotations

import io
import logging
import os
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pytest

from reconnectd.logs import is_journal, redact, scrub, setup_logging, syslog_priority

log = logging.getLogger("reconnectd.test")


@pytest.fixture(autouse=True)
def restore_root_logger() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture
def journal_file(tmp_path: Path) -> Iterator[tuple[TextIO, dict[str, str]]]:
    """A real file and the ``JOURNAL_STREAM`` that names it, as systemd would set it."""
    with open(tmp_path / "stderr", "w+", encoding="utf-8") as stream:
        info = os.fstat(stream.fileno())
        yield stream, {"JOURNAL_STREAM": f"{info.st_dev}:{info.st_ino}"}


def _written(stream: TextIO) -> list[str]:
    stream.flush()
    stream.seek(0)
    return stream.read().splitlines()


def _raise(message: str) -> None:
    raise RuntimeError(message)


def test_plain_format_has_timestamp_and_level() -> None:
    stream = io.StringIO()
    setup_logging(verbose=False, environ={}, stream=stream)
    log.info("connecting %s to %s", "mk3s", "/dev/ttyACM0")
    log.debug("not shown")
    assert re.fullmatch(
        r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d INFO: connecting mk3s to /dev/ttyACM0\n",
        stream.getvalue(),
    )


def test_verbose_shows_debug() -> None:
    stream = io.StringIO()
    setup_logging(verbose=True, environ={}, stream=stream)
    log.debug("detail")
    assert stream.getvalue().endswith(" DEBUG: detail\n")


def test_journal_format_has_priorities_and_no_timestamp(
    journal_file: tuple[TextIO, dict[str, str]],
) -> None:
    stream, environ = journal_file
    setup_logging(verbose=True, environ=environ, stream=stream)
    log.debug("d")
    log.info("i")
    log.warning("w")
    log.error("e")
    log.critical("c")
    assert _written(stream) == ["<7>d", "<6>i", "<4>w", "<3>e", "<2>c"]


def test_journal_stream_of_another_file_means_plain(
    tmp_path: Path, journal_file: tuple[TextIO, dict[str, str]]
) -> None:
    _, environ = journal_file  # inherited from a parent whose stderr was the journal
    with open(tmp_path / "other", "w+", encoding="utf-8") as stream:
        assert not is_journal(stream, environ)
        setup_logging(verbose=False, environ=environ, stream=stream)
        log.warning("w")
        (line,) = _written(stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d WARNING: w", line)


@pytest.mark.parametrize("value", ["", "garbage", "1:", ":2", "a:b", "1:2:3"])
def test_malformed_journal_stream_means_plain(
    journal_file: tuple[TextIO, dict[str, str]], value: str
) -> None:
    stream, _ = journal_file
    assert not is_journal(stream, {"JOURNAL_STREAM": value})


def test_stream_without_file_is_not_the_journal() -> None:
    assert not is_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})


def test_default_stream_is_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    setup_logging(verbose=False, environ={})
    log.error("to stderr")
    assert capfd.readouterr().err.endswith("ERROR: to stderr\n")


def test_setup_twice_installs_one_handler() -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging(verbose=False, environ={}, stream=first)
    setup_logging(verbose=False, environ={}, stream=second)
    log.info("once")
    assert first.getvalue() == ""
    assert second.getvalue().count("once") == 1


def test_traceback_in_journal_has_every_line_prefixed(
    journal_file: tuple[TextIO, dict[str, str]],
) -> None:
    stream, environ = journal_file
    setup_logging(verbose=False, environ=environ, stream=stream)
    try:
        _raise("boom")
    except RuntimeError:
        log.exception("reading OctoPrint failed")
    lines = _written(stream)
    assert lines[0] == "<3>reading OctoPrint failed"
    assert lines[1] == "<3>  Traceback (most recent call last):"
    assert lines[-1] == "<3>  RuntimeError: boom"
    assert len(lines) > 3
    assert all(line.startswith("<3>  ") for line in lines[1:])


def test_traceback_in_plain_format_is_indented() -> None:
    stream = io.StringIO()
    setup_logging(verbose=False, environ={}, stream=stream)
    try:
        _raise("boom")
    except RuntimeError:
        log.warning("retrying", exc_info=True)
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(" WARNING: retrying")
    assert all(line.startswith("  ") for line in lines[1:])
    assert lines[-1] == "  RuntimeError: boom"


def test_multiline_message_in_journal(journal_file: tuple[TextIO, dict[str, str]]) -> None:
    stream, environ = journal_file
    setup_logging(verbose=False, environ=environ, stream=stream)
    log.info("OctoPrint said:\n%s", "409 Conflict\n\nPrinter is not operational")
    assert _written(stream) == [
        "<6>OctoPrint said:",
        "<6>  409 Conflict",
        "<6>  Printer is not operational",
    ]


def test_secret_as_argument_and_in_exception_is_redacted(
    journal_file: tuple[TextIO, dict[str, str]],
) -> None:
    secret = uuid.uuid4().hex.upper()
    redact(secret)
    stream, environ = journal_file
    setup_logging(verbose=False, environ=environ, stream=stream)
    log.info("using key %s for %s", secret, "mk3s")
    try:
        _raise(f"401 for X-Api-Key: {secret}")
    except RuntimeError:
        log.exception("request failed with key=%s", secret)
    text = "\n".join(_written(stream))
    assert secret not in text
    assert "<6>using key *** for mk3s" in text
    assert "<3>request failed with key=***" in text
    assert "<3>  RuntimeError: 401 for X-Api-Key: ***" in text


class _Recorder(logging.Handler):
    """A handler after ours in the chain: it sees the records as our filter left them."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_url_password_is_masked_in_every_line_without_being_registered(
    journal_file: tuple[TextIO, dict[str, str]],
) -> None:
    password = f"pw-{uuid.uuid4().hex}"
    url = f"http://proxy:{password}@octopi.local:5000"
    stream, environ = journal_file
    setup_logging(verbose=True, environ=environ, stream=stream)
    later = _Recorder()
    logging.getLogger().addHandler(later)
    log.warning("%s: no API key for OctoPrint at %s; set api_key_file", "mk3s", url)
    log.debug("OctoPrint at %s runs no reconnect plugin", url)
    try:
        _raise(f"cannot reach {url}/api/job")
    except RuntimeError:
        log.exception("plugins of %s", url)
    text = "\n".join(_written(stream))
    assert password not in text
    shown = "http://proxy:***@octopi.local:5000"
    assert f"<4>mk3s: no API key for OctoPrint at {shown}; set api_key_file" in text
    assert f"<7>OctoPrint at {shown} runs no reconnect plugin" in text
    assert f"<3>plugins of {shown}" in text
    assert f"<3>  RuntimeError: cannot reach {shown}/api/job" in text
    assert later.messages[:2] == [
        f"mk3s: no API key for OctoPrint at {shown}; set api_key_file",
        f"OctoPrint at {shown} runs no reconnect plugin",
    ]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("GET http://u:pw@h:5000/api (x)", "GET http://u:***@h:5000/api (x)"),
        ("'https://u:p/w@h' and http://v:q@k", "'https://u:***@h' and http://v:***@k"),
        ("a token: http://T0KEN@h/", "a token: http://***@h/"),
        ("mail root@example.com about http://h:5000", "mail root@example.com about http://h:5000"),
        ("no URL at all", "no URL at all"),
    ],
)
def test_scrub_masks_url_passwords_in_any_text(text: str, shown: str) -> None:
    assert scrub(text) == shown


def test_blank_secret_is_ignored() -> None:
    redact("")
    redact("   ")
    assert scrub("nothing to hide") == "nothing to hide"


def test_longer_secret_wins_over_its_prefix() -> None:
    short = uuid.uuid4().hex
    redact(short)
    redact(short + "TAIL")
    assert scrub(f"{short}TAIL and {short}") == "*** and ***"


@pytest.mark.parametrize(
    ("level", "priority"),
    [(50, 2), (60, 2), (40, 3), (30, 4), (25, 6), (20, 6), (10, 7), (5, 7), (0, 7)],
)
def test_syslog_priority(level: int, priority: int) -> None:
    assert syslog_priority(level) == priority
