"""Runtimes execute batches; ``create_runtime`` picks one from the model's platform."""

from __future__ import annotations

from pathlib import Path

from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import Runtime, TensorInfo

__all__ = ["Runtime", "TensorInfo", "create_runtime"]


def create_runtime(model_path: Path, config: ModelConfig, gpu: int | None = None) -> Runtime:
    """One instance of the model's runtime; ``gpu``: the GPU it is placed on (instance groups)."""
    if config.platform == "tensorrt":
        from taskserve.server.runtimes.tensorrt import TensorRTRuntime

        return TensorRTRuntime(model_path, config, gpu)
    if config.platform == "torch":
        # The only server module that imports torch, and only for torch entries.
        from taskserve.server.runtimes.torch_runtime import TorchRuntime

        return TorchRuntime(model_path, config, gpu)
    from taskserve.server.runtimes.onnx import OnnxRuntime

    return OnnxRuntime(model_path, config, gpu)
