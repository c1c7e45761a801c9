"""Pure helpers: served specs from a graph, TensorRT profiles, accuracy metrics, task names."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from taskserve.exporters.errors import UsageError
from taskserve.exporters.graph_io import serving_specs
from taskserve.exporters.progress import format_table
from taskserve.exporters.quantize import accuracy_change
from taskserve.exporters.spec import TensorSpec
from taskserve.exporters.tasks import resolve_hf_task
from taskserve.exporters.tensorrt import derive_profile


def _graph(path: Path) -> Path:
    """ids [batch, seq] -> states [batch, seq, 4] and pooled [batch, 4]; pixels [batch, 3, h, w]."""
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])
    pixels = helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 3, "h", "w"])
    states = helper.make_tensor_value_info("states", TensorProto.FLOAT, ["batch", "seq", 4])
    pooled = helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["batch", 4])
    masks = helper.make_tensor_value_info("masks", TensorProto.FLOAT, ["batch", "h", "w"])
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["f", "axes"], ["u"]),
        helper.make_node("Expand", ["u", "shape"], ["states"]),
        helper.make_node("ReduceMean", ["states", "axes1"], ["pooled"], keepdims=0),
        helper.make_node("ReduceMean", ["pixels", "axes1"], ["masks"], keepdims=0),
    ]
    inits = [
        onnx.numpy_helper.from_array(np.array([2], np.int64), "axes"),
        onnx.numpy_helper.from_array(np.array([1, 1, 4], np.int64), "shape"),
        onnx.numpy_helper.from_array(np.array([1], np.int64), "axes1"),
    ]
    graph = helper.make_graph(nodes, "g", [ids, pixels], [states, pooled, masks], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def test_serving_specs_drop_batch_and_link_padded_axes(tmp_path: Path) -> None:
    inputs, outputs = serving_specs(
        _graph(tmp_path / "g.onnx"),
        batched=True,
        pad_values={"input_ids": 1},
        fixed_dims={"pixels": (3, 32, 32)},
    )
    assert inputs == [
        TensorSpec("input_ids", "INT64", (-1,), pad_value=1),
        TensorSpec("pixels", "FP32", (3, 32, 32)),
    ]
    assert outputs == [
        TensorSpec("states", "FP32", (-1, 4), unpad_like="input_ids"),
        TensorSpec("pooled", "FP32", (4,)),
        # h/w are fixed by the served input size: nothing to un-pad.
        TensorSpec("masks", "FP32", (-1, -1)),
    ]


def test_unbatched_specs_keep_every_dim_and_never_unpad(tmp_path: Path) -> None:
    inputs, outputs = serving_specs(_graph(tmp_path / "g.onnx"), batched=False)
    assert inputs[0].dims == (-1, -1) and outputs[0] == TensorSpec("states", "FP32", (-1, -1, 4))


def test_tensorrt_profile_from_batch_and_lengths() -> None:
    specs = [TensorSpec("input_ids", "INT64", (-1,)), TensorSpec("pixels", "FP32", (3, 224, 224))]
    profile = derive_profile(specs, max_batch_size=64, max_length=256, opt_length=128)
    assert profile.shapes["input_ids"] == ((1, 1), (32, 128), (64, 256))
    assert profile.shapes["pixels"] == ((1, 3, 224, 224), (32, 3, 224, 224), (64, 3, 224, 224))


def test_accuracy_metrics() -> None:
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((4, 16)).astype(np.float32)
    logits = np.array([[3.0, 1.0], [0.1, 0.2]], np.float32)
    flipped = np.array([[3.0, 1.0], [0.3, 0.2]], np.float32)
    changes = accuracy_change(
        [{"embedding": emb, "logits": logits}], [{"embedding": emb * 2, "logits": flipped}]
    )
    by_name = {c.output: c for c in changes}
    assert by_name["embedding"].metric == "mean cosine" and by_name["embedding"].value == pytest.approx(1.0)
    assert by_name["logits"].metric == "top-1 agreement" and by_name["logits"].value == 0.5
    assert by_name["logits"].max_abs_diff == pytest.approx(0.2)


def test_task_names() -> None:
    assert resolve_hf_task("feature-extraction") == ("feature-extraction", "sentence-embedding")
    assert resolve_hf_task("sentence-embedding") == ("feature-extraction", "sentence-embedding")
    assert resolve_hf_task("text-generation") == ("text-generation-with-past", "text-generation")
    assert resolve_hf_task("semantic-segmentation") == ("semantic-segmentation", "image-segmentation")
    with pytest.raises(UsageError, match="unknown task 'translate'"):
        resolve_hf_task("translate")


def test_format_table_aligns_columns() -> None:
    table = format_table(("a", "long header"), [("xyz", 1), ("q", 22)])
    assert table.splitlines() == ["a    long header", "---  -----------", "xyz  1", "q    22"]
