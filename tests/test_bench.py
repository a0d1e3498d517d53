"""The pure parts of ``bench/run``: statistics, targets, /proc parsing, the report's shape.

The measuring itself (minutes of real processes) is CI's smoke run,
``bench/run --quick``; what is checked here is everything it computes from its numbers.
"""

from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest

from bench import poller, report, uevent_clock
from bench.benchmark import FULL, QUICK, Where

FIGURE_KEYS = (
    "event_to_post_ms_p50",
    "event_to_post_ms_p99",
    "replug_to_operational_s_p50",
    "startup_ready_ms_p50",
    "idle_rss_mb",
    "rss_growth_kb_per_1k_events",
    "idle_cpu_ms_per_min",
    "idle_requests_per_hour",
    "storm_all_operational_s",
    "klipper_replug_overhead_s_p50",
    "klipper_idle_requests_per_hour",
)


# --- statistics ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([5.0], 50, 5.0),
        ([5.0], 99, 5.0),
        ([1.0, 2.0, 3.0, 4.0], 0, 1.0),
        ([1.0, 2.0, 3.0, 4.0], 100, 4.0),
        ([1.0, 2.0, 3.0, 4.0], 50, 2.5),  # between the two middle ones
        ([4.0, 1.0, 3.0, 2.0], 50, 2.5),  # order does not matter
        ([1.0, 2.0, 3.0], 50, 2.0),
        (list(range(1, 101)), 99, 99.01),  # rank 0.99 * 99 = 98.01
        (list(range(1, 201)), 99, 198.01),
        ([10.0, 20.0], 25, 12.5),
    ],
)
def test_percentile_interpolates_between_ranks(
    values: list[float], q: float, expected: float
) -> None:
    assert report.percentile(values, q) == pytest.approx(expected)


def test_percentile_matches_the_numpy_definition_on_an_uneven_sample() -> None:
    values = [0.3, 7.0, 1.2, 9.9, 4.4, 4.4, 2.0]
    ordered = sorted(values)
    for q in (1, 10, 33.3, 50, 90, 99):
        rank = q / 100 * (len(ordered) - 1)
        low, high = math.floor(rank), math.ceil(rank)
        expected = ordered[low] + (ordered[high] - ordered[low]) * (rank - low)
        assert report.percentile(values, q) == pytest.approx(expected)


def test_percentile_refuses_no_samples_and_bad_percentiles() -> None:
    with pytest.raises(ValueError, match="no samples"):
        report.percentile([], 50)
    with pytest.raises(ValueError, match=r"not within 0\.\.100"):
        report.percentile([1.0], 101)
    with pytest.raises(ValueError, match=r"not within 0\.\.100"):
        report.percentile([1.0], -1)


def test_summary_names_count_and_spread() -> None:
    assert report.summary([]) == {"n": 0}
    assert report.summary([3.0, 1.0, 2.0]) == {
        "n": 3,
        "min": 1.0,
        "p50": 2.0,
        "p90": 2.8,
        "p99": 2.98,
        "max": 3.0,
    }


def test_per_hour_extrapolates_the_window() -> None:
    assert report.per_hour(12, 60.0) == 720.0
    assert report.per_hour(0, 300.0) == 0.0
    assert report.per_hour(15, 75.2) == 718.1
    with pytest.raises(ValueError, match="longer than 0 s"):
        report.per_hour(1, 0.0)


# --- targets -------------------------------------------------------------------------


def test_every_figure_of_the_issue_has_a_target() -> None:
    assert set(FIGURE_KEYS) | {"storm_connects", "klipper_restarts_per_burst"} == {
        f.key for f in report.FIGURES
    }
    assert {
        "poller_replug_to_operational_s_p50",
        "poller_idle_requests_per_hour",
        "udev_rule_replug_to_ready_s_p50",
        "udev_rule_restarts_per_burst",
    } == set(report.COMPARISON_KEYS)


@pytest.mark.parametrize(
    ("key", "value", "met"),
    [
        ("event_to_post_ms_p50", 5.0, True),
        ("event_to_post_ms_p50", 5.01, False),
        ("event_to_post_ms_p99", 19.9, True),
        ("replug_to_operational_s_p50", 1.5, True),  # settle 1 s + 0.5 s
        ("replug_to_operational_s_p50", 1.51, False),
        ("startup_ready_ms_p50", 301.0, False),
        ("idle_rss_mb", 32.0, True),
        ("idle_rss_mb", 33.1, False),
        ("rss_growth_kb_per_1k_events", 50.0, True),
        ("idle_cpu_ms_per_min", 10.5, False),
        ("idle_requests_per_hour", 0.0, True),
        ("idle_requests_per_hour", 0.1, False),
        ("storm_all_operational_s", 3.0, True),  # settle 1 s + 2 s
        ("storm_all_operational_s", 3.2, False),
        ("storm_connects", 32.0, True),
        ("storm_connects", 31.0, False),
        ("storm_connects", 33.0, False),
    ],
)
def test_targets(key: str, value: float, met: bool) -> None:
    figure = next(f for f in report.FIGURES if f.key == key)
    assert figure.met(value) is met
    assert figure.met(None) is None


def test_target_text() -> None:
    targets = {f.key: f.target for f in report.FIGURES}
    assert targets["event_to_post_ms_p50"] == "<= 5 ms"
    assert targets["storm_connects"] == "== 32"
    assert targets["idle_requests_per_hour"] == "<= 0"


# --- the report --------------------------------------------------------------------------


def _document(figures: dict[str, float | None]) -> dict[str, Any]:
    return report.build_report(
        figures,
        mode="quick",
        machine={"cpu": "AMD EPYC", "cpus": 2, "arch": "x86_64", "python": "3.11.7"},
        details={"idle": {"window_s": 60.0}},
        notes=["a note"],
    )


def test_report_has_every_key_even_when_nothing_was_measured() -> None:
    document = _document({})
    assert report.missing_keys(document) == []
    for key in report.KEYS:
        assert document[key] is None
    assert all(v is None for v in document["met"].values())
    # JSON all the way down: what --json prints.
    assert json.loads(json.dumps(document)) == document


def test_report_shape_with_figures() -> None:
    figures: dict[str, float | None] = {key: 1.0 for key in FIGURE_KEYS}
    figures["storm_connects"] = 32
    figures["idle_requests_per_hour"] = 0.0
    figures["poller_idle_requests_per_hour"] = 720.0
    figures["klipper_replug_overhead_s_p50"] = 0.2
    figures["klipper_restarts_per_burst"] = 1
    figures["klipper_idle_requests_per_hour"] = 0.0
    figures["udev_rule_restarts_per_burst"] = 3
    document = _document(figures)
    assert report.missing_keys(document) == []
    assert document["event_to_post_ms_p50"] == 1.0
    assert document["poller_idle_requests_per_hour"] == 720.0
    assert document["poller_replug_to_operational_s_p50"] is None
    assert document["met"] == {f.key: True for f in report.FIGURES}
    assert set(document["targets"]) == {f.key for f in report.FIGURES}
    row = next(
        line
        for line in report.text_table(document).splitlines()
        if line.startswith("poller_idle_requests_per_hour")
    )
    assert row.split() == ["poller_idle_requests_per_hour", "720", "(the", "poller)"]
    rule = next(
        line
        for line in report.text_table(document).splitlines()
        if line.startswith("udev_rule_restarts_per_burst")
    )
    assert rule.split() == ["udev_rule_restarts_per_burst", "3", "(the", "udev", "rule)"]
    assert document["mode"] == "quick"
    assert document["notes"] == ["a note"]
    assert {"machine", "details", "targets", "met", "mode", "notes"} <= set(document)


def test_report_refuses_an_unknown_figure() -> None:
    with pytest.raises(ValueError, match="unknown figures: latency_ms"):
        _document({"latency_ms": 3.0})


def test_missing_keys_names_what_a_broken_report_lacks() -> None:
    document = _document({})
    del document["idle_rss_mb"]
    del document["storm_connects"]
    assert report.missing_keys(document) == ["idle_rss_mb", "storm_connects"]


def test_text_table_shows_values_targets_and_verdicts() -> None:
    document = _document({"idle_rss_mb": 33.1, "startup_ready_ms_p50": 234.2})
    text = report.text_table(document)
    lines = text.splitlines()
    assert lines[0].split() == ["figure", "value", "target", "met"]
    row = next(line for line in lines if line.startswith("idle_rss_mb"))
    assert row.split() == ["idle_rss_mb", "33.1", "MB", "<=", "32", "MB", "NO"]
    row = next(line for line in lines if line.startswith("startup_ready_ms_p50"))
    assert row.split()[-1] == "yes"
    row = next(line for line in lines if line.startswith("storm_connects"))
    assert "not measured" in row and row.split()[-1] == "-"
    row = next(line for line in lines if line.startswith("poller_replug_to_operational_s_p50"))
    assert row.split() == [
        "poller_replug_to_operational_s_p50",
        "not",
        "measured",
        "(the",
        "poller)",
    ]
    assert "machine: AMD EPYC, 2 CPUs, x86_64" in text
    assert "note: a note" in text


# --- /proc ------------------------------------------------------------------------------


def test_vmrss_from_proc_status() -> None:
    text = "Name:\tpython\nVmPeak:\t  40000 kB\nVmRSS:\t   33860 kB\nRssAnon:\t 20000 kB\n"
    assert report.vmrss_kb(text) == 33860
    with pytest.raises(ValueError, match="no VmRSS"):
        report.vmrss_kb("Name:\tkworker\n")


def test_stat_cpu_ticks_counts_from_the_last_parenthesis() -> None:
    # utime 150, stime 25; a command name with a space and a parenthesis in it.
    fields = ["S", "1", "2", "3", "0", "-1", "4194304", "10", "0", "0", "0", "150", "25"]
    fields += ["0", "0", "20", "0", "5", "0", "100"]
    text = "4242 (python (bench) x) " + " ".join(fields)
    assert report.stat_cpu_ticks(text) == 175
    with pytest.raises(ValueError, match="not a /proc/PID/stat line"):
        report.stat_cpu_ticks("no parenthesis here")
    with pytest.raises(ValueError, match="too short"):
        report.stat_cpu_ticks("1 (x) S 1 2")


def test_stat_cpu_ticks_of_this_process_is_a_count() -> None:
    assert report.stat_cpu_ticks(Path(f"/proc/{os.getpid()}/stat").read_text()) >= 0


def test_schedstat_first_field_is_time_on_cpu() -> None:
    assert report.schedstat_ns("521408 121548 2\n") == 521408
    with pytest.raises(ValueError, match="empty"):
        report.schedstat_ns("")


@pytest.mark.parametrize(
    ("cpuinfo", "name", "count"),
    [
        (
            "processor\t: 0\nmodel name\t: AMD EPYC\n\nprocessor\t: 1\nmodel name\t: AMD EPYC\n",
            "AMD EPYC",
            2,
        ),
        (  # a Raspberry Pi 4: no model name, a Model line at the end
            "processor\t: 0\nBogoMIPS\t: 108.00\nCPU part\t: 0xd08\n\n"
            "Hardware\t: BCM2835\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
            "Raspberry Pi 4 Model B Rev 1.4",
            1,
        ),
        ("processor\t: 0\nCPU part\t: 0xd03\n", "0xd03", 1),
        ("", "unknown CPU", 0),
    ],
)
def test_cpu_model(cpuinfo: str, name: str, count: int) -> None:
    assert report.cpu_model(cpuinfo) == (name, count)


def test_machine_line() -> None:
    line = report.machine_line(
        {
            "cpu": "AMD EPYC",
            "cpus": 2,
            "arch": "x86_64",
            "memory_gb": 23.5,
            "kernel": "6.1",
            "python": "3.11.7",
        }
    )
    assert line == "AMD EPYC, 2 CPUs, x86_64, 23.5 GB, Linux 6.1, Python 3.11.7"


# --- the uevent clock's parsing ------------------------------------------------------------


def _udev_message(properties: dict[str, str]) -> bytes:
    payload = b"".join(f"{k}={v}".encode() + b"\0" for k, v in properties.items())
    header = struct.pack("8sIIII", b"libudev\0", 0xFEEDCAFE, 40, 40, len(payload))
    return header + b"\0" * (40 - len(header)) + payload


def test_udev_message_properties() -> None:
    message = _udev_message({"ACTION": "add", "DEVPATH": "/devices/x/tty/ttyACM0", "A": "b=c"})
    assert uevent_clock.udev_properties(message) == {
        "ACTION": "add",
        "DEVPATH": "/devices/x/tty/ttyACM0",
        "A": "b=c",
    }
    assert uevent_clock.udev_properties(b"kernel\0add@/devices/x") == {}
    assert uevent_clock.udev_properties(b"") == {}


def test_delivered_at_reads_the_kernel_timestamp() -> None:
    stamp = struct.pack("qq", 1_795_445_155, 228_471_500)
    ancillary = [(0x1, 0x2, b"creds"), (1, uevent_clock.SO_TIMESTAMPNS, stamp)]
    assert uevent_clock.delivered_at(ancillary) == pytest.approx(1_795_445_155.2284715)
    assert uevent_clock.delivered_at([]) is None


# --- the comparison poller's rules -------------------------------------------------------------


@pytest.mark.parametrize(
    ("state", "offline"),
    [
        ("Closed", True),
        ("Error", True),
        ("Offline after error", True),
        ("Operational", False),
        ("Printing", False),
        ("Connecting", False),
        ("Opening serial connection", False),
    ],
)
def test_poller_counts_what_the_plugin_counts_as_offline(state: str, offline: bool) -> None:
    assert poller.is_offline(state) is offline


def test_poller_checks_the_port_under_the_testbed_root(tmp_path: Path) -> None:
    link = tmp_path / "dev" / "serial" / "by-id" / "usb-printer"
    link.parent.mkdir(parents=True)
    assert not poller.port_exists("/dev/serial/by-id/usb-printer", str(tmp_path))
    link.write_text("")
    assert poller.port_exists("/dev/serial/by-id/usb-printer", str(tmp_path))


# --- the plans ------------------------------------------------------------------------------


def test_the_full_run_measures_what_the_issue_asks() -> None:
    assert FULL.event_cycles >= 200
    assert FULL.real_cycles >= 10
    assert FULL.rss_events == 10_000
    assert FULL.idle_seconds == 300
    assert QUICK.idle_seconds == 60
    assert QUICK.event_cycles >= 200


def test_where_keeps_logs_and_runtime_apart(tmp_path: Path) -> None:
    where = Where(tmp_path / "logs", tmp_path / "tmpfs", tmp_path / "bytecode").sub("idle")
    assert where.logs == tmp_path / "logs" / "idle"
    assert where.runtime == tmp_path / "tmpfs" / "idle"
    assert where.bytecode == tmp_path / "bytecode", "one cache for every phase"
