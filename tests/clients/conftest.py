from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.clients.client_fakes import Recorder, ServerThread


@pytest.fixture(scope="module")
def fake_server() -> Iterator[ServerThread]:
    """One fake v2 + typed-services server per test module."""
    with ServerThread() as server:
        yield server


@pytest.fixture()
def rec(fake_server: ServerThread) -> Recorder:
    """The module server's recorder, emptied for this test."""
    fake_server.rec.requests.clear()
    fake_server.rec.metadata.clear()
    fake_server.rec.infer_attempts = 0
    fake_server.rec.fail_first = 0
    fake_server.rec.ready = True
    return fake_server.rec
