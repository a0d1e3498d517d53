"""Per-printer request threads that feed answers back into the one main loop.

The main loop owns every decision and all state. An HTTP request can take up to the
configured timeout, so it runs in the printer's own worker thread instead: one slow
or dead OctoPrint then never delays the loop, the watchdog, or another printer.
Workers touch no state; they run the call they are handed and queue its result,
then write a byte to a socketpair that the loop's selector watches.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")
Job = Callable[[], object]


@dataclass(frozen=True)
class Completed(Generic[T]):
    """A finished call: who asked (``owner``), what it was (``request``), its result."""

    key: str
    owner: object
    request: T
    result: object


@dataclass(frozen=True)
class _Task:
    owner: object
    request: object
    job: Job


class _Worker:
    def __init__(self, key: str, done: Callable[[Completed[object]], None]) -> None:
        self.key = key
        self._tasks: queue.SimpleQueue[_Task | None] = queue.SimpleQueue()
        self._done = done
        self._thread = threading.Thread(target=self._run, name=f"requests-{key}", daemon=True)
        self._thread.start()

    def submit(self, task: _Task) -> None:
        self._tasks.put(task)

    def retire(self) -> None:
        self._tasks.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        while (task := self._tasks.get()) is not None:
            try:
                result = task.job()
            except Exception as error:  # a bug in a job must not kill the worker silently
                log.exception("request for %s failed unexpectedly", self.key)
                result = error
            self._done(Completed(self.key, task.owner, task.request, result))


class RequestWorkers:
    """Runs calls in one thread per key and hands their results to the loop."""

    def __init__(self) -> None:
        self._workers: dict[str, _Worker] = {}
        self._results: queue.SimpleQueue[Completed[object]] = queue.SimpleQueue()
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._wake_reader.setblocking(False)
        self._wake_writer.setblocking(False)

    def fileno(self) -> int:
        """Return the fd that becomes readable when a result is waiting."""
        return self._wake_reader.fileno()

    def submit(self, key: str, owner: object, request: object, job: Job) -> None:
        """Given a key (the printer), run ``job`` in that key's thread, after its earlier jobs."""
        worker = self._workers.get(key)
        if worker is None:
            worker = self._workers[key] = _Worker(key, self._finished)
        worker.submit(_Task(owner, request, job))

    def collect(self) -> list[Completed[object]]:
        """Return every result that arrived, oldest first; never blocks."""
        try:
            while self._wake_reader.recv(4096):
                pass
        except BlockingIOError:
            pass
        done: list[Completed[object]] = []
        while True:
            try:
                done.append(self._results.get_nowait())
            except queue.Empty:
                return done

    def retire(self, key: str) -> None:
        """Given a key no longer in use (a printer removed by a reload), end its thread."""
        worker = self._workers.pop(key, None)
        if worker is not None:
            worker.retire()

    def close(self, timeout: float = 1.0) -> None:
        """End every thread; a request still running is abandoned (threads are daemons)."""
        workers = list(self._workers.values())
        self._workers.clear()
        for worker in workers:
            worker.retire()
        for worker in workers:
            worker.join(timeout)
        self._wake_reader.close()
        self._wake_writer.close()

    def _finished(self, completed: Completed[object]) -> None:
        self._results.put(completed)
        # A full buffer already holds wake-ups; a closed socket means we are stopping.
        with contextlib.suppress(OSError):
            self._wake_writer.send(b"\0")
