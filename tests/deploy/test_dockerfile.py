"""The Dockerfile (no docker engine here, so read, not built) matches the chart and the
package: targets, entrypoint, ports, user, pinned torch, and a build context from which
the package builds with every subpackage and console script."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

from tests.deploy.chart import render

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", DOCKERFILE)
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in _instructions():
        if word == "FROM":
            current = [(word, rest)]
            stages[rest.split()[-1]] = current
        elif word != "ARG" or stages:
            current.append((word, rest))
    return stages


def _last(stage: list[tuple[str, str]], word: str) -> str:
    return [rest for w, rest in stage if w == word][-1]


def test_targets_and_the_default_is_the_server() -> None:
    stages = _stages()
    assert {"server", "demo", "exporter"} <= set(stages)
    assert list(stages)[-1] == "server"  # a plain `docker build` builds the last stage
    assert _stages()["base"][0][1] == "${BASE_IMAGE} AS base"
    assert re.search(r"^ARG BASE_IMAGE=python:3\.11-slim$", DOCKERFILE, re.MULTILINE)
    assert re.search(r"^ARG EXTRAS=server$", DOCKERFILE, re.MULTILINE)


def test_runtime_matches_the_chart_entrypoint_ports_and_user() -> None:
    runtime = _stages()["runtime"]
    assert _last(runtime, "ENTRYPOINT") == '["taskserve-server"]'
    # The server binds loopback by default: the image listens on the container's interfaces.
    cmd = '["--model-repository", "/models", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]'
    assert _last(runtime, "CMD") == cmd
    pod = render()
    assert {int(p) for p in _last(runtime, "EXPOSE").split()} == {
        p["containerPort"] for p in pod.server["ports"]
    }
    uid, gid = _last(runtime, "USER").split(":")
    context = pod.pod_spec["securityContext"]
    assert (int(uid), int(gid)) == (context["runAsUser"], context["runAsGroup"]) and int(uid) != 0
    # The demo target inherits the runtime and adds only the exported repository.
    demo = _stages()["demo"]
    assert demo[0][1] == "runtime AS demo"
    assert [w for w, _ in demo] == ["FROM", "COPY"] and _last(demo, "COPY").endswith(" /models")


def test_exporter_pins_the_same_cpu_torch_as_the_package() -> None:
    (pin,) = [r for r in PYPROJECT["project"]["optional-dependencies"]["export"] if r.startswith("torch")]
    assert re.fullmatch(r"torch==[\d.]+", pin), "an unpinned torch pulls a CUDA build"
    run = " ".join(rest for w, rest in _stages()["exporter"] if w == "RUN")
    assert f"pip install --no-cache-dir {pin} --index-url https://download.pytorch.org/whl/cpu" in run
    # torch goes in before the demo extra, so the resolver finds it satisfied.
    assert run.index(pin) < run.index("[demo]")


def _ignored(rel: str, rules: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; '!' lets a path back in."""
    ignored = False
    for rule in rules:
        negate, pattern = rule.startswith("!"), rule.lstrip("!").rstrip("/")
        if pattern.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, pattern[3:]) for part in rel.split("/"))
        else:
            hit = fnmatch.fnmatch(rel, pattern) or rel.startswith(pattern + "/")
        if hit:
            ignored = not negate
    return ignored


def _context_paths() -> list[Path]:
    """Files the .dockerignore lets into the build context."""
    rules = [r.strip() for r in (ROOT / ".dockerignore").read_text().splitlines()]
    rules = [r for r in rules if r and not r.startswith("#")]
    assert rules[0] == "*", "the context is an allow-list"
    kept = []
    # Our rules re-include whole top-level entries only, so an ignored folder (.venv) is not walked.
    for top in ROOT.iterdir():
        if _ignored(top.name, rules):
            continue
        for path in [top] if top.is_file() else sorted(top.rglob("*")):
            rel = path.relative_to(ROOT)
            if path.is_file() and not _ignored(rel.as_posix(), rules):
                kept.append(rel)
    return kept


def test_every_package_folder_is_in_the_context_and_copied() -> None:
    folders = set(PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"])
    copied = {rest.split()[0] for w, rest in _stages()["venv"] if w == "COPY"}
    assert folders <= copied
    top = {p.parts[0] for p in _context_paths()}
    assert top == folders | {"pyproject.toml", "README.md"}


def test_the_build_context_builds_a_wheel_with_every_package(tmp_path: Path) -> None:
    """What `pip install .[server]` does in the image, minus the downloads."""
    context = tmp_path / "context"
    for rel in _context_paths():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(context)],
        check=True, capture_output=True,
    )  # fmt: skip
    (wheel,) = (tmp_path / "dist").glob("taskserve-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    (src,) = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["where"]
    packages = [p.relative_to(ROOT / src).as_posix() for p in (ROOT / src).rglob("__init__.py")]
    assert "taskserve/server/__init__.py" in packages
    for package in packages:
        assert package in names, package
    entry_points = (
        zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith(".dist-info/entry_points.txt")))
        .decode()
    )
    for script in ("taskserve-server", "taskserve-export"):
        assert f"{script} = " in entry_points
