"""GPU metrics read through NVML, the counterparts of Triton's ``nv_gpu_*`` metrics.

``start_gpu_metrics`` imports ``pynvml`` (package ``nvidia-ml-py``) only when asked,
so the server imports and runs without it. The ``GpuCollector`` is a Prometheus
custom collector: a scrape reads the GPUs, and readings younger than ``max_age_s``
are reused, so scrapes close together (several Prometheus servers, a dashboard)
cost one NVML read. A field a GPU does not support (power on some boards, energy
before Volta) drops that one sample, never the scrape.

Only prometheus-client and the standard library are imported here: the device
check (``benchmarks/gpu/device_check.sh``) runs this module on machines that have
nothing else of the server installed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any, get_args

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from taskserve.server.settings import GpuMetricsMode

log = logging.getLogger(__name__)

GPU_METRICS_MODES: tuple[GpuMetricsMode, ...] = get_args(GpuMetricsMode)
LABELS = ("gpu", "gpu_uuid")
# Scrapes within this many seconds of the last NVML read reuse it.
DEFAULT_MAX_AGE_S = 1.0


class GpuMetricsUnavailable(RuntimeError):
    """NVML cannot be used: pynvml is missing, the driver is missing, or no GPU answers."""


@dataclass(frozen=True)
class GpuReading:
    """One GPU's readings at one moment; None where the GPU did not report the field."""

    index: int
    uuid: str
    utilization: float | None = None  # ratio in [0, 1]
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    power_usage_watts: float | None = None
    power_limit_watts: float | None = None
    energy_joules: float | None = None  # since the collector started
    temperature_celsius: float | None = None


@dataclass
class _Device:
    index: int
    uuid: str
    handle: Any
    # NVML's energy counter (mJ since the driver loaded) when the collector started.
    energy_baseline_mj: int | None = None


class GpuCollector:
    """Prometheus collector for the GPUs NVML sees. Owns one ``nvmlInit``; ``close`` ends it.

    Thread-safe: the metrics HTTP server scrapes on its own threads. One lock covers
    reading and ``close``, so NVML is never shut down under a read in progress.
    """

    def __init__(
        self,
        nvml: ModuleType,
        devices: list[_Device],
        max_age_s: float = DEFAULT_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nvml = nvml
        self._devices = devices
        self._max_age_s = max_age_s
        self._clock = clock
        self._lock = threading.Lock()
        self._readings: list[GpuReading] = []
        self._read_at: float | None = None
        self._closed = False
        self._reported: set[tuple[int, str]] = set()  # (gpu, field) failures already logged
        for device in devices:
            device.energy_baseline_mj = self._field(device, "energy", self._energy_mj)

    @classmethod
    def open(
        cls, nvml: ModuleType, max_age_s: float = DEFAULT_MAX_AGE_S, clock: Callable[[], float] = time.monotonic
    ) -> GpuCollector:
        """``nvmlInit`` and list the GPUs; raises ``GpuMetricsUnavailable`` (NVML shut down again) if none answers."""
        try:
            nvml.nvmlInit()
        except (nvml.NVMLError, OSError) as err:
            raise GpuMetricsUnavailable(f"NVML did not initialise: {err} (the NVIDIA driver provides it)") from err
        try:
            try:
                count = nvml.nvmlDeviceGetCount()
            except nvml.NVMLError as err:
                raise GpuMetricsUnavailable(f"NVML could not count the GPUs: {err}") from err
            devices = []
            for index in range(count):
                try:
                    handle = nvml.nvmlDeviceGetHandleByIndex(index)
                    uuid = nvml.nvmlDeviceGetUUID(handle)
                except nvml.NVMLError as err:
                    log.warning("GPU %d left out of the GPU metrics: %s", index, err)
                    continue
                devices.append(_Device(index, uuid.decode() if isinstance(uuid, bytes) else str(uuid), handle))
            if not devices:
                raise GpuMetricsUnavailable("NVML initialised but found no GPU")
            return cls(nvml, devices, max_age_s, clock)
        except BaseException:
            _shutdown(nvml)
            raise

    @property
    def gpu_count(self) -> int:
        return len(self._devices)

    def read(self) -> list[GpuReading]:
        """The readings of every GPU, at most ``max_age_s`` old; empty once closed."""
        with self._lock:
            if self._closed:
                return []
            now = self._clock()
            if self._read_at is None or now - self._read_at >= self._max_age_s:
                self._readings = [self._read_device(d) for d in self._devices]
                self._read_at = now
            return self._readings

    def describe(self) -> Iterator[Metric]:
        # The names, without reading the GPUs, for the registry's duplicate check.
        yield from self._families([])

    def collect(self) -> Iterator[Metric]:
        try:
            readings = self.read()
        except Exception:
            # A broken GPU read must not take the server's other metrics down with it:
            # an exception here would turn the whole scrape into an HTTP 500.
            log.exception("reading GPU metrics failed; this scrape has none")
            readings = []
        yield from self._families(readings)

    def close(self) -> None:
        """Stop reading and shut NVML down. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            _shutdown(self._nvml)

    def _families(self, readings: list[GpuReading]) -> Iterator[Metric]:
        def gauge(name: str, doc: str, value: Callable[[GpuReading], float | None]) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=LABELS)
            _add(family, readings, value)
            return family

        yield gauge("taskserve_gpu_utilization", "GPU utilization ratio [0, 1] over NVML's last sample period",
                    lambda r: r.utilization)  # fmt: skip
        yield gauge("taskserve_gpu_memory_used_bytes", "GPU memory in use, bytes",
                    lambda r: r.memory_used_bytes)  # fmt: skip
        yield gauge("taskserve_gpu_memory_total_bytes", "GPU memory in total, bytes",
                    lambda r: r.memory_total_bytes)  # fmt: skip
        yield gauge("taskserve_gpu_power_usage_watts", "GPU power draw, watts", lambda r: r.power_usage_watts)
        yield gauge("taskserve_gpu_power_limit_watts", "GPU power management limit, watts",
                    lambda r: r.power_limit_watts)  # fmt: skip
        yield gauge("taskserve_gpu_temperature_celsius", "GPU core temperature, degrees Celsius",
                    lambda r: r.temperature_celsius)  # fmt: skip
        energy = CounterMetricFamily(
            "taskserve_gpu_energy_consumption_joules", "GPU energy consumed since the server started, joules",
            labels=LABELS,
        )  # fmt: skip
        _add(energy, readings, lambda r: r.energy_joules)
        yield energy

    def _read_device(self, d: _Device) -> GpuReading:
        nvml = self._nvml
        memory = self._field(d, "memory", nvml.nvmlDeviceGetMemoryInfo)
        utilization = self._field(d, "utilization", nvml.nvmlDeviceGetUtilizationRates)
        power_mw = self._field(d, "power usage", nvml.nvmlDeviceGetPowerUsage)
        limit_mw = self._field(d, "power limit", nvml.nvmlDeviceGetPowerManagementLimit)
        temperature = self._field(
            d, "temperature", lambda handle: nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU)
        )
        return GpuReading(
            index=d.index,
            uuid=d.uuid,
            utilization=None if utilization is None else utilization.gpu / 100.0,
            memory_used_bytes=None if memory is None else int(memory.used),
            memory_total_bytes=None if memory is None else int(memory.total),
            power_usage_watts=None if power_mw is None else power_mw / 1000.0,
            power_limit_watts=None if limit_mw is None else limit_mw / 1000.0,
            energy_joules=self._energy_since_start(d),
            temperature_celsius=None if temperature is None else float(temperature),
        )  # fmt: skip

    def _energy_mj(self, handle: Any) -> int:
        return int(self._nvml.nvmlDeviceGetTotalEnergyConsumption(handle))

    def _energy_since_start(self, d: _Device) -> float | None:
        now: int | None = self._field(d, "energy", self._energy_mj)
        if now is None:
            return None
        if d.energy_baseline_mj is None or now < d.energy_baseline_mj:
            # First reading (unsupported at start), or the driver reloaded and its counter
            # restarted: count from here; Prometheus' rate() treats it as a counter reset.
            d.energy_baseline_mj = now
        return (now - d.energy_baseline_mj) / 1000.0

    def _field(self, d: _Device, name: str, read: Callable[[Any], Any]) -> Any:
        """``read(handle)``, or None when NVML refuses (not supported, GPU lost, ...); logged once per GPU and field."""
        try:
            return read(d.handle)
        except self._nvml.NVMLError as err:
            if (d.index, name) not in self._reported:
                self._reported.add((d.index, name))
                log.info("GPU %d: %s not available (%s); that sample is left out", d.index, name, err)
            return None


def _add(
    family: GaugeMetricFamily | CounterMetricFamily,
    readings: list[GpuReading],
    value: Callable[[GpuReading], float | None],
) -> None:
    for r in readings:
        v = value(r)
        if v is not None:
            family.add_metric([str(r.index), r.uuid], v)


def _shutdown(nvml: ModuleType) -> None:
    try:
        nvml.nvmlShutdown()
    except nvml.NVMLError as err:
        log.debug("nvmlShutdown: %s", err)


def start_gpu_metrics(
    mode: GpuMetricsMode, registry: CollectorRegistry, max_age_s: float = DEFAULT_MAX_AGE_S
) -> GpuCollector | None:
    """Register a ``GpuCollector`` on ``registry`` according to ``mode``; the caller closes it.

    ``off``: nothing. ``auto``: the collector when NVML works, else None and one info
    log. ``on``: the collector, or ``GpuMetricsUnavailable`` saying why not.
    """
    if mode == "off":
        return None
    try:
        import pynvml  # nvidia-ml-py; imported here so the server runs without it

        collector = GpuCollector.open(pynvml, max_age_s)
    except (ImportError, GpuMetricsUnavailable) as err:
        reason = str(err)
        if isinstance(err, ImportError):
            reason = f"the pynvml module is missing ({err}); install nvidia-ml-py"
        if mode == "on":
            raise GpuMetricsUnavailable(
                f"--gpu-metrics on, but {reason}; use --gpu-metrics auto or off to serve without GPU metrics"
            ) from err
        log.info("GPU metrics off: %s", reason)
        return None
    registry.register(collector)
    log.info("GPU metrics on for %d GPU(s)", collector.gpu_count)
    return collector
