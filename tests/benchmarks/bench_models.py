"""Tiny ONNX models shaped like the demo models: a MiniLM-like text model and an EfficientNet-like image model."""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto, helper

from tests.support.tiny_models import add_sub_graph, write_entry


def text_graph() -> object:
    """input_ids/attention_mask/token_type_ids [batch, seq] INT64 -> score [batch, 1]: mean of masked ids."""
    ins = [helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "seq"])
           for n in ("input_ids", "attention_mask", "token_type_ids")]  # fmt: skip
    nodes = [
        helper.make_node("Mul", ["input_ids", "attention_mask"], ["masked"]),
        helper.make_node("Add", ["masked", "token_type_ids"], ["mixed"]),
        helper.make_node("Cast", ["mixed"], ["as_float"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["as_float"], ["score"], axes=[1], keepdims=1),
    ]
    out = helper.make_tensor_value_info("score", TensorProto.FLOAT, ["batch", 1])
    return helper.make_graph(nodes, "tiny_text", ins, [out])


def image_graph() -> object:
    """pixel_values [batch, 3, 224, 224] FP32 -> logits [batch, 3, 1, 1]: the per-channel mean."""
    inp = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 224, 224])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3, 1, 1])
    node = helper.make_node("GlobalAveragePool", ["pixel_values"], ["logits"])
    return helper.make_graph([node], "tiny_image", [inp], [out])


def build_bench_repository(repo: Path) -> Path:
    batching = {"max_queue_delay_us": 500}
    write_entry(repo, "tiny_text", text_graph(), {  # type: ignore[arg-type]
        "max_batch_size": 16, "dynamic_batching": batching, "runtime": {"intra_op_threads": 1},
        "inputs": [{"name": n, "datatype": "INT64", "dims": [-1]}
                   for n in ("input_ids", "attention_mask", "token_type_ids")],
        "outputs": [{"name": "score", "datatype": "FP32", "dims": [1]}],
    })  # fmt: skip
    write_entry(repo, "tiny_image", image_graph(), {"max_batch_size": 8, "runtime": {"intra_op_threads": 1}})  # type: ignore[arg-type]
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8, "dynamic_batching": batching})
    return repo
