"""Native TensorRT engines (``platform: tensorrt``, ``model.plan``).

Imports ``tensorrt`` lazily so the server starts on machines without it; loading
a TensorRT model there fails that model alone with a message saying what to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import Runtime, TensorInfo


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


class TensorRTRuntime(Runtime):
    def __init__(self, model_path: Path, config: ModelConfig) -> None:
        self.model_path = model_path
        self.config = config

    def load(self) -> None:
        if not tensorrt_available():
            raise RuntimeFailure(
                f"{self.model_path}: platform 'tensorrt' needs NVIDIA TensorRT, which is not installed; "
                "install the 'gpu' extra on a machine with an NVIDIA GPU, or serve the ONNX model with "
                "platform 'onnxruntime' and the 'tensorrt' execution provider"
            )
        raise RuntimeFailure(
            f"{self.model_path}: native TensorRT engines are not supported yet; use platform 'onnxruntime' "
            "with runtime.execution_providers [tensorrt, cuda, cpu]"
        )

    @property
    def inputs(self) -> list[TensorInfo]:
        return []

    @property
    def outputs(self) -> list[TensorInfo]:
        return []

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        raise RuntimeFailure("TensorRT runtime is not loaded")
