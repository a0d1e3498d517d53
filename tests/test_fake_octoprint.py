"""FakeOctoPrint against the real OctoPrint 1.11.8: one script, the same states.

The script (connect, connect again, disconnect, a port not offered, a wrong key, a
silent printer, a vanishing printer...) runs once against a real OctoPrint with a
fake Marlin on a plain pty, and once against :class:`FakeOctoPrint`. Each step
polls ``/api/job``, ``/api/connection``, ``/api/job`` every 20 ms and records the
distinct ``(current.state, job state, error is None)`` it sees, plus the status
and error text of every HTTP request the step makes. The fake must show what the
real one showed, step by step; the real one must show what the tests that use the
fake rely on.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

import pytest
import requests

from tests.support.fake_marlin import FakeMarlin, open_pty_port
from tests.support.fake_octoprint import (
    CLOSED,
    CONNECTING,
    DETECTING,
    OFFLINE,
    OFFLINE_AFTER_ERROR,
    OPENING,
    OPERATIONAL,
    FakeOctoPrint,
)
from tests.support.octoprint_instance import OctoPrintInstance, octoprint_bin

POLL = 0.02
STEP_TIMEOUT = 15.0
BAUDRATE = 115200
NOT_OFFERED = "/dev/ttyNOTOFFERED0"

# (current.state, job state, error is None)
Seen = tuple[str, str, bool]


# -- what the script drives: a real OctoPrint or the fake, and a printer ---------------


class Target(Protocol):
    port: str  # the printer's port, as OctoPrint offers it

    @property
    def url(self) -> str: ...

    @property
    def api_key(self) -> str: ...

    def printer_on(self) -> None:
        """A (new) printer appears on the port and answers."""

    def go_silent(self) -> None:
        """The printer stops answering (the port stays)."""

    def respond(self) -> None:
        """The printer answers again."""

    def vanish(self) -> None:
        """The printer's device goes away under an open connection."""


@dataclass
class RealTarget:
    octoprint: OctoPrintInstance
    port: str
    marlins: list[FakeMarlin] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.octoprint.url

    @property
    def api_key(self) -> str:
        return self.octoprint.api_key

    def printer_on(self) -> None:
        self.marlins.append(FakeMarlin(open_pty_port(Path(self.port))))

    def go_silent(self) -> None:
        self.marlins[-1].go_silent()

    def respond(self) -> None:
        self.marlins[-1].respond()

    def vanish(self) -> None:
        self.marlins[-1].vanish()

    def close(self) -> None:
        for marlin in self.marlins:
            marlin.stop()  # each master is closed once, by its FakeMarlin
        self.marlins.clear()


@dataclass
class FakeTarget:
    port: str
    silent_timeout: float
    device: str | None = None
    answers: bool = True
    fake: FakeOctoPrint = field(init=False)
    _names: Iterator[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.fake = FakeOctoPrint(
            lambda: [self.port], self._present, silent_timeout=self.silent_timeout
        )

    @property
    def url(self) -> str:
        return self.fake.url

    @property
    def api_key(self) -> str:
        return self.fake.api_key

    def _present(self, port: str) -> str | None:
        return self.device if port == self.port and self.answers else None

    def printer_on(self) -> None:
        self.device, self.answers = f"/dev/pts/{next(self._names)}", True

    def go_silent(self) -> None:
        self.answers = False

    def respond(self) -> None:
        self.answers = True

    def vanish(self) -> None:
        self.device = None


# -- the script ---------------------------------------------------------------------


@dataclass
class StepResult:
    seen: list[Seen]
    answers: list[tuple[int, str | None]]  # status and error text of each request

    @property
    def collapsed(self) -> list[Seen]:
        return collapse(self.seen)


@dataclass
class Client:
    target: Target
    session: requests.Session = field(default_factory=requests.Session)
    answers: list[tuple[int, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.session.headers["X-Api-Key"] = self.target.api_key

    def request(self, method: str, path: str, **kw: Any) -> requests.Response:
        response = self.session.request(method, self.target.url + path, timeout=10, **kw)
        error = None
        if response.content:
            body = response.json()
            error = body.get("error") if response.status_code >= 400 else None
        self.answers.append((response.status_code, error))
        return response

    def connect(self, port: str, baudrate: int | None = BAUDRATE) -> None:
        body: dict[str, Any] = {"command": "connect", "port": port}
        if baudrate is not None:
            body["baudrate"] = baudrate
        self.request("POST", "/api/connection", json=body)

    def disconnect(self) -> None:
        self.request("POST", "/api/connection", json={"command": "disconnect"})

    def observe(self) -> Seen:
        """One consistent sample: the job read before and after the connection agree."""
        while True:
            before = self._get("/api/job")
            current = self._get("/api/connection")["current"]
            after = self._get("/api/job")
            if (before["state"], before.get("error")) == (after["state"], after.get("error")):
                return (str(current["state"]), str(after["state"]), after.get("error") is None)

    def _get(self, path: str) -> dict[str, Any]:
        response = self.session.get(self.target.url + path, timeout=10)
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body


Until = Callable[[list[Seen]], bool]


def last_state(state: str) -> Until:
    return lambda seen: seen[-1][0] == state


def at_once(seen: list[Seen]) -> bool:
    return True


def closed_after_connecting(seen: list[Seen]) -> bool:
    return seen[-1][0] == CLOSED and any(s[0] == CONNECTING for s in seen)


def wrong_keys(client: Client) -> None:
    url, port = client.target.url, client.target.port
    for path in ("/api/connection", "/api/job"):
        response = requests.get(url + path, headers={"X-Api-Key": "0" * 32}, timeout=10)
        client.answers.append((response.status_code, response.json().get("error")))
    body = {"command": "connect", "port": port}
    for headers in ({"X-Api-Key": "0" * 32}, {}):
        response = requests.post(url + "/api/connection", json=body, headers=headers, timeout=10)
        client.answers.append((response.status_code, response.json().get("error")))
    # The right key, but a form instead of JSON.
    client.request("POST", "/api/connection", data={"command": "connect", "port": port})


Action = Callable[[Client], None]


def connect(client: Client) -> None:
    client.connect(client.target.port)


def connect_detecting(client: Client) -> None:
    client.connect(client.target.port, None)  # what reconnectd sends by default


def connect_not_offered(client: Client) -> None:
    client.connect(NOT_OFFERED)


def disconnect(client: Client) -> None:
    client.disconnect()


def connect_silent(client: Client) -> None:
    client.target.go_silent()
    client.connect(client.target.port)


def connect_answering(client: Client) -> None:
    client.target.respond()
    client.connect(client.target.port)


def vanish(client: Client) -> None:
    client.target.vanish()


def connect_new_device(client: Client) -> None:
    client.target.printer_on()
    client.connect(client.target.port)


@dataclass(frozen=True)
class Step:
    name: str
    action: Action
    until: Until
    linger: float  # keep watching this long once `until` holds


STEPS: tuple[Step, ...] = (
    Step("connect to a working printer", connect, last_state(OPERATIONAL), 0.3),
    Step("connect while Operational", connect, at_once, 0.5),
    Step("disconnect", disconnect, last_state(CLOSED), 0.3),
    Step("connect without a baudrate", connect_detecting, last_state(OPERATIONAL), 0.3),
    Step("disconnect the detected one", disconnect, last_state(CLOSED), 0.3),
    Step("connect to a port not offered", connect_not_offered, at_once, 0.3),
    Step("wrong key, no key, not JSON", wrong_keys, at_once, 0.2),
    Step("connect to a silent printer", connect_silent, closed_after_connecting, 0.3),
    Step("connect after it answers again", connect_answering, last_state(OPERATIONAL), 0.3),
    Step("the device vanishes", vanish, last_state(CLOSED), 0.3),
    Step("disconnect after the error", disconnect, at_once, 0.3),
    Step(
        "connect to the printer plugged in again", connect_new_device, last_state(OPERATIONAL), 0.3
    ),
    Step("disconnect at the end", disconnect, last_state(CLOSED), 0.2),
)

IDLE: Seen = (CLOSED, OFFLINE, True)
RUNNING: Seen = (OPERATIONAL, OPERATIONAL, True)
FAILED: Seen = (CLOSED, OFFLINE_AFTER_ERROR, False)
FORBIDDEN = (
    "You don't have the permission to access the requested resource. "
    "It is either read-protected or not readable by the server."
)
# What both must show, after collapsing; the point is that the fake equals the real
# one, this only says in words what that is.
EXPECTED: dict[str, tuple[list[Seen], list[tuple[int, str | None]]]] = {
    "connect to a working printer": ([IDLE, RUNNING], [(204, None)]),
    "connect while Operational": ([RUNNING], [(204, None)]),
    "disconnect": ([RUNNING, IDLE], [(204, None)]),
    "connect without a baudrate": ([IDLE, RUNNING], [(204, None)]),
    "disconnect the detected one": ([RUNNING, IDLE], [(204, None)]),
    "connect to a port not offered": ([IDLE], [(400, "port is invalid")]),
    "wrong key, no key, not JSON": (
        [IDLE],
        [
            (403, FORBIDDEN),
            (403, FORBIDDEN),
            (400, "CSRF validation failed"),
            (400, "CSRF validation failed"),
            (
                415,
                "Did not attempt to load JSON data because the request Content-Type "
                "was not 'application/json'.",
            ),
        ],
    ),
    "connect to a silent printer": (
        [IDLE, (CONNECTING, CONNECTING, True), IDLE],
        [(204, None)],
    ),
    "connect after it answers again": ([IDLE, RUNNING], [(204, None)]),
    "the device vanishes": ([RUNNING, FAILED], []),
    "disconnect after the error": ([FAILED], [(204, None)]),
    "connect to the printer plugged in again": ([FAILED, RUNNING], [(204, None)]),
    "disconnect at the end": ([RUNNING, IDLE], [(204, None)]),
}


def collapse(seen: Sequence[Seen]) -> list[Seen]:
    """Given the samples of one step, drop the states too brief to be seen reliably.

    - "Opening serial connection": opening a pty takes no time, the real OctoPrint
      is past it before the next 20 ms poll (the fake shows it for 20 ms).
    - "Connecting" or "Detecting serial connection" right before "Operational": the
      real handshake with the fake Marlin takes ~30-70 ms, so a 20 ms poll sees it
      zero to three times. Before "Closed" (a silent printer) it lasts seconds and
      is kept.
    - Closing after an error: for ~15-35 ms the real one has the error (job
      "Offline after error") while /api/connection still shows the old state or
      "Error"/"Offline after error"; the fake closes at once.
    Repeats are then merged.
    """
    kept = [s for s in seen if not _closing_after_error(s) and s[0] != OPENING]
    out: list[Seen] = []
    for index, sample in enumerate(kept):
        following = kept[index + 1] if index + 1 < len(kept) else None
        waiting = sample[0] in (CONNECTING, DETECTING)
        if waiting and following is not None and following[0] == OPERATIONAL:
            continue
        if not out or out[-1] != sample:
            out.append(sample)
    return out


def _closing_after_error(sample: Seen) -> bool:
    state, job, _ = sample
    return state in ("Error", OFFLINE_AFTER_ERROR) or (
        state != CLOSED and job in (OFFLINE, OFFLINE_AFTER_ERROR)
    )


def run_script(target: Target) -> dict[str, StepResult]:
    """Given a target with no printer yet, run every step; return what each step saw."""
    target.printer_on()
    client = Client(target)
    results: dict[str, StepResult] = {}
    try:
        for step in STEPS:
            seen = [client.observe()]
            client.answers = []
            step.action(client)
            deadline = time.monotonic() + STEP_TIMEOUT
            lingering_until: float | None = None
            while True:
                sample = client.observe()
                if sample != seen[-1]:
                    seen.append(sample)
                now = time.monotonic()
                if lingering_until is None and step.until(seen):
                    lingering_until = now + step.linger
                if lingering_until is not None and now >= lingering_until:
                    break
                if now > deadline:
                    raise AssertionError(f"{step.name}: not done in {STEP_TIMEOUT:g} s: {seen}")
                time.sleep(POLL)
            results[step.name] = StepResult(seen, client.answers)
    finally:
        client.session.close()
    return results


# -- the two runs -----------------------------------------------------------------------


def _real_or_skip() -> None:
    if not Path(octoprint_bin()).exists():
        reason = f"no OctoPrint at {octoprint_bin()} (tests/bootstrap installs it)"
        if os.environ.get("RECONNECTD_REQUIRE_REAL") == "1":
            pytest.fail(reason)
        pytest.skip(reason)


@dataclass
class Shapes:
    """The keys of each answer body, to compare the fake's shape with the real one's."""

    current: set[str]
    options: set[str]
    job: set[str]
    job_job: set[str]


def shapes(target: Target) -> Shapes:
    headers = {"X-Api-Key": target.api_key}
    connection = requests.get(target.url + "/api/connection", headers=headers, timeout=10).json()
    job = requests.get(target.url + "/api/job", headers=headers, timeout=10).json()
    return Shapes(set(connection["current"]), set(connection["options"]), set(job), set(job["job"]))


@dataclass
class Run:
    steps: dict[str, StepResult]
    shapes: Shapes


@pytest.fixture(scope="module")
def real_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    _real_or_skip()
    workdir = tmp_path_factory.mktemp("fake-vs-real")
    ports_dir = workdir / "ports"
    ports_dir.mkdir()
    with OctoPrintInstance(workdir / "octoprint", additional_ports=[f"{ports_dir}/tty*"]) as op:
        target = RealTarget(op, str(ports_dir / "ttyFAKE0"))
        try:
            steps = run_script(target)
            yield Run(steps, shapes(target))
        finally:
            target.close()


@pytest.fixture(scope="module")
def fake_run() -> Iterator[Run]:
    with tempfile.TemporaryDirectory() as ports_dir:
        # The fake never opens it; a real-looking path keeps the two runs alike.
        # 0.5 s instead of the real one's ~4 s: the states matter here, not the time.
        target = FakeTarget(f"{ports_dir}/ttyFAKE0", silent_timeout=0.5)
        with target.fake:
            steps = run_script(target)
            yield Run(steps, shapes(target))


@pytest.mark.octoprint
@pytest.mark.parametrize("step", [s.name for s in STEPS])
def test_fake_shows_what_the_real_octoprint_shows(real_run: Run, fake_run: Run, step: str) -> None:
    real, fake = real_run.steps[step], fake_run.steps[step]
    assert fake.collapsed == real.collapsed, f"real saw {real.seen}, fake saw {fake.seen}"
    assert fake.answers == real.answers
    assert (real.collapsed, real.answers) == EXPECTED[step], f"raw: {real.seen}"


@pytest.mark.octoprint
def test_fake_answers_have_the_real_shape(real_run: Run, fake_run: Run) -> None:
    assert fake_run.shapes == real_run.shapes


def test_collapse_drops_only_the_brief_states() -> None:
    seen: list[Seen] = [
        IDLE,
        (OPENING, OPENING, True),
        (CONNECTING, CONNECTING, True),
        RUNNING,
        (OPERATIONAL, OFFLINE_AFTER_ERROR, False),
        FAILED,
        (CONNECTING, CONNECTING, True),
        FAILED,
    ]
    assert collapse(seen) == [IDLE, RUNNING, FAILED, (CONNECTING, CONNECTING, True), FAILED]


# -- the fake's bookkeeping, which the storm tests read ----------------------------------


def test_fake_records_every_post_and_when_it_became_operational() -> None:
    port = "/dev/serial/by-id/usb-x-if00"
    with FakeOctoPrint(lambda: [port], lambda p: "/dev/ttyACM0") as fake:
        headers = {"X-Api-Key": fake.api_key}
        url = fake.url + "/api/connection"
        started = time.monotonic()
        assert requests.post(url, json={"command": "connect", "port": port}, headers=headers).ok
        assert fake.state == DETECTING  # no baudrate given
        assert requests.post(url, json={"command": "connect", "port": port}, headers=headers).ok
        deadline = time.monotonic() + 5
        while fake.state != OPERATIONAL:
            assert time.monotonic() < deadline
            time.sleep(POLL)
        since = fake.operational_since
        assert since is not None and started <= since <= started + fake.handshake + 0.1
        bearer = {"Authorization": f"Bearer {fake.api_key}"}
        assert requests.post(url, json={"command": "disconnect"}, headers=bearer).status_code == 204
        assert requests.get(url + f"?apikey={fake.api_key}").json()["current"]["state"] == CLOSED
        assert requests.post(url, json={"command": "x"}, headers=headers).status_code == 400
    assert [(p.command, p.port, p.status, p.ignored) for p in fake.posts] == [
        ("connect", port, 204, False),
        ("connect", port, 204, True),
        ("disconnect", None, 204, False),
        ("x", None, 400, False),
    ]
    assert [p.ignored for p in fake.connects] == [False, True]
    assert fake.posts[0].at <= fake.posts[1].at
