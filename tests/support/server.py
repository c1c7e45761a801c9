"""Run a real taskserve server for tests: in a background thread with its own
event loop (for in-process tests), or as a ``taskserve-server`` subprocess."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from taskserve.server.frontends.grpc.server import ServingApp, create_server
from taskserve.server.settings import ServerSettings


class ServerThread:
    """A ServingApp on 127.0.0.1, free ports, its event loop on a daemon thread."""

    def __init__(self, repository: Path, **settings: Any) -> None:
        self.settings = ServerSettings(
            model_repository=repository, host="127.0.0.1", grpc_port=0, metrics_port=0, **settings
        )
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.app: ServingApp | None = None

    def run(self, coro: Any, timeout: float = 300) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> ServingApp:
        self.thread.start()

        async def boot() -> ServingApp:
            app = create_server(self.settings)
            await app.start()
            await app.wait_until_loaded()
            return app

        self.app = self.run(boot())
        return self.app

    @property
    def address(self) -> str:
        assert self.app is not None
        return f"127.0.0.1:{self.app.grpc_port}"

    def stop(self) -> None:
        if self.app is not None:
            self.run(self.app.stop(grace=5, drain_delay=0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@contextmanager
def running_server(repository: Path, **settings: Any) -> Iterator[ServerThread]:
    server = ServerThread(repository, **settings)
    try:
        server.start()
        yield server
    finally:
        server.stop()


class ServerProcess:
    """``taskserve-server`` as a child process on free ports; ``stop`` sends SIGTERM."""

    def __init__(self, repository: Path, *extra: str) -> None:
        env = dict(os.environ, ORT_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "taskserve.server.main", "--model-repository", str(repository),
             "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--drain-delay", "0", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
        )  # fmt: skip
        self.output: list[str] = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = re.search(r"listening grpc=(\d+) metrics=(-?\d+)", line)
            if match:
                self.grpc_port, self.metrics_port = int(match[1]), int(match[2])
                break
        else:
            raise RuntimeError("server exited before listening:\n" + "".join(self.output))
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def terminate(self) -> None:
        self.proc.terminate()

    def wait(self, timeout: float = 60) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(5)
        return rc

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
