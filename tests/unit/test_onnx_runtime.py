"""Execution-provider selection: GPU configs fall back on a CPU machine and fail cleanly when nothing fits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.onnx import OnnxRuntime
from tests.support.tiny_models import add_sub_graph, write_entry


@pytest.fixture(scope="module")
def model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    entry = write_entry(tmp_path_factory.mktemp("ort"), "simple", add_sub_graph(TensorProto.FLOAT), {})
    return entry / "1" / "model.onnx"


def _config(providers: list[str]) -> ModelConfig:
    return ModelConfig.model_validate(
        {"name": "simple", "max_batch_size": 8, "runtime": {"execution_providers": providers}}
    )


def _run(runtime: OnnxRuntime) -> dict[str, np.ndarray]:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    return runtime.infer({"INPUT0": a, "INPUT1": a})


def test_default_providers_fall_back_to_cpu(model_path: Path) -> None:
    runtime = OnnxRuntime(model_path, _config(["tensorrt", "cuda", "cpu"]))
    runtime.load()
    available = onnxruntime.get_available_providers()
    expected = next(
        p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider") if p in available
    )
    assert runtime.providers[0] == expected
    np.testing.assert_array_equal(_run(runtime)["OUTPUT0"], 2 * np.arange(8, dtype=np.float32).reshape(2, 4))


@pytest.mark.skipif("CUDAExecutionProvider" in onnxruntime.get_available_providers(), reason="this machine has CUDA")
def test_gpu_only_config_fails_with_what_is_available(model_path: Path) -> None:
    runtime = OnnxRuntime(model_path, _config(["cuda"]))
    with pytest.raises(RuntimeFailure) as err:
        runtime.load()
    assert "CPUExecutionProvider" in err.value.message and "add 'cpu'" in err.value.message


@pytest.mark.gpu
@pytest.mark.skipif(
    "CUDAExecutionProvider" not in onnxruntime.get_available_providers(), reason="needs onnxruntime-gpu"
)
def test_cuda_provider_matches_cpu(model_path: Path) -> None:
    gpu = OnnxRuntime(model_path, _config(["cuda"]))
    gpu.load()
    assert gpu.providers[0] == "CUDAExecutionProvider"
    cpu = OnnxRuntime(model_path, _config(["cpu"]))
    cpu.load()
    np.testing.assert_allclose(_run(gpu)["OUTPUT1"], _run(cpu)["OUTPUT1"])


def test_wide_when_alone_shares_one_wider_session_that_computes_the_same(model_path: Path) -> None:
    config = ModelConfig.model_validate(
        {
            "name": "simple", "max_batch_size": 8, "instance_count": 2,
            "runtime": {"execution_providers": ["cpu"], "intra_op_threads": 1, "wide_when_alone": True,
                        "alone_intra_op_threads": 2},
        }
    )  # fmt: skip
    first, second = OnnxRuntime(model_path, config), OnnxRuntime(model_path, config)
    first.load()
    second.load()
    assert first.alone_width == second.alone_width == 2
    assert first._wide is second._wide  # one wide session for the model, not one per instance
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.testing.assert_array_equal(first.infer_alone({"INPUT0": a, "INPUT1": a})["OUTPUT0"], _run(first)["OUTPUT0"])
    first.close()
    second.close()
    # Off, or no wider than the instances' own threads: no extra session.
    narrow = ModelConfig.model_validate(
        {"name": "simple", "max_batch_size": 8, "runtime": {"execution_providers": ["cpu"], "wide_when_alone": True}}
    )
    alone = OnnxRuntime(model_path, narrow)
    alone.load()
    assert alone.alone_width == 0  # one instance already has every core


def test_cpu_memory_arena_follows_the_config(model_path: Path) -> None:
    """runtime.cpu_memory_arena: false (the diffusion entries) opens sessions without the
    arena that would keep the largest run's memory; the default keeps it."""
    from taskserve.server.runtimes.onnx_threads import session_options

    on = ModelConfig.model_validate({"name": "simple", "max_batch_size": 8})
    off = ModelConfig.model_validate({"name": "simple", "max_batch_size": 8, "runtime": {"cpu_memory_arena": False}})
    assert session_options(onnxruntime, on.runtime, 1).enable_cpu_mem_arena is True
    assert session_options(onnxruntime, off.runtime, 1).enable_cpu_mem_arena is False
    runtime = OnnxRuntime(model_path, off)
    runtime.load()
    try:
        assert _run(runtime)["OUTPUT0"].shape == (2, 4)
    finally:
        runtime.close()
