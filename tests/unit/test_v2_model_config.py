"""v2 ModelConfig reports where a model's instances run: the GPUs it is placed on, or a runtime
that took a GPU, is KIND_GPU (count per GPU, as in Triton); otherwise KIND_CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from taskserve.protocol.generated.inference import model_config_pb2 as mc
from taskserve.server.frontends.v2.model_config import model_config_message as _model_config_message
from taskserve.server.repository.config import ModelConfig
from taskserve.server.serving.loaded_model import LoadedModel


class _Runtime:
    def __init__(self, on_gpu: bool) -> None:
        self.on_gpu = on_gpu


def _loaded(config: dict[str, Any], runtimes: list[_Runtime]) -> LoadedModel:
    return LoadedModel(
        name="m", version="1", config=ModelConfig.model_validate({"name": "m", **config}),
        model_dir=Path("."), scheduler=None, metrics=None, runtimes=runtimes,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.mark.parametrize(
    ("config", "runtimes", "kind", "gpus"),
    [
        ({}, [_Runtime(False)], mc.ModelInstanceGroup.KIND_CPU, []),
        # The default providers list CUDA first: a machine that has one runs the graph there.
        ({}, [_Runtime(True)], mc.ModelInstanceGroup.KIND_GPU, []),
        (
            {"gpus": [0, 1], "instance_count": 2, "runtime": {"execution_providers": ["cuda"]}},
            [_Runtime(True)] * 4, mc.ModelInstanceGroup.KIND_GPU, [0, 1],
        ),
        ({"platform": "torch"}, [_Runtime(False)], mc.ModelInstanceGroup.KIND_CPU, []),
    ],
)  # fmt: skip
def test_instance_group_kind_follows_the_loaded_instances(
    config: dict[str, Any], runtimes: list[_Runtime], kind: int, gpus: list[int]
) -> None:
    message = _model_config_message(_loaded(config, runtimes))
    (group,) = message.instance_group
    assert (group.kind, list(group.gpus), group.count) == (kind, gpus, config.get("instance_count", 1))


@pytest.mark.parametrize(
    ("platform", "backend"), [("onnxruntime", "onnxruntime"), ("torch", "pytorch"), ("tensorrt", "tensorrt")]
)
def test_backend_is_tritons_name_for_the_platform(platform: str, backend: str) -> None:
    assert _model_config_message(_loaded({"platform": platform}, [_Runtime(False)])).backend == backend
