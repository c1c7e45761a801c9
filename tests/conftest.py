"""Shared fixtures: environment for offline runs and the GPU marker."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _nvidia_gpu_present() -> bool:
    """An NVIDIA GPU that NVML or onnxruntime's CUDA provider sees. Tests that need more
    (onnxruntime-gpu, say) skip on their own: a GPU machine may have a CPU onnxruntime."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            if pynvml.nvmlDeviceGetCount() > 0:
                return True
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, or NVML without a driver
        pass
    try:
        import onnxruntime

        return "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    except ImportError:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if "gpu" in item.keywords]
    if not gpu_items or _nvidia_gpu_present():
        return
    skip = pytest.mark.skip(reason="needs an NVIDIA GPU (none found through NVML or onnxruntime)")
    for item in gpu_items:
        item.add_marker(skip)


@pytest.fixture(scope="session")
def demo_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo repository (real all-MiniLM-L6-v2 and EfficientNet-Lite0), exported once per run."""
    from taskserve.exporters.demo import QUICK_MODELS, build_demo

    out = tmp_path_factory.mktemp("demo-repo")
    build_demo(out, list(QUICK_MODELS))
    return out
