"""Runtimes execute batches; ``create_runtime`` picks one from the model's platform."""

from __future__ import annotations

from pathlib import Path

from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import Runtime, TensorInfo

__all__ = ["Runtime", "TensorInfo", "create_runtime"]


def create_runtime(model_path: Path, config: ModelConfig) -> Runtime:
    if config.platform == "tensorrt":
        from taskserve.server.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(model_path, config)
    from taskserve.server.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(model_path, config)
