"""What users run instead of reconnectd: a poller that behaves like OctoPrint-SerialReconnect.

It is the comparison in ``bench/run``, written from the plugin's documented behaviour
(its defaults: look every 5 s, connect after 3 offline looks, wait 10 s before
looking again after a connect), and run as its own process against the same
OctoPrint and fake printer as reconnectd:

- start: wait ``initial_delay``, then look at once and every ``interval`` seconds;
- a look reads ``GET /api/connection``; ``Closed`` (OctoPrint's word for offline,
  with or without an error) or ``Error`` counts as offline, anything else resets;
- after ``offline`` offline looks in a row: if the preferred port exists, POST a
  connect to it at the preferred baudrate; either way start over with the
  initial delay.

The plugin lives inside OctoPrint and reads the state in-process; this one asks over
HTTP, so the requests it makes are the looks the plugin makes. Loopback only, and it
stops by itself after ``--max-seconds``. The API key comes from ``$POLLER_API_KEY``.

    python bench/poller.py --url http://127.0.0.1:5000 --port /dev/serial/by-id/... \\
        --baudrate 115200 [--dev-root TESTBED_ROOT] [--max-seconds 600]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import requests

OFFLINE_STATES = frozenset({"Closed", "Error", "Offline", "Offline after error"})


def is_offline(state: str) -> bool:
    """Given ``current.state`` from ``/api/connection``, return whether the plugin counts it."""
    return state in OFFLINE_STATES


def port_exists(port: str, dev_root: str) -> bool:
    """Given a port path and the root its /dev lives under ("" for the host's), return
    whether the node or link is there (the plugin's ``os.path.exists``)."""
    return os.path.exists(os.path.join(dev_root, port.lstrip("/")) if dev_root else port)


class Poller:
    """The plugin's two timers and its counter, as one loop."""

    def __init__(
        self,
        url: str,
        key: str,
        port: str,
        baudrate: int,
        *,
        dev_root: str,
        interval: float,
        offline: int,
        initial_delay: float,
    ) -> None:
        self.url = url.rstrip("/")
        self.port = port
        self.baudrate = baudrate
        self.dev_root = dev_root
        self.interval = interval
        self.offline = offline
        self.initial_delay = initial_delay
        self.session = requests.Session()
        self.session.headers["X-Api-Key"] = key
        self.looks = 0
        self.connects = 0

    def run(self, max_seconds: float) -> None:
        """Look and connect as the plugin does until ``max_seconds`` have passed."""
        end = time.monotonic() + max_seconds
        while _sleep_until(time.monotonic() + self.initial_delay, end):
            offline = 0
            while True:
                state = self.look()
                offline = offline + 1 if state is None or is_offline(state) else 0
                if offline >= self.offline:
                    self.reconnect()
                    break  # start over, initial delay included
                if not _sleep_until(time.monotonic() + self.interval, end):
                    return

    def look(self) -> str | None:
        """Return OctoPrint's connection state, or None if it did not answer."""
        self.looks += 1
        try:
            answer = self.session.get(f"{self.url}/api/connection", timeout=5)
            answer.raise_for_status()
            return str(answer.json()["current"]["state"])
        except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
            _say(f"look failed: {type(exc).__name__}")
            return None

    def reconnect(self) -> None:
        """Connect to the preferred port, unless its node is missing (printer off)."""
        if not port_exists(self.port, self.dev_root):
            _say(f"serial port {self.port} not found; not connecting")
            return
        self.connects += 1
        _say(f"connecting to {self.port} at {self.baudrate}")
        try:
            self.session.post(
                f"{self.url}/api/connection",
                json={"command": "connect", "port": self.port, "baudrate": self.baudrate},
                timeout=5,
            )
        except requests.RequestException as exc:
            _say(f"connect failed: {type(exc).__name__}")


def _sleep_until(when: float, end: float) -> bool:
    """Sleep until ``when``; return False (at ``end``) if that is past the end."""
    if when >= end:
        time.sleep(max(0.0, end - time.monotonic()))
        return False
    time.sleep(max(0.0, when - time.monotonic()))
    return True


def _say(text: str) -> None:
    print(f"poller: {text}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Given the command line, poll until the time is up; return the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--port", required=True, help="the preferred port (a by-id link)")
    parser.add_argument("--baudrate", type=int, default=115200)
    parser.add_argument("--dev-root", default="", help="where the port's /dev lives (a testbed)")
    parser.add_argument("--interval", type=float, default=5.0)
    parser.add_argument("--offline", type=int, default=3)
    parser.add_argument("--initial-delay", type=float, default=10.0)
    parser.add_argument("--max-seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    if not args.url.startswith(("http://127.", "http://localhost", "http://[::1]")):
        parser.error("the poller talks to a loopback OctoPrint only")
    key = os.environ.get("POLLER_API_KEY", "")
    poller = Poller(
        args.url,
        key,
        args.port,
        args.baudrate,
        dev_root=args.dev_root,
        interval=args.interval,
        offline=args.offline,
        initial_delay=args.initial_delay,
    )
    with contextlib.suppress(KeyboardInterrupt):
        poller.run(args.max_seconds)
    _say(f"done: {poller.looks} looks, {poller.connects} connects")
    return 0


if __name__ == "__main__":
    sys.exit(main())
