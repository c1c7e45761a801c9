"""What the rendered chart promises the serving side: gRPC probes on the gRPC port,
enough termination grace for the drain, GPUs, autoscaling on the serving metric,
Prometheus scraping, the two Services and where the model repository comes from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart import ALL_FEATURES, Manifest, Rendered, arg_value, port_named, render


def _limits(r: Rendered) -> dict[str, Any]:
    return r.server["resources"].get("limits", {})  # type: ignore[no-any-return]


@pytest.mark.parametrize("grpc_port", [8001, 9100])
def test_startup_and_readiness_are_grpc_health_probes_on_the_grpc_port(grpc_port: int) -> None:
    r = render({"server": {"grpcPort": grpc_port}})
    server = r.server
    assert port_named(server, "grpc") == grpc_port
    assert arg_value(server["args"], "--grpc-port") == str(grpc_port)
    for probe in ("startupProbe", "readinessProbe"):
        # Service "" is the server's overall health (NOT_SERVING while loading or draining).
        assert server[probe]["grpc"] == {"port": grpc_port, "service": ""}, probe
    assert server["livenessProbe"]["tcpSocket"]["port"] == "grpc"
    for service in r.all("Service"):
        grpc = next(p for p in service["spec"]["ports"] if p["name"] == "grpc")
        assert (grpc["port"], grpc["targetPort"], grpc["appProtocol"]) == (grpc_port, "grpc", "grpc")


@pytest.mark.parametrize(
    "values",
    [{}, {"server": {"shutdownGrace": 120}}, {"server": {"shutdownGrace": 2.5, "drainDelay": 0.5}},
     {"terminationGracePeriodSeconds": 90}, {"preStopSleepSeconds": 5, "server": {"drainDelay": 0}}],
    ids=["default", "long-grace", "fractional-grace-and-delay", "explicit", "prestop-instead-of-drain-delay"],
)  # fmt: skip
def test_termination_grace_covers_prestop_drain_delay_and_the_servers_shutdown_grace(values: dict[str, Any]) -> None:
    r = render(values)
    grace = float(arg_value(r.server["args"], "--shutdown-grace"))
    delay = float(arg_value(r.server["args"], "--drain-delay"))
    assert grace == values.get("server", {}).get("shutdownGrace", 30)
    assert delay == values.get("server", {}).get("drainDelay", 5)
    prestop = r.server.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", ["sleep", "0"])
    assert prestop[0] == "sleep"
    assert r.pod_spec["terminationGracePeriodSeconds"] > float(prestop[1]) + delay + grace


def test_gpu_values_add_gpu_limits_node_selection_and_tolerations() -> None:
    cpu = render()
    assert "nvidia.com/gpu" not in _limits(cpu)
    assert "tolerations" not in cpu.pod_spec and "runtimeClassName" not in cpu.pod_spec

    gpu = render({"gpu": {"enabled": True, "count": 2, "nodeSelector": {"gpu": "h100"}, "runtimeClassName": "nvidia"},
                  "nodeSelector": {"pool": "inference"}})  # fmt: skip
    limits = _limits(gpu)
    assert limits["nvidia.com/gpu"] == 2
    assert limits["memory"] == cpu.server["resources"]["limits"]["memory"]  # the CPU/memory limits stay
    assert gpu.pod_spec["nodeSelector"] == {"gpu": "h100", "pool": "inference"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu.pod_spec[
        "tolerations"
    ]
    assert gpu.pod_spec["runtimeClassName"] == "nvidia"


def test_hpa_scales_the_deployment_on_pending_requests_with_cpu_fallback() -> None:
    assert render().all("HorizontalPodAutoscaler") == []
    r = render({"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12}})
    hpa = r.one("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": r.deployment["apiVersion"], "kind": "Deployment", "name": r.deployment["metadata"]["name"],
    }  # fmt: skip
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    by_type = {m["type"]: m for m in hpa["spec"]["metrics"]}
    pods = by_type["Pods"]["pods"]
    assert pods["metric"]["name"] == "taskserve_pending_requests"
    assert pods["target"]["type"] == "AverageValue"
    assert by_type["Resource"]["resource"]["name"] == "cpu"
    # The HPA owns the replica count; a fixed one would fight it on every upgrade.
    assert "replicas" not in r.deployment["spec"]


def test_cpu_fallback_can_be_turned_off() -> None:
    hpa = render({"autoscaling": {"enabled": True, "targetCPUUtilizationPercentage": None}}).one(
        "HorizontalPodAutoscaler"
    )
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]


def _selected(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_service_monitor_only_when_enabled_and_it_scrapes_each_pod_once() -> None:
    assert render().all("ServiceMonitor") == []
    r = render({"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}}})
    monitor = r.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "prometheus"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["ml"]}
    selector = monitor["spec"]["selector"]["matchLabels"]
    selected = [s for s in r.all("Service") if _selected(selector, s["metadata"]["labels"])]
    assert [s["metadata"]["name"] for s in selected] == ["taskserve"]  # not the headless one
    (endpoint,) = monitor["spec"]["endpoints"]
    metrics_port = next(p for p in selected[0]["spec"]["ports"] if p["name"] == endpoint["port"])
    assert metrics_port["targetPort"] == "metrics"
    assert endpoint["path"] == "/metrics"


def test_pods_carry_prometheus_scrape_annotations_for_the_metrics_port() -> None:
    r = render({"server": {"metricsPort": 9102}})
    annotations = r.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(port_named(r.server, "metrics")) == "9102"
    assert arg_value(r.server["args"], "--metrics-port") == "9102"
    off = render({"metrics": {"podAnnotations": False}}).deployment["spec"]["template"]["metadata"]
    assert "prometheus.io/scrape" not in (off.get("annotations") or {})


def test_clusterip_and_headless_services_select_the_server_pods() -> None:
    r = render()
    pod_labels = r.deployment["spec"]["template"]["metadata"]["labels"]
    main, headless = r.one("Service", "taskserve"), r.one("Service", "taskserve-headless")
    assert main["spec"]["type"] == "ClusterIP"
    assert headless["spec"]["clusterIP"] == "None"
    # Only ready pods get DNS records, so round_robin clients skip loading and draining pods.
    assert headless["spec"].get("publishNotReadyAddresses", False) is False
    for service in (main, headless):
        assert _selected(service["spec"]["selector"], pod_labels)
    assert "dns:///taskserve-headless.ml.svc.cluster.local:8001" in r.notes
    named = render(release="prod")
    assert {s["metadata"]["name"] for s in named.all("Service")} == {
        "prod-taskserve",
        "prod-taskserve-headless",
    }
    assert (
        render({"service": {"headless": {"enabled": False}}}).all("Service")[0]["metadata"]["name"]
        == "taskserve"
    )


def _mounts(container: Manifest) -> dict[str, Manifest]:
    return {m["mountPath"]: m for m in container.get("volumeMounts", [])}


def _volumes(r: Rendered) -> dict[str, Manifest]:
    return {v["name"]: v for v in r.pod_spec.get("volumes", [])}


def test_model_repository_from_the_image_mounts_nothing_over_models() -> None:
    r = render()
    assert arg_value(r.server["args"], "--model-repository") == "/models"
    assert "/models" not in _mounts(r.server)
    assert "initContainers" not in r.pod_spec


def test_model_repository_from_a_pvc_is_mounted_read_only() -> None:
    r = render({"modelRepository": {"source": "pvc", "pvc": {"claimName": "models", "subPath": "prod"}}})
    mount = _mounts(r.server)["/models"]
    assert mount["readOnly"] is True and mount["subPath"] == "prod"
    assert _volumes(r)[mount["name"]]["persistentVolumeClaim"] == {"claimName": "models", "readOnly": True}


def test_model_repository_from_an_init_container_shares_an_empty_dir() -> None:
    r = render({"modelRepository": {"source": "init"}})
    (init,) = r.pod_spec["initContainers"]
    assert init["command"] == ["taskserve-export", "demo", "--out", "/models", "--without-generation"]
    assert init["image"] == "taskserve:0.1.0-exporter"
    volume = _volumes(r)[_mounts(init)["/models"]["name"]]
    assert "emptyDir" in volume
    assert _mounts(r.server)["/models"]["name"] == volume["name"]


def test_model_configs_are_mounted_over_each_models_config_yaml() -> None:
    config = ALL_FEATURES["modelConfigs"]["all-MiniLM-L6-v2"]
    r = render({"modelConfigs": {"all-MiniLM-L6-v2": config}})
    configmap = r.one("ConfigMap")
    assert yaml.safe_load(configmap["data"]["all-MiniLM-L6-v2.yaml"]) == yaml.safe_load(config)
    mount = _mounts(r.server)["/models/all-MiniLM-L6-v2/config.yaml"]
    assert mount["subPath"] == "all-MiniLM-L6-v2.yaml"
    assert _volumes(r)[mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    # A changed config rolls the pods: the server reads configs at startup.
    changed = render({"modelConfigs": {"all-MiniLM-L6-v2": config + "instance_count: 4\n"}})
    annotation = "checksum/model-configs"
    before = r.deployment["spec"]["template"]["metadata"]["annotations"][annotation]
    assert changed.deployment["spec"]["template"]["metadata"]["annotations"][annotation] != before
    assert render().all("ConfigMap") == []


def test_pod_runs_as_the_images_non_root_user_with_a_read_only_root() -> None:
    r = render()
    assert r.pod_spec["securityContext"]["runAsNonRoot"] is True
    assert r.pod_spec["securityContext"]["runAsUser"] == 10001
    assert r.server["securityContext"]["readOnlyRootFilesystem"] is True
    assert _mounts(r.server)["/tmp"]["name"] in _volumes(r)


def test_pod_disruption_budget_selects_the_server_pods() -> None:
    r = render()
    pdb = r.one("PodDisruptionBudget")
    assert _selected(
        pdb["spec"]["selector"]["matchLabels"], r.deployment["spec"]["template"]["metadata"]["labels"]
    )
    assert pdb["spec"]["maxUnavailable"] == 1
    assert render({"podDisruptionBudget": {"enabled": False}}).all("PodDisruptionBudget") == []


def test_defaults_serve_the_demo_models_from_the_demo_image() -> None:
    r = render()
    assert r.server["image"] == "taskserve:0.1.0-demo"  # the Dockerfile's demo target: models in /models
    # Other sources bring their own models: the server-only image.
    assert render({"modelRepository": {"source": "init"}}).server["image"] == "taskserve:0.1.0"
    pvc = {"modelRepository": {"source": "pvc", "pvc": {"claimName": "models"}}}
    assert render(pvc).server["image"] == "taskserve:0.1.0"
    assert render({"image": {"tag": "custom"}}).server["image"] == "taskserve:custom"


def test_safe_edge_defaults_in_the_pod() -> None:
    args = render().server["args"]
    assert arg_value(args, "--model-control-mode") == "none"
    assert arg_value(args, "--metrics-host") == "0.0.0.0"  # Prometheus scrapes the pod IP
    assert "--tls-cert" not in args and "--auth-tokens-file" not in args


def test_engine_cache_is_a_writable_empty_dir_by_default() -> None:
    r = render()
    env = {e["name"]: e.get("value") for e in r.server["env"]}
    mount = _mounts(r.server)[env["TASKSERVE_ENGINE_CACHE_DIR"]]
    assert "emptyDir" in _volumes(r)[mount["name"]] and not mount.get("readOnly")
    assert r.server["securityContext"]["readOnlyRootFilesystem"] is True  # hence the volume
    off = render({"engineCache": {"enabled": False}})
    assert "TASKSERVE_ENGINE_CACHE_DIR" not in {e["name"] for e in off.server.get("env", [])}


def test_tls_and_token_secrets_are_mounted_and_wired_to_the_flags() -> None:
    values = {"tls": {"enabled": True, "secretName": "tls-secret", "clientAuth": True},
              "auth": {"tokensSecret": {"name": "tokens-secret", "key": "list"}}}  # fmt: skip
    r = render(values)
    args = r.server["args"]
    mounts, volumes = _mounts(r.server), _volumes(r)
    for flag in ("--tls-cert", "--tls-key", "--tls-client-ca"):
        path = Path(arg_value(args, flag))
        secret = volumes[mounts[str(path.parent)]["name"]]["secret"]
        assert secret["secretName"] == "tls-secret" and path.name in ("tls.crt", "tls.key", "ca.crt")
    tokens = Path(arg_value(args, "--auth-tokens-file"))
    secret = volumes[mounts[str(tokens.parent)]["name"]]["secret"]
    assert secret["secretName"] == "tokens-secret" and secret["items"] == [{"key": "list", "path": tokens.name}]
    # The kubelet's gRPC probe cannot speak TLS: it checks the plaintext health-only port.
    health = int(arg_value(args, "--health-port"))
    assert r.server["readinessProbe"]["grpc"]["port"] == health == r.server["startupProbe"]["grpc"]["port"]
    assert port_named(r.server, "health") == health != port_named(r.server, "grpc")
