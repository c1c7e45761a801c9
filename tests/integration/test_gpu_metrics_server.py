"""GPU metrics in the real server: on the metrics endpoint beside the model metrics with a
fake pynvml, absent (and harmless) without one, and ``--gpu-metrics on`` refusing to start."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from onnx import TensorProto
from prometheus_client.parser import text_string_to_metric_families

from taskserve.server.frontends.grpc.server import create_server
from taskserve.server.gpu_metrics import GpuMetricsUnavailable
from taskserve.server.settings import ServerSettings
from tests.support.fake_nvml import (
    NVML_ERROR_LIBRARY_NOT_FOUND,
    FakeGpu,
    FakeNvml,
    require_real_nvml_without_driver,
)
from tests.support.server import running_server
from tests.support.tiny_models import add_sub_graph, write_entry

UUID = "GPU-12345678-aaaa-bbbb-cccc-1234567890ab"


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("gpu-metrics-repo")
    write_entry(repo, "simple", add_sub_graph(TensorProto.FLOAT), {"max_batch_size": 8})
    return repo


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text: str = resp.read().decode()
        return text


def test_fake_gpu_beside_the_model_metrics(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([FakeGpu(UUID, utilization_percent=12)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    with running_server(repository, gpu_metrics="on") as server:
        assert server.app is not None
        text = _scrape(server.app.metrics_port)
    samples = {(s.name, s.labels.get("gpu")): s for f in text_string_to_metric_families(text) for s in f.samples}
    memory_total = samples["taskserve_gpu_memory_total_bytes", "0"]
    assert memory_total.value == 80 * 2**30 and memory_total.labels["gpu_uuid"] == UUID
    assert samples["taskserve_gpu_utilization", "0"].value == 0.12
    assert 'taskserve_model_ready{model="simple",version="1"} 1.0' in text
    # The server's stop shut NVML down.
    assert (nvml.calls.init, nvml.calls.shutdown, nvml.initialised) == (1, 1, 0)


@pytest.mark.parametrize(
    "pynvml", [None, FakeNvml([], init_error=NVML_ERROR_LIBRARY_NOT_FOUND)], ids=["missing", "no-driver"]
)
def test_auto_without_nvml_serves_the_other_metrics(
    repository: Path, monkeypatch: pytest.MonkeyPatch, pynvml: FakeNvml | None
) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", pynvml)
    with running_server(repository) as server:  # gpu_metrics defaults to auto
        assert server.app is not None and server.app.gpu_metrics is None
        text = _scrape(server.app.metrics_port)
    assert 'taskserve_model_ready{model="simple",version="1"} 1.0' in text
    assert "taskserve_gpu_" not in text


async def test_on_without_nvml_fails_before_binding(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)
    app = create_server(ServerSettings(repository, host="127.0.0.1", grpc_port=0, metrics_port=0, gpu_metrics="on"))
    with pytest.raises(GpuMetricsUnavailable, match="--gpu-metrics on, but the pynvml module is missing"):
        await app.start()
    assert app.grpc_port == 0 and app.metrics_port == 0


async def test_no_metrics_endpoint_loads_no_nvml(repository: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    nvml = FakeNvml([FakeGpu(UUID)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    app = create_server(ServerSettings(repository, host="127.0.0.1", grpc_port=0, metrics_port=-1))
    await app.start()
    try:
        assert app.gpu_metrics is None
    finally:
        await app.stop(grace=1, drain_delay=0)
    assert nvml.calls.init == 0


def _cli(repository: Path, *args: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH", "")) if p)
    return subprocess.run(
        [sys.executable, "-m", "taskserve.server.main", "--model-repository", str(repository),
         "--host", "127.0.0.1", "--grpc-port", "0", *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_cli_on_without_pynvml_exits_with_the_reason(repository: Path, tmp_path: Path) -> None:
    # A pynvml that cannot be imported stands for one that is not installed.
    (tmp_path / "pynvml.py").write_text('raise ImportError("No module named \'pynvml\'")\n')
    result = _cli(repository, "--metrics-port", "0", "--gpu-metrics", "on", pythonpath=tmp_path)
    assert result.returncode == 1, result.stderr
    assert "taskserve-server: error: --gpu-metrics on, but the pynvml module is missing" in result.stderr
    assert "install nvidia-ml-py" in result.stderr and "Traceback" not in result.stderr
    assert "listening" not in result.stdout


def test_cli_on_with_real_pynvml_and_no_driver_exits_with_the_reason(repository: Path) -> None:
    require_real_nvml_without_driver()
    result = _cli(repository, "--metrics-port", "0", "--gpu-metrics", "on")
    assert result.returncode == 1, result.stderr
    assert "taskserve-server: error: --gpu-metrics on, but NVML did not initialise" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_on_needs_the_metrics_endpoint(repository: Path) -> None:
    result = _cli(repository, "--metrics-port", "-1", "--gpu-metrics", "on")
    assert result.returncode == 2
    assert "--gpu-metrics on needs the metrics endpoint" in result.stderr
