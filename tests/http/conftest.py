from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.tiny_models import add_sub_graph, write_entry


@pytest.fixture(scope="session")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("http-tiny")
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8})
    return repo


@pytest.fixture(scope="session")
def openai_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One repository with a model of each OpenAI route: the real SmolLM2-135M-Instruct on the
    generation engine (as the demo exports it), a tiny sentence-embedding BERT and a tiny Stable
    Diffusion pipeline (random weights, built from configs)."""

    from taskserve.exporters import smollm2
    from taskserve.exporters.api import export_hf
    from taskserve.exporters.demo import ENTRY_NAMES, SMOLLM2_SLOTS
    from taskserve.exporters.diffusion import export_diffusers
    from taskserve.exporters.tiny_diffusion import tiny_stable_diffusion
    from tests.support import tiny_hf_models as tiny_models

    sources = tmp_path_factory.mktemp("openai-sources")
    repo = tmp_path_factory.mktemp("openai-repo")
    smol = smollm2.materialize(sources / "SmolLM2-135M-Instruct")
    export_hf(smol, "text-generation", repo, ENTRY_NAMES["smollm2"], max_batch_size=SMOLLM2_SLOTS, progress=False)
    embed = tiny_models.tiny_bert(sources / "tiny-embed", "feature-extraction")
    export_hf(embed, "feature-extraction", repo, EMBED_MODEL, progress=False)
    pipeline = tiny_stable_diffusion(sources / "tiny-sd")
    export_diffusers(pipeline, repo, IMAGE_MODEL, max_batch_size=8, validation_steps=2, progress=False)
    return repo


EMBED_MODEL = "tiny-embed"
IMAGE_MODEL = "tiny-sd"
