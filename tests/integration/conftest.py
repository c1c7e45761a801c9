from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.server import ServerThread, running_server
from tests.support.tiny_models import build_test_repository


@pytest.fixture(scope="session")
def core_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_test_repository(tmp_path_factory.mktemp("core-repo"))


@pytest.fixture(scope="module")
def core_server(core_repository: Path) -> Iterator[ServerThread]:
    with running_server(core_repository, model_control_mode="explicit") as server:
        yield server
