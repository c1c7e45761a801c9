from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_models import add_sub_graph, write_entry


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("http-tiny")
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8})
    return repo
