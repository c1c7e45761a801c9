"""Native TensorRT engines (``platform: tensorrt``, ``model.plan``), TensorRT 10+ API.

One execution context and one CUDA stream per instance; per batch: ``set_input_shape``
for each input, ``set_tensor_address`` for every input and output, ``execute_async_v3``
on the stream, then one copy back per output. Device memory and the stream come from a
``DeviceMemory`` (torch's CUDA allocator by default, from torch_runtime.py, the module
that may import torch), so this module imports neither torch nor tensorrt at import time.

Not yet run on a GPU (no TensorRT on the machines this was built on): until it is,
``NATIVE_RUNTIME_VERIFIED`` stays False and the exporter writes onnxruntime entries with
the TensorRT execution provider instead of ``platform: tensorrt`` (docs/gpu.md).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from taskserve.server.errors import RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import Runtime, TensorInfo

# Flip once tests/gpu/test_gpu_runtimes.py::test_native_tensorrt_engine_matches_onnxruntime has
# passed on a GPU with TensorRT installed.
NATIVE_RUNTIME_VERIFIED = False

# TensorRT DataType names -> v2 datatypes.
_TRT_TO_V2 = {
    "FLOAT": "FP32", "HALF": "FP16", "BF16": "FP32", "INT8": "INT8", "UINT8": "UINT8", "INT32": "INT32",
    "INT64": "INT64", "BOOL": "BOOL",
}  # fmt: skip


def tensorrt_available() -> bool:
    return importlib.util.find_spec("tensorrt") is not None


class DeviceMemory(Protocol):
    """Device buffers and a stream for one instance."""

    @property
    def stream(self) -> int: ...

    def to_device(self, array: np.ndarray) -> tuple[Any, int]:
        """Copy ``array`` to the device (async on the stream): (buffer, address)."""

    def empty(self, shape: tuple[int, ...], dtype: np.dtype) -> tuple[Any, int]: ...

    def to_host(self, buffer: Any) -> np.ndarray:
        """Copy back (waits for the stream)."""

    def close(self) -> None: ...


def _torch_memory(device_id: int) -> DeviceMemory:
    from taskserve.server.runtimes.torch_runtime import TorchDeviceMemory

    return TorchDeviceMemory(device_id)


class TensorRTRuntime(Runtime):
    def __init__(
        self, model_path: Path, config: ModelConfig, gpu: int | None = None, *, trt: Any = None,
        memory: DeviceMemory | None = None,
    ) -> None:  # fmt: skip
        self.model_path = model_path
        self.config = config
        self.gpu = gpu
        self._trt = trt  # injected in tests; imported at load otherwise
        self._memory = memory
        self._engine: Any = None
        self._context: Any = None
        self._inputs: list[TensorInfo] = []
        self._outputs: list[TensorInfo] = []
        self._dtypes: dict[str, np.dtype] = {}

    def load(self) -> None:
        trt = self._trt
        if trt is None:
            if not tensorrt_available():
                raise RuntimeFailure(
                    f"model {self.config.name!r}: platform 'tensorrt' needs NVIDIA TensorRT, which is not installed; "
                    "install TensorRT 10+ on a machine with an NVIDIA GPU, or serve the ONNX model with platform "
                    "'onnxruntime' and execution_providers [tensorrt, cuda, cpu]"
                )
            import tensorrt as trt  # type: ignore[import-not-found, no-redef]
        if not self.model_path.is_file():
            raise RuntimeFailure(f"model {self.config.name!r}: engine file {self.model_path.name} does not exist")
        device_id = self.config.runtime.device_id if self.gpu is None else self.gpu
        if self._memory is None:
            self._memory = _torch_memory(device_id)
        logger = trt.Logger(trt.Logger.WARNING)
        engine = trt.Runtime(logger).deserialize_cuda_engine(self.model_path.read_bytes())
        if engine is None:
            raise RuntimeFailure(
                f"model {self.config.name!r}: TensorRT could not deserialize {self.model_path.name} (built by another "
                "TensorRT version or for another GPU?); rebuild it on this machine"
            )
        inputs: list[TensorInfo] = []
        outputs: list[TensorInfo] = []
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = engine.get_tensor_dtype(name)
            dtype_name = getattr(dtype, "name", str(dtype)).upper()
            if dtype_name not in _TRT_TO_V2:
                raise RuntimeFailure(f"model {self.config.name!r}: tensor {name!r} has unsupported type {dtype_name}")
            self._dtypes[name] = np.dtype(trt.nptype(dtype))
            info = TensorInfo(name, _TRT_TO_V2[dtype_name], tuple(int(d) for d in engine.get_tensor_shape(name)))
            (inputs if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else outputs).append(info)
        self._engine = engine
        self._context = engine.create_execution_context()
        self._inputs, self._outputs = inputs, outputs

    @property
    def inputs(self) -> list[TensorInfo]:
        return self._inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self._outputs

    def infer(self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        context, memory = self._context, self._memory
        if context is None or memory is None:
            raise RuntimeFailure(f"model {self.config.name!r} is not loaded")
        keep: list[Any] = []  # buffers stay alive until the copies back are done
        for info in self._inputs:
            if info.name not in inputs:
                raise RuntimeFailure(f"model {self.config.name!r}: input {info.name!r} is missing")
            array = np.ascontiguousarray(inputs[info.name], dtype=self._dtypes[info.name])
            if not context.set_input_shape(info.name, tuple(array.shape)):
                raise RuntimeFailure(
                    f"model {self.config.name!r}: shape {list(array.shape)} of {info.name!r} is outside the engine's "
                    "optimization profile; rebuild the engine for it or lower max_batch_size"
                )
            buffer, address = memory.to_device(array)
            keep.append(buffer)
            context.set_tensor_address(info.name, address)
        produced = {}
        for info in self._outputs:
            shape = tuple(int(d) for d in context.get_tensor_shape(info.name))
            buffer, address = memory.empty(shape, self._dtypes[info.name])
            produced[info.name] = buffer
            context.set_tensor_address(info.name, address)
        if not context.execute_async_v3(memory.stream):
            raise RuntimeFailure(f"TensorRT failed to execute model {self.config.name!r}")
        names = output_names or [o.name for o in self._outputs]
        result = {name: memory.to_host(produced[name]) for name in names}
        del keep
        return result

    def close(self) -> None:
        self._context = None
        self._engine = None
        if self._memory is not None:
            self._memory.close()
            self._memory = None

    @property
    def description(self) -> str:
        return "tensorrt"

    @property
    def on_gpu(self) -> bool:
        return True
