"""Configured inputs/outputs are reconciled with what the ONNX graph declares."""

from __future__ import annotations

import pytest

from taskserve.server.errors import ConfigError
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import TensorInfo
from taskserve.server.serving.tensors import resolve_tensors

GRAPH_IN = [TensorInfo("ids", "INT64", (-1, -1))]
GRAPH_OUT = [TensorInfo("emb", "FP32", (-1, 384))]


def _config(**fields: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "max_batch_size": 8, **fields})


def test_unset_tensors_come_from_the_graph() -> None:
    config = resolve_tensors(_config(), GRAPH_IN, GRAPH_OUT)
    assert config.inputs is not None and config.inputs[0].dims == (-1,)
    assert config.outputs is not None and config.outputs[0].dims == (384,)


def test_variable_dims_take_the_graphs_fixed_size() -> None:
    config = resolve_tensors(_config(outputs=[{"name": "emb", "datatype": "FP32", "dims": [-1]}]), GRAPH_IN, GRAPH_OUT)
    assert config.outputs is not None and config.outputs[0].dims == (384,)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"inputs": [{"name": "ids", "datatype": "INT32", "dims": [-1]}]},
            "configured as INT32 but the graph declares INT64",
        ),
        (
            {"outputs": [{"name": "emb", "datatype": "FP32", "dims": [128]}]},
            "has dims [128] but the graph declares [384]",
        ),
        ({"inputs": [{"name": "nope", "datatype": "INT64", "dims": [-1]}]}, "'nope' is not in the graph"),
        ({"inputs": []}, "needs inputs ['ids']"),
    ],
)
def test_mismatches_name_the_fix(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        resolve_tensors(_config(**fields), GRAPH_IN, GRAPH_OUT)


def test_batched_model_needs_a_dynamic_batch_axis() -> None:
    with pytest.raises(ConfigError, match="variable first dimension"):
        resolve_tensors(_config(), [TensorInfo("ids", "INT64", (1, -1))], GRAPH_OUT)
