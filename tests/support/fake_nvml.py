"""A small stand-in for the ``pynvml`` module (nvidia-ml-py): the calls the GPU collector makes,
with readings a test sets and NVML's error classes. Install it with
``monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([...]))``."""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Any

import pytest

NVML_ERROR_UNINITIALIZED = 1
NVML_ERROR_NOT_SUPPORTED = 3
NVML_ERROR_LIBRARY_NOT_FOUND = 12
NVML_ERROR_UNKNOWN = 999


class NVMLError(Exception):
    _messages = {
        NVML_ERROR_UNINITIALIZED: "Uninitialized",
        NVML_ERROR_NOT_SUPPORTED: "Not Supported",
        NVML_ERROR_LIBRARY_NOT_FOUND: "NVML Shared Library Not Found",
        NVML_ERROR_UNKNOWN: "Unknown Error",
    }

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        return self._messages.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeGpu:
    """One GPU's readings in NVML's units; None makes that call raise Not Supported."""

    uuid: str
    utilization_percent: int | None = 37
    memory_used: int | None = 3 * 2**30
    memory_total: int | None = 80 * 2**30
    power_mw: int | None = 250_500
    power_limit_mw: int | None = 700_000
    energy_mj: int | None = 1_000_000
    temperature_c: int | None = 41


@dataclass
class _Utilization:
    gpu: int
    memory: int


@dataclass
class _Memory:
    total: int
    used: int
    free: int


@dataclass
class Calls:
    init: int = 0
    shutdown: int = 0
    memory: int = 0  # reads of memory info: one per GPU per NVML read


class FakeNvml(types.ModuleType):
    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, gpus: list[FakeGpu], init_error: int | None = None) -> None:
        super().__init__("pynvml")
        self.gpus = gpus
        self.init_error = init_error
        self.calls = Calls()
        self.initialised = 0

    def nvmlInit(self) -> None:
        self.calls.init += 1
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self.calls.shutdown += 1
        if self.initialised == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        self.initialised -= 1

    def _gpu(self, handle: Any) -> FakeGpu:
        if self.initialised == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        assert isinstance(handle, FakeGpu)
        return handle

    @staticmethod
    def _value(value: int | None) -> int:
        if value is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return value

    def nvmlDeviceGetCount(self) -> int:
        if self.initialised == 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self._gpu(self.gpus[index])

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return self._gpu(handle).uuid

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> _Utilization:
        return _Utilization(gpu=self._value(self._gpu(handle).utilization_percent), memory=0)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> _Memory:
        gpu = self._gpu(handle)
        self.calls.memory += 1
        used, total = self._value(gpu.memory_used), self._value(gpu.memory_total)
        return _Memory(total=total, used=used, free=total - used)

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return self._value(self._gpu(handle).power_mw)

    def nvmlDeviceGetPowerManagementLimit(self, handle: Any) -> int:
        return self._value(self._gpu(handle).power_limit_mw)

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: Any) -> int:
        return self._value(self._gpu(handle).energy_mj)

    def nvmlDeviceGetTemperature(self, handle: Any, sensor: int) -> int:
        assert sensor == self.NVML_TEMPERATURE_GPU
        return self._value(self._gpu(handle).temperature_c)


def require_real_nvml_without_driver() -> None:
    """Skip unless the real nvidia-ml-py is installed and NVML fails to initialise (no
    driver: CI, the dev machine). Where NVML works the gpu-marked tests cover the machine."""
    pynvml = pytest.importorskip("pynvml")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return
    pynvml.nvmlShutdown()
    pytest.skip("NVML works here: the gpu-marked tests cover this machine")
