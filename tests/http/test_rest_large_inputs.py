"""Large v2 REST inputs get what the gRPC door gives them: a BYTES input over the element cap
is refused before any element is decoded, and a large body is parsed and checked on the worker
pool, so other callers are served meanwhile."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from onnx import TensorProto

from taskserve.server.frontends.http import v2_codec
from tests.support.server import ServerThread, running_server
from tests.support.tiny_models import identity_graph, write_entry

BIG_ELEMENTS = 1_500_000
MODEL_CAP = 1_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("rest-bytes-repo")
    graph = identity_graph(TensorProto.STRING, ["batch", "n"])
    write_entry(repo, "bytes", graph, {"max_batch_size": 8})
    write_entry(repo, "bytes-capped", graph, {"max_batch_size": 8, "limits": {"max_bytes_elements": MODEL_CAP}})
    # The server's cap above BIG_ELEMENTS: the big body is decoded in full (then refused by
    # max_variable_dim), the slow path whose place is under test.
    with running_server(repo, http_port=0, max_bytes_elements=BIG_ELEMENTS + 1) as s:
        yield s


def _body(elements: int) -> bytes:
    tensor = {"name": "INPUT0", "datatype": "BYTES", "shape": [1, elements], "data": [""] * elements}
    return json.dumps({"inputs": [tensor]}).encode()


def _url(server: ServerThread, path: str) -> str:
    assert server.app is not None
    return f"http://127.0.0.1:{server.app.http_port}{path}"


def test_bytes_over_the_element_cap_are_refused_naming_it(server: ServerThread) -> None:
    reply = httpx.post(_url(server, "/v2/models/bytes-capped/infer"), content=_body(MODEL_CAP + 1), timeout=60)
    assert reply.status_code == 400
    assert "max_bytes_elements" in reply.json()["error"]
    ok = httpx.post(_url(server, "/v2/models/bytes-capped/infer"), content=_body(MODEL_CAP), timeout=60)
    assert ok.status_code == 200, ok.text


def test_a_big_body_does_not_hold_other_callers(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> None:
    started, finished = threading.Event(), threading.Event()
    decode = v2_codec.decode_request

    def watched(*args: Any) -> Any:
        started.set()
        try:
            return decode(*args)
        finally:
            finished.set()

    monkeypatch.setattr(v2_codec, "decode_request", watched)
    body = _body(BIG_ELEMENTS)
    with httpx.Client(timeout=300) as slow, httpx.Client(timeout=120) as other, ThreadPoolExecutor(1) as pool:
        assert other.get(_url(server, "/v2/health/live")).status_code == 200  # connected before
        pending = pool.submit(slow.post, _url(server, "/v2/models/bytes/infer"), content=body)
        assert started.wait(120), "the big request never reached decoding"
        # Served while the big body is still being decoded: the event loop is free.
        assert other.get(_url(server, "/v2/health/live")).status_code == 200
        assert not finished.is_set(), "the health check waited for the big decode: it ran on the event loop"
        reply = pending.result(300)
    # Decoded in full, then refused by the variable-dim limit: a 400, not a hang.
    assert reply.status_code == 400, reply.text
    assert finished.is_set()
