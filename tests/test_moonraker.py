"""Reading Klipper through Moonraker: the state texts (as a real Klippy writes them,
see ../shared/notes/klipper-facts.md and tests/test_klipper_stack.py) and the client
against a real HTTP server on loopback that answers as Moonraker does."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from reconnectd.host import Accepted, ErrorKind, HostView, Phase, Refused, Unreachable
from reconnectd.moonraker_api import MoonrakerApi
from reconnectd.moonraker_state import classify_shutdown, first_line, mcu_serials, view_of
from tests.support.scripted_octoprint import Answer, ScriptedServer

TAIL = (
    '\nOnce the underlying issue is corrected, use the\n"FIRMWARE_RESTART" command to '
    "reset the firmware, reload the\nconfig, and restart the host software.\n"
)
LOST = "Lost communication with MCU 'mcu'" + TAIL + "Printer is shutdown\n"
UNABLE = "mcu 'mcu': Unable to connect" + TAIL + "Error configuring printer\n"
FAILED_RESET = "Failed automated reset of MCU 'mcu'" + TAIL + "Error configuring printer\n"
ESTOP = "Shutdown due to webhooks request" + TAIL + "Printer is shutdown\n"
M112 = "Shutdown due to M112 command" + TAIL + "Printer is shutdown\n"
TIMER = "MCU 'mcu' shutdown: Timer too close" + TAIL + "Printer is shutdown\n"
HEATER = "Heater extruder not heating at expected rate" + TAIL + "Printer is shutdown\n"
AFTER_ESTOP = "Can not update MCU 'mcu' config as it is shutdown" + TAIL
STARTUP = (
    "\nPrinter is not ready\nThe klippy host software is attempting to connect.  "
    "Please\nretry in a few moments.\n"
)
KEY = "m00nraker-k3y-never-shown"


@pytest.mark.parametrize(
    ("message", "kind"),
    [
        (LOST, ErrorKind.TRANSPORT),
        (UNABLE, ErrorKind.TRANSPORT),
        (FAILED_RESET, ErrorKind.TRANSPORT),
        (ESTOP, ErrorKind.FATAL),
        (M112, ErrorKind.FATAL),
        (TIMER, ErrorKind.FATAL),
        (HEATER, ErrorKind.FATAL),
        (AFTER_ESTOP, ErrorKind.FATAL),
        ("Something no Klipper said yet" + TAIL, ErrorKind.FATAL),
        ("", ErrorKind.FATAL),
    ],
)
def test_only_a_lost_or_unreachable_mcu_is_safe_to_restart(message: str, kind: ErrorKind) -> None:
    assert classify_shutdown(message) == kind


def test_the_first_line_is_what_the_state_message_says() -> None:
    assert first_line(LOST) == "Lost communication with MCU 'mcu'"
    assert first_line(STARTUP) == "Printer is not ready"
    assert first_line(None) == ""


@pytest.mark.parametrize(
    ("info", "objects", "phase"),
    [
        ({"state": "ready"}, {"print_stats": {"state": "standby"}}, Phase.OPERATIONAL),
        ({"state": "ready"}, {"print_stats": {"state": "printing"}}, Phase.BUSY),
        ({"state": "ready"}, {"print_stats": {"state": "paused"}}, Phase.BUSY),
        ({"state": "ready"}, None, Phase.OPERATIONAL),
        ({"state": "startup", "state_message": STARTUP}, None, Phase.CONNECTING),
        ({"state": "shutdown", "state_message": LOST}, {}, Phase.CLOSED),
        ({"state": "error", "state_message": UNABLE}, {}, Phase.CLOSED),
        ({"state": "rebooting"}, None, Phase.BUSY),
    ],
)
def test_klippy_states_map_to_phases(
    info: dict[str, Any], objects: dict[str, Any] | None, phase: Phase
) -> None:
    view = view_of(info, objects)
    assert view.phase == phase
    assert not view.needs_port, "Klipper's config names the port; nothing to choose"


def test_a_print_cut_off_by_the_mcu_loss_is_named_and_does_not_block() -> None:
    objects = {
        "print_stats": {"state": "paused", "filename": "benchy.gcode", "print_duration": 754.0},
        "virtual_sdcard": {"progress": 0.4312},
        "configfile": {"settings": {"mcu": {"serial": "/dev/serial/by-id/usb-Klipper-if00"}}},
    }
    view = view_of({"state": "shutdown", "state_message": LOST}, objects, lambda _: True)
    assert view.phase == Phase.CLOSED and view.error_kind == ErrorKind.TRANSPORT
    assert view.lost_print == "benchy.gcode, 43.1 % done, 12.6 min printing"
    assert view.waiting_for is None
    assert view.error == "Lost communication with MCU 'mcu'"


def test_a_second_mcu_whose_board_is_off_makes_it_wait() -> None:
    settings = {
        "mcu": {"serial": "/dev/serial/by-id/usb-Klipper_stm32f446-if00"},
        "mcu toolhead": {"serial": "/dev/serial/by-id/usb-Klipper_rp2040-if00"},
        "mcu can": {"canbus_uuid": "11aa22bb33cc"},
        "extruder": {"serial": "not an mcu"},
    }
    assert mcu_serials(settings) == {
        "mcu": "/dev/serial/by-id/usb-Klipper_stm32f446-if00",
        "mcu toolhead": "/dev/serial/by-id/usb-Klipper_rp2040-if00",
    }
    present = {"/dev/serial/by-id/usb-Klipper_stm32f446-if00"}
    view = view_of(
        {"state": "shutdown", "state_message": LOST},
        {"configfile": {"settings": settings}},
        present.__contains__,
    )
    assert view.waiting_for == (
        "[mcu toolhead] serial /dev/serial/by-id/usb-Klipper_rp2040-if00 not there "
        "(that board is still off or unplugged)"
    )


# --- the client, against a server that answers as Moonraker does -------------------

INFO = "/printer/info"
DOWN_QUERY = (
    "/printer/objects/query?print_stats=state,filename,print_duration"
    "&virtual_sdcard=progress&configfile=settings"
)
MCU = {"configfile": {"settings": {"mcu": {"serial": "/dev/null"}}}}


@pytest.fixture
def moonraker() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


def client(server: ScriptedServer, key: str | None = KEY) -> MoonrakerApi:
    return MoonrakerApi(server.url, key, 0.5)


def result(value: Any) -> Answer:
    return Answer(200, {"result": value})


def test_a_klippy_that_lost_its_mcu_is_read_with_its_print_and_mcus(
    moonraker: ScriptedServer,
) -> None:
    moonraker.answer("GET", INFO, result({"state": "shutdown", "state_message": LOST}))
    moonraker.answer("GET", DOWN_QUERY, result({"status": MCU}))
    view = client(moonraker).read()
    assert isinstance(view, HostView)
    assert (view.phase, view.error_kind) == (Phase.CLOSED, ErrorKind.TRANSPORT)
    assert [s.path for s in moonraker.script.seen] == [INFO, DOWN_QUERY]
    assert all(s.headers.get("X-Api-Key") == KEY for s in moonraker.script.seen)


def test_even_the_first_look_asks_a_klippy_that_is_down_for_its_print_and_mcus(
    moonraker: ScriptedServer,
) -> None:
    moonraker.answer("GET", INFO, result({"state": "shutdown", "state_message": LOST}))
    moonraker.answer("GET", DOWN_QUERY, result({"status": MCU}))
    view = client(moonraker).read(detail=False)
    assert isinstance(view, HostView) and view.phase == Phase.CLOSED
    assert moonraker.script.seen[-1].path == DOWN_QUERY


def test_without_detail_a_ready_klippy_is_one_request(moonraker: ScriptedServer) -> None:
    moonraker.answer("GET", INFO, result({"state": "ready", "state_message": "Printer is ready"}))
    view = client(moonraker).read(detail=False)
    assert isinstance(view, HostView) and view.phase == Phase.OPERATIONAL
    assert [s.path for s in moonraker.script.seen] == [INFO]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        (
            Answer(503, {"error": {"code": 503, "message": "Klippy Host not connected"}}),
            "Klippy is not connected to Moonraker (Klippy Host not connected)",
        ),
        (Answer(404, {"error": {"code": 404, "message": "Not Found"}}), "has not connected"),
        (Answer(500, b"<html>oops</html>", "text/html"), "HTTP 500"),
        (Answer(200, b"not json", "text/plain"), "answer is not JSON"),
    ],
)
def test_klippy_or_moonraker_down_is_unreachable_and_says_which(
    moonraker: ScriptedServer, answer: Answer, expected: str
) -> None:
    moonraker.answer("GET", INFO, answer)
    read = client(moonraker).read()
    assert isinstance(read, Unreachable)
    assert expected in read.reason
    assert f"GET {moonraker.url}/printer/info" in read.reason


def test_a_rejected_key_is_refused_and_never_shown(moonraker: ScriptedServer) -> None:
    moonraker.answer(
        "GET", INFO, Answer(401, {"error": {"code": 401, "message": f"Unauthorized {KEY}"}})
    )
    read = client(moonraker).read()
    assert isinstance(read, Refused) and read.key_rejected and read.status == 401
    assert KEY not in read.reason and "api_key_file" in read.reason


def test_moonraker_not_running_is_unreachable() -> None:
    server = ScriptedServer()
    url = server.url
    server.close()
    read = MoonrakerApi(url, None, 0.5).read()
    assert isinstance(read, Unreachable) and "connection refused" in read.reason


def test_a_restart_is_one_post_and_accepted(moonraker: ScriptedServer) -> None:
    moonraker.answer("POST", "/printer/firmware_restart", result("ok"))
    assert client(moonraker).restart() == Accepted()
    assert [(s.method, s.path) for s in moonraker.script.seen] == [
        ("POST", "/printer/firmware_restart")
    ]


def test_a_restart_while_klippy_is_away_is_unreachable(moonraker: ScriptedServer) -> None:
    moonraker.answer(
        "POST",
        "/printer/firmware_restart",
        Answer(503, {"error": {"code": 503, "message": "Klippy Host not connected"}}),
    )
    assert isinstance(client(moonraker).restart(), Unreachable)
