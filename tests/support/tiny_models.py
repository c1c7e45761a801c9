"""Tiny ONNX models built with onnx.helper, and model-repository entries for them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import yaml
from onnx import TensorProto, helper, numpy_helper


def _save(graph: onnx.GraphProto, path: Path) -> None:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def write_entry(
    repo: Path, name: str, graph: onnx.GraphProto, config: dict[str, Any], versions: tuple[int, ...] = (1,)
) -> Path:
    model_dir = repo / name
    for v in versions:
        _save(graph, model_dir / str(v) / "model.onnx")
    (model_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return model_dir


def add_sub_graph(elem: int = TensorProto.FLOAT, width: int = 4) -> onnx.GraphProto:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 (Triton's classic 'simple')."""
    shape = ["batch", width]
    return helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        [helper.make_tensor_value_info("INPUT0", elem, shape), helper.make_tensor_value_info("INPUT1", elem, shape)],
        [helper.make_tensor_value_info("OUTPUT0", elem, shape), helper.make_tensor_value_info("OUTPUT1", elem, shape)],
    )


def identity_graph(elem: int, shape: list[Any]) -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "identity",
        [helper.make_tensor_value_info("INPUT0", elem, shape)],
        [helper.make_tensor_value_info("OUTPUT0", elem, shape)],
    )


def slow_graph(width: int = 256, depth: int = 48) -> onnx.GraphProto:
    """A chain of MatMuls: a big batch takes a noticeable fraction of a second."""
    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32)
    nodes, prev = [], "INPUT0"
    for i in range(depth):
        nodes.append(helper.make_node("MatMul", [prev, "W"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["OUTPUT0"]))
    return helper.make_graph(
        nodes,
        "slow",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["batch", width])],
        initializer=[numpy_helper.from_array(weight, "W")],
    )


def build_test_repository(repo: Path) -> Path:
    """The models the serving-core tests use."""
    batching = {"max_queue_delay_us": 500}
    write_entry(
        repo, "simple", add_sub_graph(),
        {"max_batch_size": 8, "dynamic_batching": batching, "version_policy": {"all": True}}, versions=(1, 2),
    )  # fmt: skip
    write_entry(repo, "simple_int64", add_sub_graph(TensorProto.INT64), {"max_batch_size": 8})
    write_entry(repo, "simple_fp16", add_sub_graph(TensorProto.FLOAT16), {"max_batch_size": 8})
    write_entry(repo, "strings", identity_graph(TensorProto.STRING, ["batch", 2]), {"max_batch_size": 4})
    write_entry(repo, "nobatch", add_sub_graph(width=3), {"max_batch_size": 0, "inputs": [
        {"name": "INPUT0", "datatype": "FP32", "dims": [-1, 3]},
        {"name": "INPUT1", "datatype": "FP32", "dims": [-1, 3]},
    ]})  # fmt: skip
    write_entry(repo, "slow", slow_graph(), {"max_batch_size": 512, "instance_count": 1})
    # One request at a time and room for one more in the queue: the queueing tests fill it.
    write_entry(repo, "slow_queue", slow_graph(), {
        "max_batch_size": 0, "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1, 256]}],
        "dynamic_batching": {"max_queue_size": 1},
    })  # fmt: skip
    # Broken on purpose: a bad config must not stop the others from loading.
    write_entry(repo, "broken_config", identity_graph(TensorProto.FLOAT, ["batch", 2]),
                {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_sizes": [16]}})  # fmt: skip
    broken = repo / "broken_graph"
    (broken / "1").mkdir(parents=True)
    (broken / "1" / "model.onnx").write_bytes(b"this is not an onnx model")
    (broken / "config.yaml").write_text("max_batch_size: 4\n")
    return repo
