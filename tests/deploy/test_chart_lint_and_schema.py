"""The chart lints clean and every rendered object validates strictly against the
Kubernetes API schemas, from the oldest version the chart supports to the newest."""

from __future__ import annotations

import re
from typing import Any

import helm_python
import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml
from kubernetes_validate.utils import latest_version  # type: ignore[import-untyped]

from tests.deploy.chart import ALL_FEATURES, CHART_DIR, Manifest, render

# Custom resources have no schema in kubernetes-validate; their shape is tested elsewhere.
CUSTOM_KINDS = {"ServiceMonitor"}


def _min_kube_version() -> str:
    constraint = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())["kubeVersion"]
    match = re.fullmatch(r">=\s*(\d+\.\d+)\.\d+(-0)?", constraint)
    assert match, f"unexpected kubeVersion constraint {constraint!r}"
    return match[1]


KUBE_VERSIONS = [_min_kube_version(), latest_version()]


def _validate_all(manifests: list[Manifest], version: str) -> None:
    for m in manifests:
        if m["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            pytest.fail(f"{m['kind']}/{m['metadata']['name']} invalid for {version}: {path}: {e.message}")


@pytest.mark.parametrize("values", [None, ALL_FEATURES], ids=["defaults", "all-features"])
def test_lint_reports_no_warnings_or_errors(values: dict[str, Any] | None) -> None:
    report = helm_python.lint(CHART_DIR, values, strict=True)
    assert report["errors"] == []
    # Severity 1 is informational ("icon is recommended"); 2 and up are warnings and errors.
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_default_render_validates_strictly(version: str) -> None:
    rendered = render()
    kinds = sorted(m["kind"] for m in rendered.manifests)
    assert kinds == ["Deployment", "PodDisruptionBudget", "Service", "Service"]
    _validate_all(rendered.manifests, version)


@pytest.mark.parametrize("version", KUBE_VERSIONS)
@pytest.mark.parametrize(
    "values",
    [ALL_FEATURES, {"modelRepository": {"source": "pvc", "pvc": {"claimName": "models", "subPath": "repo"}}}],
    ids=["all-features", "pvc"],
)
def test_optional_parts_validate_strictly(values: dict[str, Any], version: str) -> None:
    _validate_all(render(values).manifests, version)


def test_strict_validation_catches_a_broken_manifest() -> None:
    """Guards the tests above: the validator really rejects unknown fields."""
    deployment = render().deployment
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, latest_version(), strict=True)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"modelRepository": {"source": "s3"}}, "use image, pvc or init"),
        ({"modelRepository": {"source": "pvc"}}, "set modelRepository.pvc.claimName"),
        ({"terminationGracePeriodSeconds": 30}, "must exceed preStopSleepSeconds + server.drainDelay + server.sh"),
        ({"gpu": {"enabled": True, "count": 0}}, "request at least 1 GPU, or set gpu.enabled=false"),
        ({"tls": {"enabled": True}}, "set tls.secretName"),
        ({"server": {"modelControlMode": "poll"}}, "use none or explicit"),
    ],
)
def test_bad_values_fail_with_a_message_that_says_what_to_fix(values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm_python.HelmRenderError, match=re.escape(message)):
        render(values)
