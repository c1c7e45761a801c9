"""Real NVML on a machine with an NVIDIA GPU: the collector behind a Prometheus HTTP
endpoint, then `taskserve-server --gpu-metrics on` as a process. Skipped without a GPU.

Kept light on imports so that ``benchmarks/gpu/device_check.sh`` can run it on a GPU
machine where only some of the server's dependencies are installed: the server test
skips, saying why, when the server does not import there (protobuf or grpcio older
than the generated code, say)."""

from __future__ import annotations

import threading
import time
import urllib.request
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import MetricsHandler
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from taskserve.server.gpu_metrics import GpuCollector, start_gpu_metrics

pytestmark = pytest.mark.gpu


def _scrape(port: int) -> dict[tuple[str, str], Sample]:
    """{(sample name, gpu index): sample} for the GPU samples on 127.0.0.1:port/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    return {
        (s.name, s.labels["gpu"]): s
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name.startswith("taskserve_gpu_")
    }


def _check_gpu0(samples: dict[tuple[str, str], Sample]) -> None:
    total = samples["taskserve_gpu_memory_total_bytes", "0"]
    assert total.value > 0
    assert total.labels["gpu_uuid"].startswith(("GPU-", "MIG-")), total.labels
    assert 0.0 <= samples["taskserve_gpu_utilization", "0"].value <= 1.0
    assert 0 <= samples["taskserve_gpu_memory_used_bytes", "0"].value <= total.value
    # Fields some boards do not report: checked where present.
    for name in ("power_usage_watts", "power_limit_watts", "energy_consumption_joules_total"):
        sample = samples.get((f"taskserve_gpu_{name}", "0"))
        assert sample is None or sample.value >= 0, sample


@pytest.fixture
def collector() -> Iterator[tuple[GpuCollector, CollectorRegistry]]:
    pytest.importorskip("pynvml")
    registry = CollectorRegistry()
    gpu = start_gpu_metrics("on", registry, max_age_s=0.0)
    assert gpu is not None
    try:
        yield gpu, registry
    finally:
        gpu.close()


def test_collector_reports_gpu0_over_http(collector: tuple[GpuCollector, CollectorRegistry]) -> None:
    gpu, registry = collector
    # A plain HTTP server rather than start_http_server, whose return value changed across releases.
    http = ThreadingHTTPServer(("127.0.0.1", 0), MetricsHandler.factory(registry))
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    try:
        first = _scrape(http.server_port)
        _check_gpu0(first)
        time.sleep(0.5)
        second = _scrape(http.server_port)
        _check_gpu0(second)
        energy = ("taskserve_gpu_energy_consumption_joules_total", "0")
        if energy in first:
            assert second[energy].value >= first[energy].value  # a counter
    finally:
        http.shutdown()
        http.server_close()
        thread.join(5)
    gpu.close()
    assert gpu.read() == []


def test_server_process_reports_gpu0(tmp_path: Path) -> None:
    pytest.importorskip("pynvml")
    try:
        import taskserve.server.frontends.grpc.server  # noqa: F401 - does the whole server import here?
    except Exception as err:  # protobuf/grpcio older than the generated code, a missing package, ...
        pytest.skip(f"the server does not import here: {type(err).__name__}: {err}")
    from tests.support.server import ServerProcess

    repository = tmp_path / "models"  # no models: the GPU metrics need none
    repository.mkdir()
    server = ServerProcess(repository, "--gpu-metrics", "on")
    try:
        _check_gpu0(_scrape(server.metrics_port))
        server.terminate()
        assert server.wait(60) == 0, "".join(server.output)
        assert "GPU metrics on for" in "".join(server.output)
    finally:
        server.kill()
