"""Session fixtures: tiny BERT folders (random weights, real WordPiece tokenizer) and one
repository holding each tiny export, so every model is exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskserve.exporters.api import export_hf
from taskserve.exporters.pipeline import ExportResult
from tests.support.tiny_hf_models import tiny_bert

# Repository name -> optimum task. The classifier is exported with int8 to cover quantization.
TINY_TEXT = {
    "textcls": "text-classification",
    "ner": "token-classification",
    "qa": "question-answering",
    "mlm": "fill-mask",
    "embed": "feature-extraction",
}
QUANTIZED = {"textcls"}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-hf")
    return {name: tiny_bert(root / name, task) for name, task in TINY_TEXT.items()}


@pytest.fixture(scope="session")
def tiny_repo(tmp_path_factory: pytest.TempPathFactory, tiny_dirs: dict[str, Path]) -> Path:
    return tmp_path_factory.mktemp("tiny-repo")


@pytest.fixture(scope="session")
def tiny_exports(tiny_repo: Path, tiny_dirs: dict[str, Path]) -> dict[str, ExportResult]:
    return {
        name: export_hf(
            tiny_dirs[name],
            task,
            tiny_repo,
            name,
            progress=False,
            quantize="int8" if name in QUANTIZED else None,
        )
        for name, task in TINY_TEXT.items()
    }
