"""Before authentication nothing is expensive: a call without a valid token is refused on its
metadata, its body never read nor parsed, whatever the service and its shape; and the token
(or any header's bytes) never reaches a log."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import (
    common_pb2,
    image_generation_pb2,
    image_generation_pb2_grpc,
    sentence_embedding_pb2,
    sentence_embedding_pb2_grpc,
    text_generation_pb2,
    text_generation_pb2_grpc,
)
from tests.security.conftest import TOKENS
from tests.support.raw_h2 import raw_grpc_call
from tests.support.server import ServerProcess, running_server

BODY_MB = 48
MB = 1024 * 1024
# Eight concurrent bodies of BODY_MB each (384 MB): read and parsed, they raise the peak by
# more than all of them together (about 1 GB before the fix). Refused on the metadata, the server
# holds only what the connection's flow-control window lets in before the refusal (grpc's BDP
# probing grows it to tens of MB), dropped with the streams; glibc keeps some of it mapped, at a
# plateau. The bound is half of what was sent: a server that reads the bodies cannot meet it.
PEAK_BOUND_MB = 4 * BODY_MB
KEPT_BOUND_MB = 4 * BODY_MB


@pytest.fixture(scope="module")
def token_server(small_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    server = ServerProcess(small_repository, "--auth-tokens-file", str(tokens), "--metrics-port", "-1")
    try:
        yield server
    finally:
        server.terminate()
        try:
            server.wait(30)
        finally:
            server.kill()


def _status_kb(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def _reset_peak(pid: int) -> bool:
    """Reset the process's peak RSS (VmHWM) to its current RSS; False where the kernel refuses."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def _big_calls(channel: grpc.Channel) -> list[Callable[[], object]]:
    """One unauthenticated call of each shape, each carrying a BODY_MB body."""
    blob = b"\x01" * (BODY_MB * MB)
    text = "a" * (BODY_MB * MB)
    v2 = pb_grpc.GRPCInferenceServiceStub(channel)
    infer = pb.ModelInferRequest(model_name="simple", raw_input_contents=[blob])
    infer.inputs.add(name="INPUT0", datatype="FP32", shape=[len(blob) // 16, 4])
    embed = sentence_embedding_pb2_grpc.SentenceEmbeddingStub(channel)
    generate = text_generation_pb2_grpc.TextGenerationStub(channel)
    images = image_generation_pb2_grpc.ImageGenerationStub(channel)
    image_request = image_generation_pb2.ImageToImageRequest(
        model=common_pb2.ModelRef(name="simple"), image=common_pb2.Image(encoded=blob)
    )
    return [
        lambda: v2.ModelInfer(infer, timeout=60),  # unary-unary
        lambda: embed.Embed(
            sentence_embedding_pb2.EmbedRequest(model=common_pb2.ModelRef(name="simple"), texts=[text]), timeout=60
        ),
        lambda: list(  # unary-stream
            generate.Generate(
                text_generation_pb2.GenerateRequest(model=common_pb2.ModelRef(name="simple"), prompt=text), timeout=60
            )
        ),
        lambda: list(v2.ModelStreamInfer(iter([infer]), timeout=60)),  # stream-stream
        lambda: list(images.ImageToImageStream(image_request, timeout=60)),
    ]


def _refused_concurrently(calls: list[Callable[[], object]]) -> list[grpc.StatusCode | None]:
    codes: list[grpc.StatusCode | None] = [None] * len(calls)

    def run(i: int) -> None:
        try:
            calls[i]()
        except grpc.RpcError as err:
            codes[i] = err.code()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return codes


def test_unauthenticated_bodies_are_never_read(token_server: ServerProcess) -> None:
    pid = token_server.proc.pid
    with grpc.insecure_channel(token_server.address, options=[("grpc.max_send_message_length", 256 * MB)]) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        # One small refused call first: what the first call of a kind allocates is not the body's cost.
        with pytest.raises(grpc.RpcError) as first:
            pb_grpc.GRPCInferenceServiceStub(channel).ServerLive(pb.ServerLiveRequest(), timeout=10)
        assert first.value.code() == grpc.StatusCode.UNAUTHENTICATED
        calls = _big_calls(channel)
        before = _status_kb(pid, "VmRSS")
        resettable = _reset_peak(pid)
        peaks = []
        for _ in range(3):  # more rounds: what a round keeps must not add up
            codes = _refused_concurrently(calls + calls[:1] * 3)
            assert codes == [grpc.StatusCode.UNAUTHENTICATED] * len(codes)
            peaks.append(_status_kb(pid, "VmHWM") if resettable else _status_kb(pid, "VmRSS"))
        after = _status_kb(pid, "VmRSS")
    grown_peak_mb = (max(peaks) - before) / 1024
    kept_mb = (after - before) / 1024
    assert grown_peak_mb < PEAK_BOUND_MB, f"peak RSS grew {grown_peak_mb:.0f} MB for refused calls"
    assert kept_mb < KEPT_BOUND_MB, f"refused calls left {kept_mb:.0f} MB behind"
    # And a caller with a token is still served on the same server.
    with grpc.insecure_channel(token_server.address) as channel:
        metadata = (("authorization", f"Bearer {TOKENS[0]}"),)
        assert (
            pb_grpc.GRPCInferenceServiceStub(channel)
            .ServerLive(pb.ServerLiveRequest(), metadata=metadata, timeout=10)
            .live
        )


ODD_VALUES = [
    b"Bearer \xff\xfe" + TOKENS[0].encode(),  # not UTF-8
    b"Bearer \xc3\x28" + TOKENS[1].encode(),  # an invalid UTF-8 sequence
    b"Bearer caf\xc3\xa9-secret-value",  # valid UTF-8, not ASCII
    b"\x7fBearer \x80\x81secret-with-controls",  # DEL and bare continuation bytes
    b"Bearer " + b"\xff" * 2000,  # long and odd
]


def test_odd_header_bytes_are_refused_and_never_logged(small_repository: Path, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("\n".join(TOKENS) + "\n")
    server = ServerProcess(small_repository, "--auth-tokens-file", str(tokens), "--metrics-port", "-1")
    try:
        for value in ODD_VALUES:
            for key in (b"authorization", b"x-api-key"):
                answer = raw_grpc_call(server.address, "/inference.GRPCInferenceService/ServerLive", [(key, value)])
                assert answer.status == grpc.StatusCode.UNAUTHENTICATED.value[0], (key, value[:20], answer.headers)
                assert b"secret" not in answer.message and TOKENS[0].encode() not in answer.message
        # Stopping the server and reading its output to the end: every line it wrote is seen.
        server.terminate()
        assert server.wait(30) == 0
    finally:
        server.kill()
    logged = "".join(server.output)
    assert "server stopped" in logged
    assert "Traceback" not in logged and " ERROR " not in logged, logged[-3000:]
    for value in ODD_VALUES:
        secret = value[7:]
        for shown in (secret.decode("latin-1"), repr(secret)[2:-1], secret.decode("utf-8", "replace")):
            assert shown[:12] not in logged, logged[-3000:]
    for token in TOKENS:
        assert token not in logged


def test_a_method_path_that_is_not_utf8_does_not_stop_the_server(small_repository: Path) -> None:
    """grpc's accept loop fails on such a path before any of our code runs, and grpc then shuts
    the whole server down; the server serves again on the same port."""
    with running_server(small_repository, auth_tokens=TOKENS) as server:
        bad = b"/inference.GRPCInferenceService/Server\xffLive"
        raw_grpc_call(server.address, bad, [(b"authorization", f"Bearer {TOKENS[0]}".encode())])
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            metadata = (("authorization", f"Bearer {TOKENS[0]}"),)
            # wait_for_ready: connection refused while the port is rebound is waited out, to the deadline.
            answer = stub.ServerLive(pb.ServerLiveRequest(), metadata=metadata, timeout=30, wait_for_ready=True)
            assert answer.live
            assert stub.ModelReady(pb.ModelReadyRequest(name="simple"), metadata=metadata, timeout=10).ready
            # Reflection and the typed services came back too.
            with pytest.raises(grpc.RpcError) as err:
                sentence_embedding_pb2_grpc.SentenceEmbeddingStub(channel).Embed(
                    sentence_embedding_pb2.EmbedRequest(), metadata=metadata, timeout=10
                )
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
