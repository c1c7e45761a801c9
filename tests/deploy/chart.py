"""Render the Helm chart offline (Helm's Go SDK through helm-python-sdk) into manifests."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import helm_python
import yaml

CHART_DIR = Path(__file__).resolve().parents[2] / "helm" / "taskserve"
RELEASE = "taskserve"
NAMESPACE = "ml"

Manifest = dict[str, Any]


@dataclass(frozen=True)
class Rendered:
    manifests: list[Manifest]
    notes: str

    def all(self, kind: str) -> list[Manifest]:
        return [m for m in self.manifests if m["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> Manifest:
        found = [m for m in self.all(kind) if name is None or m["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, rendered {len(found)}"
        return found[0]

    @property
    def deployment(self) -> Manifest:
        return self.one("Deployment")

    @property
    def pod_spec(self) -> Manifest:
        spec: Manifest = self.deployment["spec"]["template"]["spec"]
        return spec

    @property
    def server(self) -> Manifest:
        containers = {c["name"]: c for c in self.pod_spec["containers"]}
        return containers["server"]  # type: ignore[no-any-return]


def render(
    values: dict[str, Any] | None = None, release: str = RELEASE, namespace: str = NAMESPACE
) -> Rendered:
    with helm_python.Chart.load(CHART_DIR) as chart:
        files = chart.render(values or {}, name=release, namespace=namespace)
    manifests: list[Manifest] = []
    notes = ""
    for path, text in sorted(files.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        manifests += [doc for doc in yaml.safe_load_all(text) if doc]
    return Rendered(manifests, notes)


def arg_value(args: list[str], flag: str) -> str:
    """The value after ``flag`` in a container's args."""
    assert flag in args, f"{flag} not in {args}"
    return args[args.index(flag) + 1]


def port_named(container: Manifest, name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    return int(ports[name])


# Values that turn on every optional part of the chart at once.
ALL_FEATURES: dict[str, Any] = {
    "gpu": {
        "enabled": True,
        "nodeSelector": {"nvidia.com/gpu.present": "true"},
        "runtimeClassName": "nvidia",
    },
    "autoscaling": {"enabled": True},
    "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prometheus"}}},
    "modelRepository": {"source": "init"},
    "modelConfigs": {"all-MiniLM-L6-v2": "task: sentence-embedding\nmax_batch_size: 64\ninstance_count: 2\n"},
    "server": {
        "strictReadiness": True,
        "extraArgs": ["--no-reflection"],
        "modelControlMode": "explicit",
        "streamWriteTimeout": 12.5,
        "maxStreamsPerConnection": 100,
    },
    "tls": {"enabled": True, "secretName": "taskserve-tls", "clientAuth": True},
    "auth": {"tokensSecret": {"name": "taskserve-tokens"}},
    "http": {"enabled": True, "readinessProbe": True},
    "imagePullSecrets": [{"name": "regcred"}],
    "serviceAccount": {"name": "taskserve"},
    "priorityClassName": "high",
}
