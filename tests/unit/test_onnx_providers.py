"""Execution-provider choice, fallback and TensorRT options: pure functions, fake provider lists."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.onnx_providers import (
    Profile,
    check_active,
    derive_profiles,
    profile_options,
    select_providers,
    uses_cuda,
)

CPU = ["CPUExecutionProvider"]
CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def _config(**extra: object) -> ModelConfig:
    data: dict[str, object] = {
        "name": "m",
        "max_batch_size": 8,
        "inputs": [
            {"name": "input_ids", "datatype": "INT64", "dims": [-1]},
            {"name": "attention_mask", "datatype": "INT64", "dims": [-1]},
        ],
        "dynamic_batching": {"length_buckets": [16, 32]},
        "task_options": {"max_length": 64},
    }
    data.update(extra)
    return ModelConfig.model_validate(data)


def _names(chosen: list[object]) -> list[str]:
    return [c if isinstance(c, str) else c[0] for c in chosen]  # type: ignore[index,misc]


def test_cpu_machine_falls_back_to_cpu(tmp_path: Path) -> None:
    assert select_providers(_config(), CPU, tmp_path / "model.onnx") == ["CPUExecutionProvider"]


def test_cuda_machine_gets_cuda_first_with_the_device(tmp_path: Path) -> None:
    config = _config(runtime={"device_id": 1, "execution_providers": ["cuda", "cpu"], "cuda_graphs": True})
    chosen = select_providers(config, ALL, tmp_path / "model.onnx")
    assert chosen == [
        ("CUDAExecutionProvider", {"device_id": 1, "enable_cuda_graph": "1"}),
        "CPUExecutionProvider",
    ]


def test_gpu_placement_overrides_the_device_and_drops_the_cpu(tmp_path: Path) -> None:
    config = _config(runtime={"execution_providers": ["cuda", "cpu"]})
    chosen = select_providers(config, CUDA, tmp_path / "model.onnx", gpu=3)
    assert chosen == [("CUDAExecutionProvider", {"device_id": 3})]


def test_gpu_placement_without_a_gpu_provider_says_what_to_install(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure) as err:
        select_providers(_config(), CPU, tmp_path / "model.onnx", gpu=0)
    assert "GPU 0" in err.value.message and "onnxruntime-gpu" in err.value.message


def test_nothing_available_names_both_lists(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure) as err:
        select_providers(_config(runtime={"execution_providers": ["cuda"]}), CPU, tmp_path / "model.onnx")
    assert "['cuda']" in err.value.message and "CPUExecutionProvider" in err.value.message


def test_tensorrt_options_flags_caches_and_profiles(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    config = _config(runtime={"tensorrt": {"fp16": True, "int8": True, "cache_dir": str(cache)}})
    chosen = select_providers(config, ALL, tmp_path / "1" / "model.onnx")
    assert _names(chosen) == ALL
    name, options = chosen[0]  # type: ignore[misc]
    assert options["trt_fp16_enable"] is True and options["trt_int8_enable"] is True
    assert options["trt_engine_cache_path"] == str(cache) == options["trt_timing_cache_path"]
    assert cache.is_dir()
    # Buckets 16, 32 and max_length 64: three profiles per input.
    assert options["trt_profile_min_shapes"] == (
        "attention_mask:1x1,input_ids:1x1,attention_mask:1x17,input_ids:1x17,attention_mask:1x33,input_ids:1x33"
    )
    assert options["trt_profile_max_shapes"] == (
        "attention_mask:8x16,input_ids:8x16,attention_mask:8x32,input_ids:8x32,attention_mask:8x64,input_ids:8x64"
    )


def test_default_tensorrt_cache_sits_next_to_the_version(tmp_path: Path) -> None:
    chosen = select_providers(_config(), ALL, tmp_path / "1" / "model.onnx")
    assert chosen[0][1]["trt_engine_cache_path"] == str(tmp_path / "1" / "trt_cache")  # type: ignore[index]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_unwritable_tensorrt_cache_fails_with_the_field(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        config = _config(runtime={"tensorrt": {"cache_dir": str(locked / "sub")}})
        with pytest.raises(RuntimeFailure) as err:
            select_providers(config, ALL, tmp_path / "model.onnx")
        assert "runtime.tensorrt.cache_dir" in err.value.message
    finally:
        locked.chmod(0o700)


def test_profiles_one_per_bucket() -> None:
    config = _config()
    assert config.inputs is not None
    profiles = derive_profiles(config.inputs, 8, (16, 32), 64)
    assert [p.shapes["input_ids"] for p in profiles] == [
        ((1, 1), (8, 16), (8, 16)),
        ((1, 17), (8, 32), (8, 32)),
        ((1, 33), (8, 64), (8, 64)),
    ]
    # No buckets: one profile up to max_length; bucket edges past max_length are dropped.
    assert [p.shapes["input_ids"] for p in derive_profiles(config.inputs, 4, (), 128)] == [
        ((1, 1), (4, 128), (4, 128))
    ]
    assert len(derive_profiles(config.inputs, 4, (16, 256), 128)) == 2


def test_profiles_of_fixed_and_unbatched_inputs() -> None:
    image = ModelConfig.model_validate(
        {"name": "img", "max_batch_size": 16, "inputs": [{"name": "pixels", "datatype": "FP32", "dims": [3, 224, 224]}]}
    )
    assert image.inputs is not None
    (profile,) = derive_profiles(image.inputs, 16, (), 512)
    assert profile.shapes["pixels"] == ((1, 3, 224, 224), (16, 3, 224, 224), (16, 3, 224, 224))
    (flat,) = derive_profiles(image.inputs, 0, (), 512)
    assert flat.shapes["pixels"][0] == (3, 224, 224)
    assert profile_options([]) == {}
    assert profile_options([Profile({"x": ((1,), (2,), (3,))})])["trt_profile_opt_shapes"] == "x:2"


def test_silent_cpu_fallback_is_an_error_for_gpu_instances(caplog: pytest.LogCaptureFixture) -> None:
    requested = [("CUDAExecutionProvider", {"device_id": 0}), "CPUExecutionProvider"]
    with pytest.raises(RuntimeFailure, match="fell back"):
        check_active(_config(), requested, CPU, gpu=0)
    with caplog.at_level(logging.WARNING):
        check_active(_config(), requested, CPU, gpu=None)
    assert "could not start ['CUDAExecutionProvider']" in caplog.text
    check_active(_config(), requested, ["CUDAExecutionProvider", "CPUExecutionProvider"], gpu=0)
    assert uses_cuda(["CUDAExecutionProvider"]) and not uses_cuda(CPU) and not uses_cuda([])
