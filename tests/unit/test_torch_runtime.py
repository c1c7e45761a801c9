"""The PyTorch runtime's choices and refusals (no model weights needed): device and dtype,
entry files, declared tensors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.torch_runtime import TorchRuntime, choose_device, read_spec
from taskserve.torch_modules.efficientnet_lite0 import EfficientNetLite0


def _config(**data: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", "platform": "torch", **data})


def test_device_and_dtype_choice() -> None:
    assert choose_device(_config(), None, cuda_available=False) == ("cpu", torch.float32)
    assert choose_device(_config(), None, cuda_available=True) == ("cuda:0", torch.float16)
    assert choose_device(_config(gpus=[1]), 1, cuda_available=True) == ("cuda:1", torch.float16)
    bf16 = _config(runtime={"torch": {"dtype": "bf16", "device": "cpu"}})
    assert choose_device(bf16, None, cuda_available=True) == ("cpu", torch.bfloat16)
    with pytest.raises(RuntimeFailure, match="no usable GPU"):
        choose_device(_config(gpus=[0]), 0, cuda_available=False)
    with pytest.raises(RuntimeFailure, match="fp16 needs CUDA"):
        choose_device(_config(runtime={"torch": {"dtype": "fp16"}}), None, cuda_available=False)


def test_entry_spec_errors(tmp_path: Path) -> None:
    with pytest.raises(RuntimeFailure, match="missing"):
        read_spec(tmp_path)
    (tmp_path / "torch_model.json").write_text("{not json")
    with pytest.raises(RuntimeFailure, match="not readable JSON"):
        read_spec(tmp_path)
    (tmp_path / "torch_model.json").write_text(json.dumps({"architecture": "pickle"}))
    with pytest.raises(RuntimeFailure, match="'architecture' must be one of"):
        read_spec(tmp_path)
    (tmp_path / "torch_model.json").write_text(json.dumps({"architecture": "transformers", "format": 9}))
    with pytest.raises(RuntimeFailure, match="newer than this server reads"):
        read_spec(tmp_path)


def test_undeclared_tensors_are_refused(tmp_path: Path) -> None:
    runtime = TorchRuntime(tmp_path / "1" / "torch_model.json", _config(max_batch_size=4))
    with pytest.raises(RuntimeFailure, match="needs inputs and outputs declared"):
        runtime.load()


def test_efficientnet_entry_round_trip_on_cpu(tmp_path: Path) -> None:
    """A torch entry written by hand: safetensors + spec, served in fp32 on the CPU."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    module = EfficientNetLite0(num_classes=10, image_size=32).eval()
    version = tmp_path / "1"
    version.mkdir()
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(version / "model.safetensors"))
    spec = {"format": 1, "architecture": "efficientnet-lite0", "num_classes": 10, "image_size": 32}
    (version / "torch_model.json").write_text(json.dumps(spec))
    config = _config(
        max_batch_size=4,
        inputs=[{"name": "pixel_values", "datatype": "FP32", "dims": [3, 32, 32]}],
        outputs=[{"name": "logits", "datatype": "FP32", "dims": [10]}],
    )
    runtime = TorchRuntime(version / "torch_model.json", config)
    runtime.load()
    assert [(t.name, t.shape) for t in runtime.inputs] == [("pixel_values", (-1, 3, 32, 32))]
    pixels = np.random.default_rng(0).uniform(-1, 1, size=(2, 3, 32, 32)).astype(np.float32)
    got = runtime.infer({"pixel_values": pixels})["logits"]
    with torch.inference_mode():
        want = module(torch.from_numpy(pixels)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert got.dtype == np.float32 and runtime.description.endswith("cpu float32")
    with pytest.raises(RuntimeFailure, match="no input"):
        runtime.infer({"pixels": pixels})
    runtime.close()
    with pytest.raises(RuntimeFailure, match="not loaded"):
        runtime.infer({"pixel_values": pixels})
