from __future__ import annotations

from pathlib import Path

import pytest
from onnx import TensorProto

from tests.support.certs import Pki, make_test_pki
from tests.support.tiny_models import add_sub_graph, identity_graph, write_entry

TOKENS = ("first-token-0123456789", "second-token-abcdefghij")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_test_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def small_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two tiny models; the outer folder also holds a model that is not in the repository."""
    root = tmp_path_factory.mktemp("security")
    repo = root / "repo"
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8})
    write_entry(repo, "labelled", identity_graph(TensorProto.FLOAT, ["batch", 2]), {"max_batch_size": 4})
    write_entry(root / "outside", "other", add_sub_graph(), {"max_batch_size": 8})
    return repo
