"""The chart's HTTP door: off by default; when enabled, the container and Service expose the
port the server binds, and the optional HTTP readiness probe is one the real server answers
(503 until ready, 200 once serving)."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import helm_python
import pytest

from taskserve.server.main import parse_args
from tests.deploy.chart import port_named, render
from tests.deploy.test_chart_lint_and_schema import KUBE_VERSIONS, _validate_all
from tests.deploy.test_chart_server_contract import _local_args
from tests.support.server import ServerProcess
from tests.support.tiny_models import add_sub_graph, write_entry

HTTP = {"http": {"enabled": True, "port": 8080, "readinessProbe": True}}


def test_http_is_off_by_default() -> None:
    r = render()
    assert "--http-port" not in r.server["args"]
    assert "http" not in {p["name"] for p in r.server["ports"]}
    assert "http" not in {p["name"] for p in r.one("Service", "taskserve")["spec"]["ports"]}
    assert "grpc" in r.server["readinessProbe"]


def test_enabled_http_is_exposed_and_probed_on_the_port_the_server_binds(tmp_path: Path) -> None:
    r = render(HTTP)
    settings = parse_args([str(tmp_path) if a == "/models" else a for a in r.server["args"]])
    assert settings.http_port == port_named(r.server, "http") == 8080
    assert settings.host == "0.0.0.0"
    service = {p["name"]: p for p in r.one("Service", "taskserve")["spec"]["ports"]}
    assert service["http"]["port"] == 8080 and service["http"]["targetPort"] == "http"
    assert r.server["readinessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert "grpc" in r.server["startupProbe"]  # startup still waits on gRPC health


def test_with_tls_the_readiness_probe_stays_on_the_plaintext_health_port() -> None:
    r = render({**HTTP, "tls": {"enabled": True, "secretName": "s"}})
    assert "httpGet" not in r.server["readinessProbe"]
    assert r.server["readinessProbe"]["grpc"]["port"] == port_named(r.server, "health")


def test_an_http_probe_without_the_http_port_fails_with_what_to_set() -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape("set http.enabled=true")):
        render({"http": {"readinessProbe": True}})


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_http_render_validates_strictly(version: str) -> None:
    _validate_all(render(HTTP).manifests, version)


def test_the_server_answers_the_rendered_http_readiness_probe(tmp_path: Path) -> None:
    write_entry(tmp_path, "simple", add_sub_graph(), {"max_batch_size": 8})
    r = render(HTTP)
    args = _local_args(r.server["args"])
    args[args.index("--http-port") + 1] = "0"
    server = ServerProcess(tmp_path, *args)
    try:
        port = int(re.search(r"http=(\d+)", "".join(server.output))[1])  # type: ignore[index]
        url = f"http://127.0.0.1:{port}{r.server['readinessProbe']['httpGet']['path']}"
        deadline = time.monotonic() + 120
        while True:  # what the kubelet does: GET until 200
            try:
                if urllib.request.urlopen(url, timeout=5).status == 200:
                    break
            except urllib.error.HTTPError as err:
                assert err.code == 503, err.code
            assert time.monotonic() < deadline, "never ready:\n" + "".join(server.output)
            time.sleep(0.2)
        server.terminate()
        assert server.wait(60) == 0, "".join(server.output)
    finally:
        server.kill()
