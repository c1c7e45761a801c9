"""Session fixtures: a tiny Stable Diffusion pipeline (random weights, from configs) built
and exported ONCE, a server on the exported repository, and diffusers' own pipeline on the
same weights for the equality checks."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.server import ServerThread, running_server

NAME = "tiny-sd"


@dataclass
class TinyPipeline:
    source: Path
    repo: Path
    export: Any  # DiffusersExport
    pipe: Any  # diffusers.StableDiffusionPipeline


@pytest.fixture(scope="session")
def tiny_pipeline(tmp_path_factory: pytest.TempPathFactory) -> TinyPipeline:
    pytest.importorskip("diffusers")
    from taskserve.exporters.diffusion import export_diffusers, load_pipeline
    from taskserve.exporters.tiny_diffusion import tiny_stable_diffusion

    source = tiny_stable_diffusion(tmp_path_factory.mktemp("tiny-sd-source") / "pipeline")
    repo = tmp_path_factory.mktemp("tiny-sd-repo")
    export = export_diffusers(source, repo, NAME, max_batch_size=8, validation_steps=2, progress=False)
    return TinyPipeline(source, repo, export, load_pipeline(source))


@pytest.fixture(scope="session")
def sd_server(tiny_pipeline: TinyPipeline) -> Iterator[ServerThread]:
    with running_server(tiny_pipeline.repo) as server:
        yield server
