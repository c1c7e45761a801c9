"""Instance groups per GPU: placements, the missing-GPU reason, and config checks."""

from __future__ import annotations

import pytest

from taskserve.server.errors import ConfigError, ModelNotReady
from taskserve.server.repository.config import ModelConfig, parse_model_config
from taskserve.server.runtimes import devices
from taskserve.server.runtimes.devices import Placement, check_placements, instance_placements


def _config(**data: object) -> ModelConfig:
    return ModelConfig.model_validate({"name": "m", **data})


def test_placements_per_gpu() -> None:
    assert instance_placements(_config(instance_count=2)) == [Placement(0, None), Placement(1, None)]
    assert instance_placements(_config(gpus=[0, 1], instance_count=2)) == [
        Placement(0, 0), Placement(1, 0), Placement(2, 1), Placement(3, 1)
    ]  # fmt: skip


def test_missing_gpu_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    config = _config(gpus=[0, 1])
    monkeypatch.setattr(devices, "gpu_counter", lambda: 0)
    with pytest.raises(ModelNotReady) as err:
        check_placements(config, instance_placements(config))
    assert "GPU(s) [0, 1]" in err.value.message and "no NVIDIA GPU" in err.value.message
    monkeypatch.setattr(devices, "gpu_counter", lambda: 1)
    with pytest.raises(ModelNotReady, match=r"GPU\(s\) \[1\].*GPUs 0..0 only"):
        check_placements(config, instance_placements(config))
    monkeypatch.setattr(devices, "gpu_counter", lambda: 2)
    check_placements(config, instance_placements(config))
    # No gpus: nothing is counted.
    monkeypatch.setattr(devices, "gpu_counter", lambda: pytest.fail("counted GPUs for a CPU model"))
    check_placements(_config(), instance_placements(_config()))


def test_cuda_visible_devices_limits_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert devices._visible(4) == 4
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    assert devices._visible(4) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert devices._visible(4) == 0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,7,1")
    assert devices._visible(4) == 1  # CUDA stops at the first id that does not exist


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"gpus": [0, 0]}, "distinct GPU ids"),
        ({"gpus": [-1]}, "distinct GPU ids"),
        ({"gpus": [0], "runtime": {"execution_providers": ["cpu"]}}, "add 'cuda' or 'tensorrt'"),
        ({"gpus": [0], "platform": "torch", "runtime": {"torch": {"device": "cpu"}}}, "runtime.torch.device"),
    ],
)
def test_gpu_config_errors(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_model_config({"name": "m", **data}, __import__("pathlib").Path("m/config.yaml"), "m")
