"""The NVML GPU collector against a fake ``pynvml``: samples and labels, unsupported
fields, caching, the auto/on/off modes and NVML's lifecycle."""

from __future__ import annotations

import logging
import sys

import pytest
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from taskserve.server.gpu_metrics import GpuCollector, GpuMetricsUnavailable, start_gpu_metrics
from tests.support.fake_nvml import (
    NVML_ERROR_LIBRARY_NOT_FOUND,
    NVML_ERROR_UNKNOWN,
    FakeGpu,
    FakeNvml,
    NVMLError,
    require_real_nvml_without_driver,
)

UUID0 = "GPU-00000000-1111-2222-3333-444444444444"
UUID1 = "GPU-55555555-6666-7777-8888-999999999999"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """{(sample name, gpu index): value} for the GPU samples in a scrape of ``registry``."""
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name.startswith("taskserve_gpu_"):
                assert set(s.labels) == {"gpu", "gpu_uuid"}
                assert s.labels["gpu_uuid"] == {"0": UUID0, "1": UUID1}[s.labels["gpu"]]
                out[(s.name, s.labels["gpu"])] = s.value
    return out


def _collector(nvml: FakeNvml, clock: Clock | None = None, max_age_s: float = 1.0) -> GpuCollector:
    return GpuCollector.open(nvml, max_age_s, clock or Clock())


def test_samples_and_labels_per_gpu() -> None:
    nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1, utilization_percent=100, memory_used=0)])
    registry = CollectorRegistry()
    registry.register(_collector(nvml))
    samples = _samples(registry)
    assert samples == {
        ("taskserve_gpu_utilization", "0"): 0.37,
        ("taskserve_gpu_utilization", "1"): 1.0,
        ("taskserve_gpu_memory_used_bytes", "0"): 3 * 2**30,
        ("taskserve_gpu_memory_used_bytes", "1"): 0,
        ("taskserve_gpu_memory_total_bytes", "0"): 80 * 2**30,
        ("taskserve_gpu_memory_total_bytes", "1"): 80 * 2**30,
        ("taskserve_gpu_power_usage_watts", "0"): 250.5,
        ("taskserve_gpu_power_usage_watts", "1"): 250.5,
        ("taskserve_gpu_power_limit_watts", "0"): 700.0,
        ("taskserve_gpu_power_limit_watts", "1"): 700.0,
        ("taskserve_gpu_temperature_celsius", "0"): 41.0,
        ("taskserve_gpu_temperature_celsius", "1"): 41.0,
        # Energy counts from the collector's start, like Triton's nv_energy_consumption.
        ("taskserve_gpu_energy_consumption_joules_total", "0"): 0.0,
        ("taskserve_gpu_energy_consumption_joules_total", "1"): 0.0,
    }
    text = generate_latest(registry).decode()
    assert "# TYPE taskserve_gpu_energy_consumption_joules_total counter" in text
    assert "# TYPE taskserve_gpu_utilization gauge" in text


def test_bytes_uuid_is_decoded() -> None:
    # Older nvidia-ml-py releases return bytes.
    nvml = FakeNvml([FakeGpu(UUID0)])
    nvml.nvmlDeviceGetUUID = lambda handle: UUID0.encode()  # type: ignore[method-assign]
    collector = _collector(nvml)
    assert collector.read()[0].uuid == UUID0


def test_readings_are_cached_for_max_age_then_refreshed() -> None:
    gpu = FakeGpu(UUID0)
    nvml = FakeNvml([gpu])
    clock = Clock()
    registry = CollectorRegistry()
    registry.register(_collector(nvml, clock, max_age_s=1.0))
    _samples(registry)
    gpu.energy_mj = 1_004_500  # 4.5 J later
    gpu.memory_used = 5 * 2**30
    clock.now += 0.5
    cached = _samples(registry)
    assert nvml.calls.memory == 1
    assert cached[("taskserve_gpu_energy_consumption_joules_total", "0")] == 0.0
    assert cached[("taskserve_gpu_memory_used_bytes", "0")] == 3 * 2**30
    clock.now += 0.5
    fresh = _samples(registry)
    assert nvml.calls.memory == 2
    assert fresh[("taskserve_gpu_energy_consumption_joules_total", "0")] == pytest.approx(4.5)
    assert fresh[("taskserve_gpu_memory_used_bytes", "0")] == 5 * 2**30


def test_unsupported_field_drops_only_that_sample(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1, power_mw=None, energy_mj=None, temperature_c=None)])
    clock = Clock()
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="taskserve.server.gpu_metrics"):
        registry.register(_collector(nvml, clock))
        samples = _samples(registry)
        clock.now += 5
        assert _samples(registry) == samples
    for name in ("power_usage_watts", "energy_consumption_joules_total", "temperature_celsius"):
        assert (f"taskserve_gpu_{name}", "0") in samples
        assert (f"taskserve_gpu_{name}", "1") not in samples
    for name in ("utilization", "memory_used_bytes", "memory_total_bytes", "power_limit_watts"):
        assert (f"taskserve_gpu_{name}", "1") in samples
    # Once per GPU and field, not once per scrape.
    messages = [r.getMessage() for r in caplog.records]
    assert sum("GPU 1: power usage not available (Not Supported)" in m for m in messages) == 1
    assert sum("GPU 1: energy not available" in m for m in messages) == 1


def test_energy_supported_late_counts_from_first_reading() -> None:
    gpu = FakeGpu(UUID0, energy_mj=None)
    clock = Clock()
    collector = _collector(FakeNvml([gpu]), clock)
    assert collector.read()[0].energy_joules is None
    gpu.energy_mj = 2_000_000
    clock.now += 2
    assert collector.read()[0].energy_joules == 0.0
    gpu.energy_mj = 2_001_000
    clock.now += 2
    assert collector.read()[0].energy_joules == pytest.approx(1.0)


def test_a_broken_read_leaves_the_other_metrics_alone(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu(UUID0)])

    def broken(handle: object) -> None:
        raise RuntimeError("driver went away in an unexpected way")

    nvml.nvmlDeviceGetMemoryInfo = broken  # type: ignore[assignment,method-assign]
    registry = CollectorRegistry()
    Gauge("taskserve_model_ready", "1 when ready", ("model",), registry=registry).labels("m").set(1)
    registry.register(_collector(nvml))
    text = generate_latest(registry).decode()
    assert 'taskserve_model_ready{model="m"} 1.0' in text
    assert _samples(registry) == {}
    assert "reading GPU metrics failed" in caplog.text


def test_close_shuts_nvml_down_once_and_empties_scrapes() -> None:
    nvml = FakeNvml([FakeGpu(UUID0)])
    registry = CollectorRegistry()
    collector = _collector(nvml)
    registry.register(collector)
    assert _samples(registry)
    collector.close()
    collector.close()
    assert (nvml.calls.init, nvml.calls.shutdown, nvml.initialised) == (1, 1, 0)
    assert _samples(registry) == {}


def test_off_never_touches_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([FakeGpu(UUID0)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    registry = CollectorRegistry()
    assert start_gpu_metrics("off", registry) is None
    assert nvml.calls.init == 0 and _samples(registry) == {}


@pytest.mark.parametrize("mode", ["auto", "on"])
def test_auto_and_on_register_the_collector(monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    nvml = FakeNvml([FakeGpu(UUID0)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    registry = CollectorRegistry()
    collector = start_gpu_metrics(mode, registry)  # type: ignore[arg-type]
    assert collector is not None and collector.gpu_count == 1
    assert _samples(registry)[("taskserve_gpu_memory_total_bytes", "0")] == 80 * 2**30
    collector.close()
    assert nvml.initialised == 0


def test_auto_without_pynvml_is_off_with_one_info_log(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    registry = CollectorRegistry()
    with caplog.at_level(logging.INFO, logger="taskserve.server.gpu_metrics"):
        assert start_gpu_metrics("auto", registry) is None
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.INFO, "GPU metrics off: the pynvml module is missing "
                       "(import of pynvml halted; None in sys.modules); install nvidia-ml-py"),
    ]  # fmt: skip
    assert _samples(registry) == {}


def test_on_without_pynvml_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    with pytest.raises(GpuMetricsUnavailable, match=r"--gpu-metrics on, but the pynvml module is missing.*nvidia-ml"):
        start_gpu_metrics("on", CollectorRegistry())


def test_auto_without_driver_is_off(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with caplog.at_level(logging.INFO, logger="taskserve.server.gpu_metrics"):
        assert start_gpu_metrics("auto", CollectorRegistry()) is None
    assert len(caplog.records) == 1
    assert "GPU metrics off: NVML did not initialise: NVML Shared Library Not Found (the NVIDIA driver" in caplog.text
    assert nvml.calls.shutdown == 0  # nvmlInit failed: nothing to shut down


def test_on_without_driver_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", FakeNvml([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND))
    expected = r"--gpu-metrics on, but NVML did not initialise: .*driver.*auto or off"
    with pytest.raises(GpuMetricsUnavailable, match=expected):
        start_gpu_metrics("on", CollectorRegistry())


def test_no_gpu_shuts_nvml_down_again(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert start_gpu_metrics("auto", CollectorRegistry()) is None
    with pytest.raises(GpuMetricsUnavailable, match="found no GPU"):
        start_gpu_metrics("on", CollectorRegistry())
    assert (nvml.calls.init, nvml.calls.shutdown, nvml.initialised) == (2, 2, 0)


def test_failing_device_count_is_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([FakeGpu(UUID0)])

    def count() -> int:
        raise NVMLError(NVML_ERROR_UNKNOWN)

    nvml.nvmlDeviceGetCount = count  # type: ignore[method-assign]
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert start_gpu_metrics("auto", CollectorRegistry()) is None
    assert nvml.initialised == 0


def test_a_gpu_without_handle_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    nvml = FakeNvml([FakeGpu(UUID0), FakeGpu(UUID1)])
    by_index = nvml.nvmlDeviceGetHandleByIndex

    def handle(index: int) -> FakeGpu:
        if index == 0:
            raise NVMLError(NVML_ERROR_UNKNOWN)
        return by_index(index)

    nvml.nvmlDeviceGetHandleByIndex = handle  # type: ignore[method-assign]
    collector = _collector(nvml)
    assert [(r.index, r.uuid) for r in collector.read()] == [(1, UUID1)]
    assert "GPU 0 left out of the GPU metrics" in caplog.text


def test_real_pynvml_without_a_driver_fails_cleanly() -> None:
    """The installed nvidia-ml-py on a machine with no NVIDIA driver (CI, this dev machine)."""
    require_real_nvml_without_driver()
    assert start_gpu_metrics("auto", CollectorRegistry()) is None
    with pytest.raises(GpuMetricsUnavailable, match="NVML did not initialise"):
        start_gpu_metrics("on", CollectorRegistry())
