"""Build the config.yaml mapping for an exported model."""

from __future__ import annotations

from typing import Any

from taskserve.exporters.spec import ExportedModel
from taskserve.exporters.tasks import GENERATION_TASKS

LABELS_FILE = "labels.txt"
ENGINE_FILE = "model.plan"


def build_config(
    exported: ExportedModel,
    name: str,
    max_batch_size: int,
    max_queue_delay_us: int,
    *,
    length_buckets: tuple[int, ...] = (),
    instance_count: int = 1,
    wide_when_alone: bool = False,
    int8: bool = False,
    fp16: bool = False,
    tensorrt: bool = False,
    native_engine: bool = False,
    platform: str = "onnxruntime",
) -> dict[str, Any]:
    """``tensorrt``: served through TensorRT: a native engine (``platform: tensorrt``) when
    ``native_engine``, otherwise onnxruntime's TensorRT provider on the ONNX graph.
    ``platform: torch``: a torch entry (exporters/torch_entry.py)."""
    if native_engine:
        platform = "tensorrt"
    config: dict[str, Any] = {
        "name": name,
        "task": exported.task,
        "platform": platform,
        "max_batch_size": max_batch_size,
    }
    if platform == "torch":
        from taskserve.torch_modules.entry_format import SPEC_FILE

        config["default_model_filename"] = SPEC_FILE
    elif native_engine:
        config["default_model_filename"] = ENGINE_FILE
    elif exported.onnx_files[0] != "model.onnx":
        config["default_model_filename"] = exported.onnx_files[0]
    if instance_count > 1:
        config["instance_count"] = instance_count
    if exported.inputs is not None:
        config["inputs"] = [t.to_config() for t in exported.inputs]
    if exported.outputs is not None:
        config["outputs"] = [t.to_config() for t in exported.outputs]
    if max_batch_size > 1:
        config["dynamic_batching"] = {"max_queue_delay_us": max_queue_delay_us, "max_queue_size": 1024}
        if length_buckets:
            config["dynamic_batching"]["length_buckets"] = list(length_buckets)
    runtime: dict[str, Any] = dict(exported.runtime)
    if int8:
        # The integer kernels (MatMulInteger, QAttention, MatMulNBits at accuracy level 4) are the CPU's.
        runtime["execution_providers"] = ["cpu"]
    if tensorrt and not native_engine:
        runtime["execution_providers"] = ["tensorrt", "cuda", "cpu"]
    if fp16 or tensorrt:
        runtime["tensorrt"] = {"fp16": fp16}
    if wide_when_alone:
        runtime["wide_when_alone"] = True
    if runtime:
        config["runtime"] = runtime
    if exported.labels:
        config["labels"] = LABELS_FILE
    if exported.generation is not None:
        config["generation"] = dict(exported.generation)
    elif exported.task in GENERATION_TASKS:
        # Past key/value inputs need consistent lengths that generic warm-up inputs don't have.
        config["warmup"] = {"enabled": False}
    if exported.task_options:
        config["task_options"] = exported.task_options
    return config


def encoder_config(name: str) -> dict[str, Any]:
    """The encoder entry of an encoder-decoder export: a plain tensor model the decoder's
    task (``text2text-generation``, task_options.encoder_model) runs once per request."""
    return {
        "name": name,
        "task": "tensor",
        "platform": "onnxruntime",
        "max_batch_size": 0,
        "warmup": {"enabled": False},
    }
