"""Fixtures shared by test modules: the scripted OctoPrint and a client for it.

``server`` and ``api`` serve tests/test_octoprint_api.py and
tests/test_octoprint_api_versions.py; a module with a server of another kind
(tests/test_keep_alive.py, tests/test_tls.py) defines its own, which takes precedence.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from reconnectd.octoprint_api import OctoPrintApi
from tests.support.scripted_octoprint import KEY, ScriptedServer


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    scripted = ScriptedServer()
    yield scripted
    scripted.close()


@pytest.fixture
def api(server: ScriptedServer) -> Iterator[OctoPrintApi]:
    client = OctoPrintApi(server.url, KEY, 0.5)
    yield client
    client.close()
