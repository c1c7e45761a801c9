"""The blocking client is generated from the asyncio one (tools/generate_sync_client.py):
the committed ``clients/_sync/`` must be exactly what the generator makes of ``clients/_async/``
today, and the rewrite rules do what the blocking client needs."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import grpc
import grpc.aio
import pytest

from taskserve.clients import AsyncTaskServeClient, TaskServeClient

TOOL = Path(__file__).resolve().parents[2] / "tools" / "generate_sync_client.py"


@pytest.fixture(scope="module")
def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("generate_sync_client", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def generated(generator: ModuleType) -> dict[str, str]:
    modules: dict[str, str] = generator.generate()
    return modules


def test_the_committed_blocking_client_is_what_the_generator_makes(
    generator: ModuleType, generated: dict[str, str]
) -> None:
    assert generator.differences(generated) == [], "run `make clients` and commit src/taskserve/clients/_sync/"
    # It compared every module of the asyncio source, not an empty set.
    assert {"client.py", "calls.py", "text.py", "vision.py", "image_generation.py"} <= set(generated)


def test_the_check_names_an_edited_a_missing_and_a_stray_module(
    generator: ModuleType, generated: dict[str, str], tmp_path: Path
) -> None:
    committed = tmp_path / "_sync"
    shutil.copytree(generator.OUTPUT_ROOT, committed, ignore=shutil.ignore_patterns("__pycache__"))
    assert generator.differences(generated, committed) == []
    client = committed / "client.py"
    client.write_text(client.read_text().replace("def server_live(", "def server_alive("))
    (committed / "vision.py").unlink()
    (committed / "extra.py").write_text("")
    assert generator.differences(generated, committed) == [
        "only in committed: extra.py",
        "missing from committed: vision.py",
        "differs: client.py",
    ]


def test_the_rewrite_rules(generator: ModuleType) -> None:
    source = '''import asyncio
import time

import grpc
import grpc.aio


class AsyncThing:
    """The asyncio client; create it inside the event loop that uses it.

    >>> async with AsyncThing() as thing:
    ...     await thing.go(grpc.aio.insecure_channel("x"))
    """

    async def go(self, channel: grpc.aio.Channel) -> AsyncIterator[int]:
        await asyncio.sleep(0.1)
        async with channel:
            async for item in self._items():  # AsyncThing's items
                yield (await item).value

    async def __aenter__(self) -> AsyncThing:
        await self.stream.aclose()
        return self

    async def keep(self, x: int) -> int:
        return f(await g(x)) + (await g(x) + 1) + (await h[x].j(x)(1)[0]) + len((await g(x)))
'''
    assert generator.rewrite(source) == '''import time

import grpc


class Thing:
    """The blocking client. Thread-safe: one instance (one channel) per process is enough.

    >>> with Thing() as thing:
    ...     thing.go(grpc.insecure_channel("x"))
    """

    def go(self, channel: grpc.Channel) -> Iterator[int]:
        time.sleep(0.1)
        with channel:
            for item in self._items():  # Thing's items
                yield item.value

    def __enter__(self) -> Thing:
        self.stream.close()
        return self

    def keep(self, x: int) -> int:
        return f(g(x)) + (g(x) + 1) + h[x].j(x)(1)[0] + len(g(x))
'''


def test_asyncio_with_no_blocking_rewrite_is_refused(generator: ModuleType) -> None:
    with pytest.raises(generator.RewriteError, match=r"asyncio\.gather has no blocking rewrite"):
        generator.rewrite("import asyncio\n\n\nasync def f() -> None:\n    await asyncio.gather()\n")
    with pytest.raises(generator.RewriteError, match="still speaks asyncio"):
        generator._check_leftovers(generator.rewrite('"""Only for asyncio users."""\n'), "m.py")


async def test_both_clients_check_stream_arguments_at_the_call_not_at_the_first_item() -> None:
    """A plain method returning the stream (not a generator method): a bad argument fails
    where the call is written, in both clients, before any RPC."""
    sync_client = TaskServeClient("unused", channel=grpc.insecure_channel("127.0.0.1:9"))
    async_client = AsyncTaskServeClient("unused", channel=grpc.aio.insecure_channel("127.0.0.1:9"))
    try:
        for client in (sync_client, async_client):
            with pytest.raises(ValueError, match="scheduler 'bogus'"):
                client.image_generation.text_to_image_stream("a cat", model="sd", scheduler="bogus")
    finally:
        sync_client.close()
        await async_client.close()
