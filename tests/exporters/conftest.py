"""Session fixtures: tiny BERT folders (random weights, real WordPiece tokenizer) and one
repository holding each tiny export, so every model is exported once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskserve.exporters.api import export_hf
from taskserve.exporters.decoder_quality import QualityPlan, QualityTolerance
from taskserve.exporters.pipeline import ExportResult
from tests.support.tiny_hf_models import tiny_bert, tiny_causal_lm

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


# The --weights quality check, shrunk for a tiny model: 4 prompts x 16 tokens, 4 text windows.
QUALITY_PLAN = QualityPlan(prompts=4, new_tokens=16, text_tokens=256, windows=4)
# Random weights put no meaning in greedy agreement; the tiny exports only need the check to run.
LENIENT = QualityTolerance(prefix_tokens=4, min_prefix_share=0.0, max_perplexity_increase=10.0)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128-wide tiny Llama (wide enough for MatMulNBits' 32-row blocks)."""
    return tiny_causal_lm(tmp_path_factory.mktemp("wq-source") / "llama", "llama", hidden_size=128)


@pytest.fixture(scope="session")
def weight_entries(tmp_path_factory: pytest.TempPathFactory, tiny_llama: Path) -> dict[str, Path]:
    """The tiny Llama exported as fp32, int8 and int4 (the quality check shrunk and lenient)."""
    repo = tmp_path_factory.mktemp("wq-repo")
    for mode in ("fp32", "int8", "int4"):
        weights = None if mode == "fp32" else mode
        export_hf(tiny_llama, "text-generation", repo, mode, progress=False, weights=weights,
                  quality_plan=QUALITY_PLAN, quality_tolerance=LENIENT)  # fmt: skip
    return {mode: repo / mode for mode in ("fp32", "int8", "int4")}
