"""The core scenarios against every other OctoPrint a user may run.

tests/test_end_to_end.py runs every behaviour against OctoPrint 1.11.8. Here the
core ones run, unchanged, against 1.9.3, 1.10.3 and 2.0.0rc7 (``$OCTOPRINT_BINS``,
installed by tests/bootstrap), each on a bench of its own: a power cycle is
reconnected, a manual Disconnect is respected, a printing printer is left alone,
the stuck opening state is recovered, and a reconnect plugin is warned about.
What differs between versions is read in reconnectd/octoprint_state.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconnectd.host import HostView
from reconnectd.octoprint_api import OctoPrintApi
from tests import test_end_to_end as e2e
from tests.support.bench import Bench, open_bench, tidy
from tests.support.octoprint_instance import other_octoprint_bins
from tests.support.real import missing
from tests.support.testbed import unavailable_reason

pytestmark = [pytest.mark.umockdev, pytest.mark.octoprint]

CORE_SCENARIOS: dict[str, Callable[[Bench], None]] = {
    "power cycle": e2e.test_power_cycle_is_reconnected_once_to_the_by_id_link,
    "manual disconnect": e2e.test_manual_disconnect_is_respected_across_reload_and_restart,
    "printing untouched": e2e.test_printing_printer_is_never_touched,
    "stuck state": e2e.test_stuck_opening_state_is_recovered,
    "reconnect plugin": e2e.test_an_enabled_reconnect_plugin_is_warned_about,
}

VERSIONS = other_octoprint_bins()


@pytest.fixture(scope="module", params=sorted(VERSIONS))
def version_bench(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Bench]:
    version: str = request.param
    binary = VERSIONS[version]
    reason = unavailable_reason()
    if reason:
        missing(reason)
    if not Path(binary).exists():
        missing(f"no OctoPrint {version} at {binary} (tests/bootstrap installs it)")
    with open_bench(tmp_path_factory.mktemp(f"octoprint-{version}"), binary) as bench:
        assert bench.octoprint.version == version
        # The stuck state is waited for at the contract's 20 s on 1.11.8
        # (test_end_to_end.py); here the same rule with a shorter setting.
        bench.timings = "stuck_after = 3\nretry_first = 1\n"
        yield bench


@pytest.fixture
def bench(version_bench: Bench) -> Iterator[Bench]:
    yield version_bench
    tidy(version_bench)


@pytest.mark.parametrize("scenario", CORE_SCENARIOS)
def test_core_scenario(bench: Bench, scenario: str) -> None:
    CORE_SCENARIOS[scenario](bench)


def test_the_client_reads_whether_or_not_connections_are_kept(
    bench: Bench, caplog: pytest.LogCaptureFixture
) -> None:
    """1.9.3 drops kept-alive connections (the client then asks again, and stops
    keeping them); the others keep them. Every read must succeed either way."""
    caplog.set_level(logging.DEBUG, logger="reconnectd.http_transport")
    api = OctoPrintApi(bench.octoprint.url, bench.octoprint.api_key, 5.0)
    try:
        for _ in range(10):
            assert isinstance(api.read(), HostView)
            # A pause as between reconnectd's looks: 1.9.3 drops the connection in it.
            time.sleep(0.1)
    finally:
        api.close()
    dropped = [r for r in caplog.records if "kept-alive connection dropped" in r.getMessage()]
    assert len(dropped) == (1 if bench.octoprint.version == "1.9.3" else 0), dropped
