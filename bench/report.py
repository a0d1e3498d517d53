"""The pure half of the benchmark: figures, targets, statistics, /proc parsing, output.

Nothing here starts a process or reads a clock, so ``tests/test_bench.py`` checks all
of it quickly; :mod:`bench.benchmark` does the measuring and hands its numbers here.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

# The settle window the targets that depend on it are stated for (seconds).
TARGET_SETTLE = 1.0


@dataclass(frozen=True)
class Figure:
    """One headline figure: its JSON key, what it measures, and its target."""

    key: str
    unit: str
    what: str
    limit: float
    compare: str  # "<=" or "=="

    def met(self, value: float | None) -> bool | None:
        """Given a measured value (or None), return whether it meets the target, or None."""
        if value is None:
            return None
        check: Callable[[float, float], bool] = operator.le if self.compare == "<=" else _equal
        return bool(check(value, self.limit))

    @property
    def target(self) -> str:
        """Return the target as text: ``<= 5 ms``, ``== 32``."""
        unit = f" {self.unit}" if self.unit else ""
        return f"{self.compare} {self.limit:g}{unit}"


def _equal(a: float, b: float) -> bool:
    return a == b


FIGURES: tuple[Figure, ...] = (
    Figure(
        "event_to_post_ms_p50",
        "ms",
        "udev add sent (umockdev) -> connect POST received by a loopback stand-in, "
        "minus the settle window; median",
        5.0,
        "<=",
    ),
    Figure("event_to_post_ms_p99", "ms", "the same, 99th percentile", 20.0, "<="),
    Figure(
        "replug_to_operational_s_p50",
        "s",
        f"replug -> a real OctoPrint 1.11.8 shows Operational, settle {TARGET_SETTLE:g} s; median",
        TARGET_SETTLE + 0.5,
        "<=",
    ),
    Figure("startup_ready_ms_p50", "ms", "process start -> READY=1; median", 300.0, "<="),
    Figure("idle_rss_mb", "MB", "resident memory, idle, 4 printers configured", 32.0, "<="),
    Figure(
        "rss_growth_kb_per_1k_events",
        "KB",
        "resident memory growth per 1,000 udev add/remove events",
        50.0,
        "<=",
    ),
    Figure("idle_cpu_ms_per_min", "ms", "CPU time per idle minute", 10.0, "<="),
    Figure(
        "idle_requests_per_hour",
        "",
        "HTTP requests to OctoPrint per idle hour, printers connected",
        0.0,
        "<=",
    ),
    Figure(
        "storm_all_operational_s",
        "s",
        f"32 printers replugged within 200 ms -> all Operational, settle {TARGET_SETTLE:g} s "
        "(slowest storm)",
        TARGET_SETTLE + 2.0,
        "<=",
    ),
    Figure("storm_connects", "", "connects per storm of 32 printers", 32.0, "=="),
    Figure(
        "klipper_replug_overhead_s_p50",
        "s",
        "Klipper board switched on -> Klippy ready, minus the settle window and Klippy's own "
        "restart time (measured in the same run); median",
        0.3,
        "<=",
    ),
    Figure(
        "klipper_restarts_per_burst",
        "",
        "FIRMWARE_RESTARTs sent for a Klipper board announced 3 times within 0.2 s",
        1.0,
        "==",
    ),
    Figure(
        "klipper_idle_requests_per_hour",
        "",
        "HTTP requests to Moonraker per idle hour, Klippy ready",
        0.0,
        "<=",
    ),
)

# Shown beside ours: a poller doing what the OctoPrint reconnect plugins do.
# And a udev rule that posts FIRMWARE_RESTART on every add: what Klipper users run today.
COMPARISON_KEYS: tuple[str, ...] = (
    "poller_replug_to_operational_s_p50",
    "poller_idle_requests_per_hour",
    "udev_rule_replug_to_ready_s_p50",
    "udev_rule_restarts_per_burst",
)

COMPARISON_UNITS = {
    "poller_replug_to_operational_s_p50": "s",
    "poller_idle_requests_per_hour": "",
    "udev_rule_replug_to_ready_s_p50": "s",
    "udev_rule_restarts_per_burst": "",
}

KEYS: tuple[str, ...] = tuple(f.key for f in FIGURES) + COMPARISON_KEYS


def percentile(values: Sequence[float], q: float) -> float:
    """Given samples and a percentile 0..100, return it, interpolating between ranks.

    The same definition as numpy's default ("linear"): the value at rank
    ``q/100 * (n-1)`` of the sorted samples. Raise ValueError if there are none
    or ``q`` is out of range.
    """
    if not values:
        raise ValueError("no samples")
    if not 0.0 <= q <= 100.0 or math.isnan(q):
        raise ValueError(f"percentile {q} is not within 0..100")
    ordered = sorted(values)
    rank = q / 100.0 * (len(ordered) - 1)
    low = math.floor(rank)
    high = math.ceil(rank)
    if low == high:
        return float(ordered[low])
    fraction = rank - low
    return float(ordered[low] + (ordered[high] - ordered[low]) * fraction)


def summary(values: Sequence[float]) -> dict[str, float | int]:
    """Given samples, return their count, min, p50, p90, p99 and max (rounded to 0.001)."""
    if not values:
        return {"n": 0}
    return {
        "n": len(values),
        "min": round(min(values), 3),
        "p50": round(percentile(values, 50), 3),
        "p90": round(percentile(values, 90), 3),
        "p99": round(percentile(values, 99), 3),
        "max": round(max(values), 3),
    }


def per_hour(count: int, seconds: float) -> float:
    """Given a count seen over a window of ``seconds``, return it extrapolated to an hour."""
    if seconds <= 0:
        raise ValueError("the window must be longer than 0 s")
    return round(count * 3600.0 / seconds, 1)


def build_report(
    figures: Mapping[str, float | None],
    *,
    mode: str,
    machine: Mapping[str, Any],
    details: Mapping[str, Any],
    notes: Sequence[str],
) -> dict[str, Any]:
    """Given the measured figures (missing ones None), return the JSON document.

    Every key of :data:`KEYS` is present at the top level, null when not measured;
    ``targets`` and ``met`` hold each target and whether it was met. Raise
    ValueError for a figure key that is not one of :data:`KEYS`.
    """
    unknown = sorted(set(figures) - set(KEYS))
    if unknown:
        raise ValueError(f"unknown figures: {', '.join(unknown)}")
    document: dict[str, Any] = {key: figures.get(key) for key in KEYS}
    document["targets"] = {f.key: f.target for f in FIGURES}
    document["met"] = {f.key: f.met(figures.get(f.key)) for f in FIGURES}
    document["mode"] = mode
    document["machine"] = dict(machine)
    document["details"] = dict(details)
    document["notes"] = list(notes)
    return document


def missing_keys(document: Mapping[str, Any]) -> list[str]:
    """Given a report, return the keys of :data:`KEYS` it lacks (null counts as present)."""
    return [key for key in KEYS if key not in document]


def text_table(document: Mapping[str, Any]) -> str:
    """Given a report, return it as a table for people, with the notes below it."""
    rows = [("figure", "value", "target", "met")]
    for figure in FIGURES:
        value = document.get(figure.key)
        met = document.get("met", {}).get(figure.key)
        shown = "not measured" if value is None else f"{value:g} {figure.unit}".strip()
        verdict = {True: "yes", False: "NO", None: "-"}[met]
        rows.append((figure.key, shown, figure.target, verdict))
    for key in COMPARISON_KEYS:
        value = document.get(key)
        shown = "not measured" if value is None else f"{value:g} {COMPARISON_UNITS[key]}".strip()
        who = "(the udev rule)" if key.startswith("udev_rule") else "(the poller)"
        rows.append((key, shown, who, ""))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    machine = document.get("machine", {})
    if machine:
        lines.append("")
        lines.append(f"machine: {machine_line(machine)}")
    for note in document.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


def machine_line(machine: Mapping[str, Any]) -> str:
    """Given the machine description, return it as one line."""
    parts = [
        str(machine.get("cpu", "unknown CPU")),
        f"{machine.get('cpus', '?')} CPUs",
        str(machine.get("arch", "?")),
        f"{machine.get('memory_gb', '?')} GB",
        f"Linux {machine.get('kernel', '?')}",
        f"Python {machine.get('python', '?')}",
    ]
    return ", ".join(parts)


# --- /proc --------------------------------------------------------------------------


def vmrss_kb(status_text: str) -> int:
    """Given /proc/PID/status, return VmRSS in KB; raise ValueError if it has none."""
    for line in status_text.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError("no VmRSS line (a kernel thread, or the process is a zombie)")


def stat_cpu_ticks(stat_text: str) -> int:
    """Given /proc/PID/stat, return utime + stime in clock ticks (all threads).

    The command name (field 2) may hold spaces and parentheses, so the fields are
    counted from the last ``)``. Raise ValueError if the text is not that shape.
    """
    head, sep, rest = stat_text.rpartition(")")
    if not sep or not head:
        raise ValueError("not a /proc/PID/stat line")
    fields = rest.split()
    # rest starts at field 3 (state); utime and stime are fields 14 and 15.
    if len(fields) < 13:
        raise ValueError("/proc/PID/stat line too short")
    return int(fields[11]) + int(fields[12])


def schedstat_ns(schedstat_text: str) -> int:
    """Given /proc/PID/task/TID/schedstat, return the time spent on a CPU, in ns."""
    fields = schedstat_text.split()
    if not fields:
        raise ValueError("empty schedstat")
    return int(fields[0])


def cpu_model(cpuinfo_text: str) -> tuple[str, int]:
    """Given /proc/cpuinfo, return the CPU's name and the number of processors listed.

    x86 names it in ``model name``; ARM boards (a Raspberry Pi) in ``Model`` or
    ``Hardware``, or only by ``CPU part``.
    """
    names: dict[str, str] = {}
    count = 0
    for line in cpuinfo_text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "processor":
            count += 1
        elif key in ("model name", "Model", "Hardware", "CPU part") and value:
            names.setdefault(key, value)
    for key in ("model name", "Model", "Hardware", "CPU part"):
        if key in names:
            return names[key], count
    return "unknown CPU", count
