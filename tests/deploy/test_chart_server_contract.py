"""The chart and the real server agree: the rendered arguments are ones `taskserve-server`
accepts, the autoscaler's metric is one the server exports, and a server started with
exactly those arguments answers the probes the pod declares and exits cleanly on SIGTERM."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry

from taskserve.server.main import parse_args
from taskserve.server.metrics import ServerMetrics
from tests.deploy.chart import ALL_FEATURES, port_named, render
from tests.support.certs import make_test_pki
from tests.support.server import ServerProcess
from tests.support.tiny_models import add_sub_graph, write_entry

# Replaced for a local run: the repository path, and loopback on free ports.
LOCAL_FLAGS = ("--model-repository", "--host", "--grpc-port", "--metrics-port", "--metrics-host", "--drain-delay")


def _local_args(args: list[str]) -> list[str]:
    """The rendered args without the flags a local run replaces (each flag takes a value)."""
    kept, i = [], 0
    while i < len(args):
        if args[i] in LOCAL_FLAGS:
            i += 2
        else:
            kept.append(args[i])
            i += 1
    return kept


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
def test_rendered_args_are_accepted_by_the_server_cli(values: dict[str, Any] | None, tmp_path: Path) -> None:
    r = render(values)
    args = list(r.server["args"])
    args[args.index("--model-repository") + 1] = str(tmp_path)  # /models exists only in the pod
    # The Secrets' files exist only in the pod: stand-ins with the same names.
    pki = make_test_pki(tmp_path)
    (tmp_path / "tokens").write_text("a-token\n")
    local = {"/etc/taskserve/tls/tls.crt": pki.server_cert, "/etc/taskserve/tls/tls.key": pki.server_key,
             "/etc/taskserve/tls/ca.crt": pki.ca, "/etc/taskserve/auth/tokens": tmp_path / "tokens"}  # fmt: skip
    args = [str(local.get(a, a)) for a in args]
    settings = parse_args(args)
    assert settings.grpc_port == port_named(r.server, "grpc")
    assert settings.metrics_port == port_named(r.server, "metrics")
    assert settings.host == "0.0.0.0"  # reachable through the pod IP
    assert settings.metrics_host == "0.0.0.0"  # scrapable through the pod IP
    assert settings.drain_delay_s + settings.shutdown_grace_s < r.pod_spec["terminationGracePeriodSeconds"]
    server_values = (values or {}).get("server", {})
    assert settings.model_control_mode == server_values.get("modelControlMode", "none")
    tls = (values or {}).get("tls", {})
    assert (settings.tls_cert is not None) is tls.get("enabled", False)
    assert (settings.tls_client_ca is not None) is tls.get("clientAuth", False)
    assert bool(settings.auth_tokens) is bool((values or {}).get("auth"))
    probe_port = r.server["readinessProbe"]["grpc"]["port"]
    assert probe_port == (settings.health_port if settings.tls_cert else settings.grpc_port)
    assert settings.strict_readiness is server_values.get("strictReadiness", False)
    assert settings.reflection is ("--no-reflection" not in server_values.get("extraArgs", []))
    assert settings.stream_write_timeout_s == server_values.get("streamWriteTimeout", 30)
    assert settings.max_streams_per_connection == server_values.get("maxStreamsPerConnection", 32)


def test_autoscaling_metric_is_a_gauge_the_server_exports() -> None:
    hpa = render({"autoscaling": {"enabled": True}}).one("HorizontalPodAutoscaler")
    name = next(m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods")
    registry = CollectorRegistry()
    ServerMetrics(registry)
    families = {f.name: f for f in registry.collect()}
    assert families[name].type == "gauge"


def _health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as channel:
        response = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=10
        )
        return int(response.status)


def test_server_with_the_rendered_args_answers_the_pods_probes_and_drains(tmp_path: Path) -> None:
    write_entry(tmp_path, "simple", add_sub_graph(), {"max_batch_size": 8})
    r = render({"server": {"strictReadiness": True}})
    pod_metadata = r.deployment["spec"]["template"]["metadata"]
    server = ServerProcess(tmp_path, *_local_args(r.server["args"]))
    try:
        probe = r.server["readinessProbe"]["grpc"]
        deadline = time.monotonic() + 180
        # What the kubelet's grpc probe does: Health/Check on the probe's service.
        while _health(server.address, probe["service"]) != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "never ready:\n" + "".join(server.output)
            time.sleep(0.2)
        assert _health(server.address, "simple") == health_pb2.HealthCheckResponse.SERVING

        client = tc.InferenceServerClient(server.address)
        inputs = [tc.InferInput(n, [1, 4], "FP32") for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert client.infer("simple", inputs).as_numpy("OUTPUT0").tolist() == [[2.0] * 4]

        # Where the pod annotations tell Prometheus to scrape (the port is local here).
        url = f"http://127.0.0.1:{server.metrics_port}{pod_metadata['annotations']['prometheus.io/path']}"
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'taskserve_pending_requests{model="simple",version="1"}' in text
        assert 'taskserve_request_success_total{model="simple",version="1"} 1.0' in text

        server.terminate()  # what the kubelet sends after the preStop hook
        assert server.wait(120) == 0, "".join(server.output)
    finally:
        server.kill()


def test_server_with_the_rendered_tls_and_token_args_answers_the_kubelets_plaintext_probe(tmp_path: Path) -> None:
    """With tls.enabled the probes move to the health-only port, which must answer in plaintext
    while the gRPC port wants TLS, a client certificate and a token."""
    from taskserve.clients import ClientOptions, TaskServeClient, TlsConfig, Unauthenticated

    repo = tmp_path / "repo"
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8})
    pki = make_test_pki(tmp_path)
    (tmp_path / "tokens").write_text("pod-token-0123\n")
    tls = {"enabled": True, "secretName": "tls", "clientAuth": True}
    r = render({"tls": tls, "auth": {"tokensSecret": {"name": "t"}}})
    local = {"/etc/taskserve/tls/tls.crt": pki.server_cert, "/etc/taskserve/tls/tls.key": pki.server_key,
             "/etc/taskserve/tls/ca.crt": pki.ca, "/etc/taskserve/auth/tokens": tmp_path / "tokens"}  # fmt: skip
    args = [str(local.get(a, a)) for a in _local_args(r.server["args"])]
    probe_port = r.server["readinessProbe"]["grpc"]["port"]
    args[args.index("--health-port") + 1] = "0"  # a free port locally
    server = ServerProcess(repo, *args)
    try:
        listening = next(line for line in server.output if "listening" in line)
        probe = f"127.0.0.1:{int(listening.rsplit('health=', 1)[1])}"
        deadline = time.monotonic() + 120
        while _health(probe, "") != health_pb2.HealthCheckResponse.SERVING:
            assert time.monotonic() < deadline, "never ready:\n" + "".join(server.output)
            time.sleep(0.2)
        assert probe_port == port_named(r.server, "health")
        mtls = TlsConfig.from_files(pki.ca, pki.client_key, pki.client_cert)
        token = (("authorization", "Bearer pod-token-0123"),)
        with TaskServeClient(server.address, ClientOptions(tls=mtls, metadata=token, timeout_s=10)) as client:
            out = client.infer("simple", {"INPUT0": np.ones((1, 4), np.float32), "INPUT1": np.ones((1, 4), np.float32)})
            assert out["OUTPUT0"].tolist() == [[2.0] * 4]
        with TaskServeClient(server.address, ClientOptions(tls=mtls, retry=None, timeout_s=10)) as client:
            with pytest.raises(Unauthenticated):
                client.server_live()
        server.terminate()
        assert server.wait(60) == 0, "".join(server.output)
    finally:
        server.kill()
