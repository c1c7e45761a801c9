"""Every taskserve-bench mode, run briefly against tiny models: results files are written and sane."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from taskserve.benchmarks.cli import main
from taskserve.benchmarks.echo_server import start_echo_server
from tests.benchmarks.bench_models import build_bench_repository
from tests.clients.client_fakes import ServerThread as FakeServer
from tests.support.server import ServerThread, running_server

REPO_ROOT = Path(__file__).resolve().parents[2]
# --allow-dirty: tests run on working trees; the refusal itself is tested below.
SHORT = ["--warmup", "0.2", "--window", "0.4", "--max-windows", "2", "--quiet", "--allow-dirty"]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bench_repository(tmp_path_factory.mktemp("bench-repo"))


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with running_server(repo) as srv:
        yield srv


def _result(out: Path, name: str) -> dict[str, object]:
    assert (out / f"{name}.md").is_file()
    assert (out / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / f"{name}.json").read_text())
    assert doc["machine"]["cpu_count"] >= 1
    return doc


def test_closed_loop_v2_text(server: ServerThread, tmp_path: Path) -> None:
    rc = main(["closed", "--target", server.address, "--model", "tiny_text", "--concurrency", "1,3",
               "--out", str(tmp_path), "--name", "c", *SHORT])  # fmt: skip
    assert rc == 0
    doc = _result(tmp_path, "c")
    runs = doc["runs"]
    assert [r["load"] for r in runs] == [1, 3]  # type: ignore[index]
    for r in runs:  # type: ignore[attr-defined]
        assert r["requests"] > 0 and r["errors"] == {}
        assert 0 < r["latency_ms"]["p50"] <= r["latency_ms"]["p99"] <= r["latency_ms"]["max"]
    assert "sentences of" in doc["config"]["payload"]  # type: ignore[index]
    assert "| taskserve | concurrency 3 |" in (tmp_path / "c.md").read_text()


def test_open_loop_v2_image_with_batches(server: ServerThread, tmp_path: Path) -> None:
    rc = main(["open", "--target", server.address, "--model", "tiny_image", "--rate", "30",
               "--batch-size", "2", "--num-requests", "4", "--out", str(tmp_path), "--name", "o", *SHORT])  # fmt: skip
    assert rc == 0
    [run] = _result(tmp_path, "o")["runs"]  # type: ignore[misc]
    assert run["mode"] == "open" and run["items_per_request"] == 2
    assert run["requests"] > 0 and "client_lag_p99_ms" in run


def test_errors_are_counted_by_status(server: ServerThread, tmp_path: Path) -> None:
    # A payload the model refuses: every call fails with INVALID_ARGUMENT, and the run still reports.
    path = tmp_path / "bad.npz"
    np.savez(path, INPUT0=np.zeros((4, 3), np.float32), INPUT1=np.zeros((4, 3), np.float32))
    rc = main(["closed", "--target", server.address, "--model", "simple", "--payload", str(path),
               "--concurrency", "1", "--out", str(tmp_path), "--name", "e", *SHORT])  # fmt: skip
    assert rc == 0
    [run] = json.loads((tmp_path / "e.json").read_text())["runs"]
    assert run["requests"] == 0 and run["errors"]["INVALID_ARGUMENT"] > 0


def test_typed_services(tmp_path: Path) -> None:
    with FakeServer() as fake:
        for task in ("embed", "classify-image"):
            rc = main(["closed", "--target", fake.target, "--model", "echo", "--protocol", "typed", "--task", task,
                       "--batch-size", "2", "--num-requests", "3", "--concurrency", "2",
                       "--out", str(tmp_path), "--name", task, *SHORT])  # fmt: skip
            assert rc == 0
            [run] = _result(tmp_path, task)["runs"]  # type: ignore[misc]
            assert run["requests"] > 0 and run["errors"] == {}
        sent = fake.rec.requests
    embeds = [r for r in sent if hasattr(r, "texts") and not hasattr(r, "top_k")]
    images = [r for r in sent if hasattr(r, "images")]
    assert embeds and all(len(r.texts) == 2 for r in embeds)
    assert images and all(len(r.images) == 2 and r.images[0].raw.width == 224 for r in images)


def test_in_process_ceiling(repo: Path, tmp_path: Path) -> None:
    rc = main(["in-process", "--model-repository", str(repo), "--model", "tiny_text", "--batch-sizes", "1,4",
               "--num-requests", "8", "--out", str(tmp_path), "--name", "ip", *SHORT])  # fmt: skip
    assert rc == 0
    doc = _result(tmp_path, "ip")
    runs = doc["runs"]
    # Both baselines: batches within the length buckets (the server's), then consecutive requests.
    bucketed = "onnxruntime in-process, length-bucketed"
    assert [(r["server"], r["load"], r["items_per_request"]) for r in runs] == [  # type: ignore[index]
        (bucketed, 1, 1), (bucketed, 4, 4), ("onnxruntime in-process", 1, 1), ("onnxruntime in-process", 4, 4),
    ]  # fmt: skip
    best = doc["best"]
    assert best["batch_size"] in (1, 4)  # type: ignore[index]
    top = max(r["items_per_s"] for r in runs if r["server"] == bucketed)  # type: ignore[index]
    assert best["items_per_s"] == pytest.approx(top, rel=1e-4)  # type: ignore[index]


def test_echo_server_returns_the_request_bytes(tmp_path: Path) -> None:
    from taskserve.clients import TaskServeClient

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server, port = asyncio.run_coroutine_threadsafe(start_echo_server(), loop).result(10)
    try:
        with TaskServeClient(f"127.0.0.1:{port}") as client:
            x = np.arange(6, dtype=np.int32).reshape(2, 3)
            out = client.infer("anything", {"x": x, "s": np.array([b"hi"], dtype=np.object_)})
            np.testing.assert_array_equal(out["x"], x)
            assert out["s"].tolist() == [b"hi"]
        path = tmp_path / "in.npz"
        np.savez(path, x=np.ones((8, 4), np.float32))
        rc = main(["closed", "--target", f"127.0.0.1:{port}", "--model", "echo", "--payload", str(path),
                   "--concurrency", "2", "--label", "echo", "--out", str(tmp_path), "--name", "echo",
                   *SHORT])  # fmt: skip
        assert rc == 0
        [run] = _result(tmp_path, "echo")["runs"]  # type: ignore[misc]
        assert run["server"] == "echo" and run["requests"] > 0
    finally:
        asyncio.run_coroutine_threadsafe(server.stop(None), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_export_subcommand_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    fake = types.ModuleType("taskserve.benchmarks.export_bench")
    fake.main = lambda argv: seen.append(argv) or 7  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "taskserve.benchmarks.export_bench", fake)
    assert main(["export", "--model", "x"]) == 7
    assert seen == [["--model", "x"]]


def test_peers_with_taskserve_and_echo(repo: Path, tmp_path: Path) -> None:
    # Two server starts of one sweep each: repeats are numbered across the starts.
    rc = main(["peers", "--model-repository", str(repo), "--model", "simple", "--servers", "taskserve,echo",
               "--concurrency", "2", "--repeats", "1", "--server-starts", "2", "--out", str(tmp_path), "--name", "p",
               *SHORT])  # fmt: skip
    assert rc == 0
    doc = _result(tmp_path, "p")
    order = [(r["server"], r["repeat"]) for r in doc["runs"]]  # type: ignore[index]
    assert order == [("taskserve", 0), ("echo", 0), ("taskserve", 1), ("echo", 1)]
    assert all(r["requests"] > 0 and r["errors"] == {} for r in doc["runs"])  # type: ignore[index]
    config = doc["config"]
    assert set(config["servers"]) == {"taskserve", "echo"}  # type: ignore[index]
    assert config["server_starts"] == 2  # type: ignore[index]
    logs = Path(config["server_logs"])  # type: ignore[index]
    # Each start has its own server logs: two processes of each server ran.
    assert sorted(p.name for p in logs.iterdir()) == ["start-0", "start-1"]
    assert all(any((logs / d).iterdir()) for d in ("start-0", "start-1"))


@pytest.mark.peers
def test_peers_kserve_and_mlserver_default_and_tuned(repo: Path, tmp_path: Path) -> None:
    # Opt-in (make test-peers, which CI runs): needs the peer environments `make peers` builds.
    rc = main(["peers", "--model-repository", str(repo), "--model", "tiny_text",
               "--servers", "kserve,kserve-tuned,mlserver,mlserver-tuned",
               "--fixed-length", "--concurrency", "2", "--repeats", "1", "--out", str(tmp_path), "--name", "pk",
               *SHORT])  # fmt: skip
    assert rc == 0
    doc = _result(tmp_path, "pk")
    assert {r["server"] for r in doc["runs"]} == {"kserve", "kserve-tuned", "mlserver", "mlserver-tuned"}  # type: ignore[index]
    assert all(r["requests"] > 0 and r["errors"] == {} for r in doc["runs"])  # type: ignore[index]
    notes = doc["notes"]
    assert any(n.startswith("mlserver-tuned: adaptive batching max_batch_size 16") for n in notes)  # type: ignore[attr-defined]
    assert any(n.startswith("mlserver: adaptive batching off") for n in notes)  # type: ignore[attr-defined]
    assert any(n.startswith("kserve-tuned:") and "session(s) of 1 intra-op" in n for n in notes)  # type: ignore[attr-defined]


def test_unknown_peer_is_refused(repo: Path) -> None:
    with pytest.raises(SystemExit, match="unknown servers"):
        main(["peers", "--model-repository", str(repo), "--model", "simple", "--servers", "triton", "--allow-dirty"])


def test_results_refuse_a_dirty_tree_unless_allowed_and_then_say_so(
    repo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from taskserve.benchmarks import machine

    monkeypatch.setattr(machine, "tree_state", lambda: ("0123456789abcdef", True))
    args = ["in-process", "--model-repository", str(repo), "--model", "tiny_text", "--batch-sizes", "1",
            "--num-requests", "4", "--out", str(tmp_path), "--name", "dirty", *SHORT[:-1]]  # fmt: skip
    assert main(args) == 2
    assert "differs from commit 0123456789ab" in capsys.readouterr().err
    assert not (tmp_path / "dirty.json").exists()
    assert main([*args, "--allow-dirty"]) == 0
    doc = _result(tmp_path, "dirty")
    assert doc["machine"]["git_commit"] == "0123456789abcdef" and doc["machine"]["git_dirty"] is True  # type: ignore[index]
    assert "(DIRTY: measured with uncommitted changes, --allow-dirty)" in (tmp_path / "dirty.md").read_text()
