"""Request workers: results come back to the loop through a selectable fd."""

from __future__ import annotations

import selectors
import threading
import time

from reconnectd.workers import RequestWorkers


def wait_for_results(workers: RequestWorkers, count: int, timeout: float = 5.0) -> list[object]:
    """Wait on the wake fd the way the main loop does, until `count` results arrived."""
    selector = selectors.DefaultSelector()
    selector.register(workers.fileno(), selectors.EVENT_READ)
    results: list[object] = []
    deadline = time.monotonic() + timeout
    while len(results) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"only {len(results)} of {count} results arrived"
        if selector.select(remaining):
            results.extend(workers.collect())
    selector.close()
    return results


def test_results_wake_the_selector_and_carry_owner_request_and_result() -> None:
    workers = RequestWorkers()
    owner = object()
    try:
        workers.submit("mk3s", owner, "read", lambda: 42)
        [done] = wait_for_results(workers, 1)
        assert done.key == "mk3s" and done.owner is owner  # type: ignore[attr-defined]
        assert done.request == "read" and done.result == 42  # type: ignore[attr-defined]
        assert workers.collect() == []
    finally:
        workers.close()


def test_a_blocked_printer_does_not_delay_another() -> None:
    workers = RequestWorkers()
    release = threading.Event()
    try:
        workers.submit("slow", None, "read", lambda: release.wait(10))
        workers.submit("fast", None, "read", lambda: "ok")
        [done] = wait_for_results(workers, 1, timeout=2.0)
        assert done.key == "fast"  # type: ignore[attr-defined]
        release.set()
        [late] = wait_for_results(workers, 1)
        assert late.key == "slow" and late.result is True  # type: ignore[attr-defined]
    finally:
        release.set()
        workers.close()


def test_one_printers_requests_run_in_order() -> None:
    workers = RequestWorkers()
    try:
        for n in range(20):
            workers.submit("mk3s", None, n, lambda n=n: n * n)  # type: ignore[misc]
        results = wait_for_results(workers, 20)
        assert [r.result for r in results] == [n * n for n in range(20)]  # type: ignore[attr-defined]
    finally:
        workers.close()


def test_an_exception_in_a_job_becomes_a_result_not_a_dead_worker() -> None:
    workers = RequestWorkers()
    try:
        workers.submit("mk3s", None, "bad", lambda: 1 / 0)
        workers.submit("mk3s", None, "good", lambda: "still alive")
        bad, good = wait_for_results(workers, 2)
        assert isinstance(bad.result, ZeroDivisionError)  # type: ignore[attr-defined]
        assert good.result == "still alive"  # type: ignore[attr-defined]
    finally:
        workers.close()


def test_retired_and_closed_workers_end_their_threads() -> None:
    workers = RequestWorkers()
    workers.submit("a", None, "x", lambda: 1)
    workers.submit("b", None, "x", lambda: 2)
    wait_for_results(workers, 2)
    names = {t.name for t in threading.enumerate()}
    assert {"requests-a", "requests-b"} <= names
    threads = [t for t in threading.enumerate() if t.name in ("requests-a", "requests-b")]
    workers.retire("a")
    workers.close()
    for thread in threads:
        thread.join(5)
        assert not thread.is_alive(), f"{thread.name} did not end"
