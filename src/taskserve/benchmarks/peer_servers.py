"""Start the servers a peer comparison loads, each as a child process on 127.0.0.1.

taskserve and the echo floor run from this environment; KServe and MLServer from
their own virtualenvs made by benchmarks/peers/setup.sh. Every server gets the
same ONNX file and the same onnxruntime thread settings.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml

from taskserve.clients import ClientOptions, TaskServeClient, TaskServeError
from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc

REPO_ROOT = Path(__file__).resolve().parents[3]
PEERS_DIR = REPO_ROOT / "benchmarks" / "peers"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class ModelUnderTest:
    name: str
    model_dir: Path
    onnx_file: Path
    intra_op_threads: int
    inter_op_threads: int
    # For MLServer's adaptive batching; 0 turns it off.
    max_batch_size: int
    max_batch_delay_us: int


@dataclass
class PeerProcess:
    """One running server; ``stop`` sends SIGTERM, then SIGKILL after a grace period."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path
    workdir: Path | None = None
    version: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def wait_ready(self, model: str, timeout: float) -> None:
        """Until ``model`` is ready; fails at once, with the server's reason, when the
        process exits or the server's repository index says the model failed to load."""
        deadline = time.monotonic() + timeout
        # No health watch: the server is usually not listening yet, so the client could not
        # tell whether it serves grpc.health.v1, and gRPC logs an ERROR where it does not.
        options = ClientOptions(retry=None, timeout_s=5, health_check=False)
        with TaskServeClient(self.address, options) as client:
            index = pb_grpc.GRPCInferenceServiceStub(client.channel).RepositoryIndex
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(
                        f"{self.name} exited with {self.proc.returncode}; log: {self.log_path}\n{self.log_tail()}"
                    )
                try:
                    if client.model_ready(model, timeout=2):
                        return
                except TaskServeError:
                    pass
                try:
                    reason = load_failure(index(pb.RepositoryIndexRequest(), timeout=2).models, model)
                except grpc.RpcError:
                    reason = None  # not listening yet, or a peer without RepositoryIndex
                if reason is not None:
                    raise RuntimeError(
                        f"{self.name} failed to load {model}: {reason}; log: {self.log_path}\n{self.log_tail()}"
                    )
                time.sleep(0.25)
        raise TimeoutError(f"{self.name} not ready after {timeout}s; log: {self.log_path}\n{self.log_tail()}")

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> None:
        if self.proc.poll() is None:
            # Own process group: MLServer's worker processes go with it.
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)


def load_failure(index: Iterable[pb.RepositoryIndexResponse.ModelIndex], model: str) -> str | None:
    """The reason ``model`` failed to load, from a v2 repository index, or None while it may
    still become ready. A failure is UNAVAILABLE with a reason; "unloaded" (nothing tried
    yet, as a server lists its models before loading them) is not one."""
    for entry in index:
        if entry.name == model and entry.state == "UNAVAILABLE" and entry.reason not in ("", "unloaded"):
            return entry.reason
    return None


def _spawn(name: str, argv: list[str], port: int, log_dir: Path, workdir: Path | None = None) -> PeerProcess:
    log_path = log_dir / f"{name}.log"
    env = dict(os.environ, ORT_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    return PeerProcess(name, port, proc, log_path, workdir)


def _venv_version(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    try:
        out = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return "?"
    return out.stdout.strip()


def link_tree(src: Path, dst: Path) -> None:
    """``src`` (a file or folder) at ``dst`` as hard links, copied where links cannot cross
    filesystems. Not symlinks: the server refuses model files that resolve outside the
    repository (docs/security.md)."""

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    if src.is_dir():
        shutil.copytree(src.resolve(), dst, copy_function=link_or_copy)
    else:
        link_or_copy(str(src.resolve()), str(dst))


def spawn_taskserve(
    repo: Path, log_dir: Path, workdir: Path | None = None, name: str = "taskserve", extra_args: Sequence[str] = ()
) -> PeerProcess:
    """``taskserve-server`` on ``repo`` from this environment; ``workdir`` is removed on stop."""
    port = free_port()
    argv = [sys.executable, "-m", "taskserve.server.main", "--model-repository", str(repo), "--host", "127.0.0.1",
            "--grpc-port", str(port), "--metrics-port", "-1", "--no-reflection", "--drain-delay", "0",
            *extra_args]  # fmt: skip
    peer = _spawn(name, argv, port, log_dir, workdir=workdir)
    peer.version = _venv_version(Path(sys.executable), "taskserve")
    return peer


def merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def write_entry_variant(model_dir: Path, entry: Path, overrides: Mapping[str, Any]) -> Path:
    """``entry``: ``model_dir``'s files (linked) under a config.yaml with ``overrides`` applied."""
    entry.mkdir(parents=True)
    for item in model_dir.iterdir():
        if item.name != "config.yaml":
            link_tree(item, entry / item.name)
    config: dict[str, Any] = yaml.safe_load((model_dir / "config.yaml").read_text()) or {}
    (entry / "config.yaml").write_text(yaml.safe_dump(merged(config, overrides), sort_keys=False))
    return entry


def start_taskserve(
    model: ModelUnderTest, log_dir: Path, name: str = "taskserve", overrides: Mapping[str, Any] | None = None
) -> PeerProcess:
    """taskserve on a repository holding only this model (so it loads nothing else);
    ``overrides`` change its config.yaml (a variant such as ``inline_compute_us: 0``)."""
    repo = Path(tempfile.mkdtemp(prefix="taskserve-peer-repo-"))
    if overrides:
        write_entry_variant(model.model_dir, repo / model.name, overrides)
    else:
        link_tree(model.model_dir, repo / model.name)
    return spawn_taskserve(repo, log_dir, workdir=repo, name=name)


def start_echo(log_dir: Path) -> PeerProcess:
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "taskserve.benchmarks.echo_server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    peer = _spawn("echo", argv, port, log_dir)
    peer.version = "grpcio " + _venv_version(Path(sys.executable), "grpcio")
    return peer


def start_kserve(
    model: ModelUnderTest, venv: Path, log_dir: Path, name: str = "kserve", sessions: int = 1, threads: int = 0
) -> PeerProcess:
    """KServe serving ``sessions`` onnxruntime sessions (replicas of the model in its one
    process; KServe's gRPC server has no multi-process workers) of ``threads`` intra-op
    threads each (0: the model's peer setting)."""
    python = venv.resolve() / "bin" / "python"
    if not python.exists():
        raise FileNotFoundError(f"{python} missing: run `make peers` (benchmarks/peers/setup.sh)")
    port = free_port()
    threads = threads or model.intra_op_threads
    argv = [str(python), str(PEERS_DIR / "kserve_server.py"), "--model-file", str(model.onnx_file),
            "--model-name", model.name, "--grpc-port", str(port), "--http-port", str(free_port()),
            "--intra-op-threads", str(threads), "--inter-op-threads", str(model.inter_op_threads),
            "--sessions", str(sessions)]  # fmt: skip
    peer = _spawn(name, argv, port, log_dir)
    peer.version = _venv_version(python, "kserve")
    peer.notes.append(
        f"{name}: no dynamic batching in KServe's model server; {sessions} onnxruntime session(s) of {threads} "
        "intra-op thread(s), each request runs on a worker thread"
    )
    return peer


def mlserver_settings(model: ModelUnderTest, workdir: Path, port: int, workers: int, batching: bool) -> None:
    """settings.json + <model>/model-settings.json + the custom runtime module, in ``workdir``."""
    (workdir / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "grpc_port": port, "http_port": free_port(), "metrics_port": free_port(),
        "parallel_workers": workers, "debug": False,
    }, indent=2))  # fmt: skip
    model_folder = workdir / model.name
    model_folder.mkdir()
    shutil.copy(PEERS_DIR / "mlserver_runtime.py", model_folder / "mlserver_runtime.py")
    settings: dict[str, object] = {
        "name": model.name,
        "implementation": "mlserver_runtime.OnnxRuntimeModel",
        "parameters": {
            "uri": str(model.onnx_file),
            "extra": {"intra_op_threads": model.intra_op_threads, "inter_op_threads": model.inter_op_threads},
        },
    }
    if batching and model.max_batch_size > 1:
        settings["max_batch_size"] = model.max_batch_size
        settings["max_batch_time"] = max(model.max_batch_delay_us, 1) / 1e6  # seconds
    (model_folder / "model-settings.json").write_text(json.dumps(settings, indent=2))


def start_mlserver(
    model: ModelUnderTest, venv: Path, log_dir: Path, workers: int, batching: bool, name: str = "mlserver"
) -> PeerProcess:
    venv = venv.resolve()
    binary = venv / "bin" / "mlserver"
    if not binary.exists():
        raise FileNotFoundError(f"{binary} missing: run `make peers` (benchmarks/peers/setup.sh)")
    workdir = Path(tempfile.mkdtemp(prefix="mlserver-peer-"))
    port = free_port()
    mlserver_settings(model, workdir, port, workers, batching)
    peer = _spawn(name, [str(binary), "start", str(workdir)], port, log_dir, workdir=workdir)
    peer.version = _venv_version(venv / "bin" / "python", "mlserver")
    threads = f"{model.intra_op_threads} intra-op thread(s) per worker's session"
    if batching and model.max_batch_size > 1:
        peer.notes.append(
            f"{name}: adaptive batching max_batch_size {model.max_batch_size}, "
            f"max_batch_time {max(model.max_batch_delay_us, 1)} us; parallel_workers {workers}; {threads}"
        )
    else:
        peer.notes.append(f"{name}: adaptive batching off; parallel_workers {workers}; {threads}")
    return peer
