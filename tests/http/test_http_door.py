"""The HTTP door itself: served beside gRPC in the same process and loop, on a free port
bound to --host, off unless asked for, with OpenAI's error body on /v1."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx

from tests.support.server import running_server


def test_http_door_is_off_unless_asked_for(tiny_repository: Path) -> None:
    with running_server(tiny_repository) as server:
        assert server.app is not None and server.app.http_port == 0


def test_http_door_serves_beside_grpc_on_the_same_loop(tiny_repository: Path) -> None:
    threads_before = {t.ident for t in threading.enumerate()}
    with running_server(tiny_repository, http_port=0) as server:
        app = server.app
        assert app is not None and app.http_port > 0 and app.http_port != app.grpc_port
        # No loop or thread of its own: uvicorn runs as a task on the serving loop.
        assert "http-door" in server.run(_task_names())
        assert not [t for t in threading.enumerate() if t.ident not in threads_before and "uvicorn" in t.name]
        base = f"http://127.0.0.1:{app.http_port}"
        models = httpx.get(f"{base}/v1/models", timeout=10)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["simple"]
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200
        missing = httpx.get(f"{base}/v1/nothing-here", timeout=10)
        assert missing.status_code == 404
        assert missing.json()["error"]["type"] == "not_found_error"
    # Stopped with the server: the port refuses connections.
    try:
        httpx.get(f"{base}/health", timeout=2)
    except httpx.ConnectError:
        pass
    else:
        raise AssertionError("the HTTP door still answers after the server stopped")


async def _task_names() -> set[str]:
    return {task.get_name() for task in asyncio.all_tasks()}


def test_an_http_port_in_use_stops_the_server_with_a_message(tiny_repository: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, ORT_DISABLE_TELEMETRY="1")
        done = subprocess.run(
            [sys.executable, "-m", "taskserve.server.main", "--model-repository", str(tiny_repository),
             "--grpc-port", "0", "--metrics-port", "-1", "--http-port", str(port)],
            capture_output=True, text=True, timeout=120, env=env,
        )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert f"could not bind the HTTP port 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr
