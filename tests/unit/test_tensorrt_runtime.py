"""The native TensorRT runtime against a fake ``tensorrt`` module and host "device" memory:
the TensorRT 10 call sequence, shapes, errors. The real engine runs in tests/gpu."""

from __future__ import annotations

import enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes import tensorrt as trt_runtime
from taskserve.server.runtimes.tensorrt import TensorRTRuntime


class Mode(enum.Enum):
    INPUT = 0
    OUTPUT = 1


class DType(enum.Enum):
    FLOAT = 0
    INT64 = 1


class FakeContext:
    """OUTPUT0 = 2 * INPUT0 for batches of up to 4 rows of width 3."""

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self.calls: list[tuple[Any, ...]] = []
        self.shape: tuple[int, ...] = ()
        self.addresses: dict[str, int] = {}

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.calls.append(("set_input_shape", name, shape))
        if shape[0] > 4:
            return False
        self.shape = shape
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shape

    def set_tensor_address(self, name: str, address: int) -> None:
        self.calls.append(("set_tensor_address", name))
        self.addresses[name] = address

    def execute_async_v3(self, stream: int) -> bool:
        self.calls.append(("execute_async_v3", stream))
        source = self.memory.buffers[self.addresses["INPUT0"]]
        self.memory.buffers[self.addresses["OUTPUT0"]][...] = 2 * source
        return True


class FakeEngine:
    num_io_tensors = 2

    def __init__(self, memory: HostMemory) -> None:
        self.memory = memory
        self.contexts: list[FakeContext] = []

    def get_tensor_name(self, i: int) -> str:
        return ["INPUT0", "OUTPUT0"][i]

    def get_tensor_dtype(self, name: str) -> DType:
        return DType.FLOAT

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, 3)

    def get_tensor_mode(self, name: str) -> Mode:
        return Mode.INPUT if name == "INPUT0" else Mode.OUTPUT

    def create_execution_context(self) -> FakeContext:
        self.contexts.append(FakeContext(self.memory))
        return self.contexts[-1]


class HostMemory:
    """DeviceMemory on numpy arrays, addresses are keys."""

    stream = 1234

    def __init__(self) -> None:
        self.buffers: dict[int, np.ndarray] = {}
        self.closed = False

    def _keep(self, array: np.ndarray) -> tuple[Any, int]:
        self.buffers[id(array)] = array
        return array, id(array)

    def to_device(self, array: np.ndarray) -> tuple[Any, int]:
        return self._keep(array.copy())

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, int]:
        return self._keep(np.empty(shape, dtype))

    def to_host(self, buffer: Any) -> np.ndarray:
        return np.array(buffer)

    def close(self) -> None:
        self.closed = True


class FakeLogger:
    WARNING = 2

    def __init__(self, level: int) -> None:
        self.level = level


def _fake_trt(engine: FakeEngine | None) -> Any:
    return SimpleNamespace(
        Logger=FakeLogger,
        Runtime=lambda logger: SimpleNamespace(deserialize_cuda_engine=lambda data: engine),
        TensorIOMode=Mode,
        nptype=lambda dtype: {DType.FLOAT: np.float32, DType.INT64: np.int64}[dtype],
    )


@pytest.fixture
def plan(tmp_path: Path) -> Path:
    path = tmp_path / "1" / "model.plan"
    path.parent.mkdir()
    path.write_bytes(b"engine")
    return path


def _config() -> ModelConfig:
    return ModelConfig.model_validate({"name": "plan", "platform": "tensorrt", "max_batch_size": 4})


def test_tensor_address_api_sequence_and_results(plan: Path) -> None:
    memory = HostMemory()
    engine = FakeEngine(memory)
    runtime = TensorRTRuntime(plan, _config(), trt=_fake_trt(engine), memory=memory)
    runtime.load()
    assert [(t.name, t.datatype, t.shape) for t in runtime.inputs] == [("INPUT0", "FP32", (-1, 3))]
    assert [t.name for t in runtime.outputs] == ["OUTPUT0"]
    x = np.arange(6, dtype=np.float64).reshape(2, 3)  # converted to the engine's float32
    out = runtime.infer({"INPUT0": x})
    np.testing.assert_array_equal(out["OUTPUT0"], 2 * x.astype(np.float32))
    assert out["OUTPUT0"].dtype == np.float32
    (context,) = engine.contexts  # one execution context per instance, reused
    runtime.infer({"INPUT0": x[:1]})
    assert len(engine.contexts) == 1
    assert context.calls[:4] == [
        ("set_input_shape", "INPUT0", (2, 3)),
        ("set_tensor_address", "INPUT0"),
        ("set_tensor_address", "OUTPUT0"),
        ("execute_async_v3", 1234),
    ]
    runtime.close()
    assert memory.closed
    with pytest.raises(RuntimeFailure, match="not loaded"):
        runtime.infer({"INPUT0": x})


def test_shape_outside_the_profile_and_missing_input(plan: Path) -> None:
    memory = HostMemory()
    runtime = TensorRTRuntime(plan, _config(), trt=_fake_trt(FakeEngine(memory)), memory=memory)
    runtime.load()
    with pytest.raises(RuntimeFailure, match="optimization profile"):
        runtime.infer({"INPUT0": np.zeros((5, 3), np.float32)})
    with pytest.raises(RuntimeFailure, match="'INPUT0' is missing"):
        runtime.infer({})


def test_undeserializable_engine_and_missing_file(plan: Path) -> None:
    runtime = TensorRTRuntime(plan, _config(), trt=_fake_trt(None), memory=HostMemory())
    with pytest.raises(RuntimeFailure, match="could not deserialize"):
        runtime.load()
    gone = TensorRTRuntime(plan.with_name("nope.plan"), _config(), trt=_fake_trt(None), memory=HostMemory())
    with pytest.raises(RuntimeFailure, match="does not exist"):
        gone.load()


@pytest.mark.skipif(trt_runtime.tensorrt_available(), reason="TensorRT is installed here")
def test_without_tensorrt_the_model_fails_with_what_to_do(plan: Path) -> None:
    with pytest.raises(RuntimeFailure) as err:
        TensorRTRuntime(plan, _config()).load()
    assert "needs NVIDIA TensorRT" in err.value.message and "execution_providers" in err.value.message
