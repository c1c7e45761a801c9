"""config.yaml validation: good configs load, bad ones name file, field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskserve.server.errors import ConfigError
from taskserve.server.repository.config import VersionPolicy, load_model_config, parse_model_config
from taskserve.server.repository.versions import select_versions


def test_defaults_for_an_empty_config(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    config = load_model_config(model_dir)
    assert config.name == "m"
    assert config.task == "tensor"
    assert config.max_batch_size == 0
    assert config.inputs is None  # taken from the graph at load time
    assert config.dynamic_batching.max_queue_size == 1024


def test_full_config_round_trip(tmp_path: Path) -> None:
    model_dir = tmp_path / "minilm"
    model_dir.mkdir()
    (model_dir / "config.yaml").write_text(
        """
task: sentence-embedding
max_batch_size: 64
inputs:
  - {name: input_ids, datatype: INT64, dims: [-1], pad_value: 0}
outputs:
  - {name: token_embeddings, datatype: FP32, dims: [-1, 384], unpad_like: input_ids}
dynamic_batching: {max_queue_delay_us: 2000, preferred_batch_sizes: [16, 32], priority_levels: 2}
instance_count: 2
runtime: {execution_providers: [cuda, cpu], intra_op_threads: 1, allow_spinning: true}
task_options: {pooling: mean}
"""
    )
    config = load_model_config(model_dir)
    assert config.task == "sentence-embedding"
    assert config.inputs is not None and config.inputs[0].dims == (-1,)
    assert config.outputs is not None and config.outputs[0].unpad_like == "input_ids"
    assert config.dynamic_batching.preferred_batch_sizes == (16, 32)
    assert config.runtime.execution_providers == ("cuda", "cpu")
    assert config.runtime.allow_spinning
    assert config.dynamic_batching.inline_compute_us == 100  # the default
    assert config.task_options == {"pooling": "mean"}


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"max_batch_size": -1}, "max_batch_size"),
        ({"task": "telepathy"}, "task"),
        ({"max_batch_size": 8, "dynamic_batching": {"preferred_batch_sizes": [16]}},
         "must be between 1 and max_batch_size (8)"),
        ({"dynamic_batching": {"priority_levels": 2, "default_priority": 3}},
         "lower default_priority or raise priority_levels"),
        ({"dynamic_batching": {"length_buckets": [32, 16]}}, "strictly increasing"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "dims": [0]}]}, "positive size or -1"),
        ({"inputs": [{"name": "a", "datatype": "FLOAT", "dims": [1]}]}, "inputs.0.datatype"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "dims": [1]}] * 2}, "more than once"),
        ({"inputs": [{"name": "a", "datatype": "FP32", "dims": [1]}],
          "outputs": [{"name": "b", "datatype": "FP32", "dims": [1], "unpad_like": "zz"}]}, "not an input"),
        ({"instance_count": 0}, "instance_count"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"name": "other"}, "does not match its directory"),
        # The generation engine: one runner holds the cache, on one device.
        ({"generation": {}, "instance_count": 2}, "runs one instance that holds the KV cache"),
        ({"generation": {}, "platform": "tensorrt"}, "platform onnxruntime or torch"),
        ({"generation": {}, "platform": "torch", "gpus": [0, 1]}, "at most one GPU"),
    ],
)  # fmt: skip
def test_invalid_configs_explain_themselves(data: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_model_config(data, Path("repo/m/config.yaml"), "m")
    assert "repo/m/config.yaml" in err.value.message
    assert expected in err.value.message


def test_yaml_syntax_error(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text("max_batch_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(tmp_path / "m")


@pytest.mark.parametrize(
    ("policy", "expected"),
    [({}, [3]), ({"latest": 2}, [2, 3]), ({"all": True}, [1, 2, 3]), ({"specific": [1, 3, 7]}, [1, 3])],
)
def test_version_policies(policy: dict[str, object], expected: list[int]) -> None:
    assert select_versions([1, 2, 3], VersionPolicy.model_validate(policy)) == expected
