"""What a benchmark sends: a pool of pre-encoded requests and an async ``call(i)`` sending request i.

Requests are encoded once, before the load starts, so the client spends its
time on the wire rather than in protobuf encoding. Channels use the client
library's settings with retries off, so every UNAVAILABLE is counted.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc.aio

from taskserve.benchmarks.loadgen import Call
from taskserve.benchmarks.payloads import Payload
from taskserve.clients import text_codec, vision_codec
from taskserve.clients.channel import create_aio_channel
from taskserve.clients.options import ClientOptions
from taskserve.clients.v2_codec import encode_infer_request
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as v2_grpc
from taskserve.protocol.generated.taskserve.v1 import (
    fill_mask_pb2_grpc,
    image_classification_pb2_grpc,
    image_segmentation_pb2_grpc,
    object_detection_pb2_grpc,
    sentence_embedding_pb2_grpc,
    text_classification_pb2_grpc,
    token_classification_pb2_grpc,
)
from taskserve.protocol.generated.taskserve.v1.common_pb2 import ModelRef, RequestOptions


def bench_channel(address: str, timeout_s: float) -> grpc.aio.Channel:
    """A channel for load: no retries (failures are data), one connection, large messages allowed."""
    opts = ClientOptions(
        timeout_s=timeout_s, retry=None, load_balancing="pick_first",
        max_send_message_bytes=256 * 1024 * 1024, max_receive_message_bytes=256 * 1024 * 1024,
    )  # fmt: skip
    return create_aio_channel(address, opts)


def v2_call(channel: grpc.aio.Channel, model: str, version: str, payload: Payload, timeout_s: float) -> Call:
    """KServe v2 ModelInfer with raw contents; the payload's requests round-robin."""
    if not payload.requests:
        raise ValueError("the payload holds no v2 requests (a typed-only payload?)")
    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    requests = [encode_infer_request(model, r, model_version=version) for r in payload.requests]

    async def call(i: int) -> object:
        return await stub.ModelInfer(requests[i % len(requests)], timeout=timeout_s)

    return call


@dataclass(frozen=True)
class TypedTask:
    """How to build one typed request from a payload's items, and which RPC sends it."""

    needs: str  # "texts" or "images"
    build: Callable[[ModelRef, RequestOptions, Sequence[Any]], Any]
    method: Callable[[grpc.aio.Channel], Any]


def _masked(texts: Sequence[str]) -> list[str]:
    # Fill-mask inputs need the mask token; replace each text's middle word.
    out = []
    for t in texts:
        words = t.split()
        words[len(words) // 2] = "[MASK]"
        out.append(" ".join(words))
    return out


TYPED_TASKS: dict[str, TypedTask] = {
    "embed": TypedTask(
        "texts", lambda m, o, x: text_codec.embed_request(m, o, x, None, None),
        lambda ch: sentence_embedding_pb2_grpc.SentenceEmbeddingStub(ch).Embed,
    ),
    "classify-text": TypedTask(
        "texts", lambda m, o, x: text_codec.classify_request(m, o, x, 0, None, None),
        lambda ch: text_classification_pb2_grpc.TextClassificationStub(ch).Classify,
    ),
    "tag": TypedTask(
        "texts", lambda m, o, x: text_codec.tag_request(m, o, x, None, (), None),
        lambda ch: token_classification_pb2_grpc.TokenClassificationStub(ch).Tag,
    ),
    "fill-mask": TypedTask(
        "texts", lambda m, o, x: text_codec.fill_mask_request(m, o, _masked(x), 0, None),
        lambda ch: fill_mask_pb2_grpc.FillMaskStub(ch).Fill,
    ),
    "classify-image": TypedTask(
        "images", lambda m, o, x: vision_codec.classify_request(m, o, list(x), 0),
        lambda ch: image_classification_pb2_grpc.ImageClassificationStub(ch).Classify,
    ),
    "detect": TypedTask(
        "images", lambda m, o, x: vision_codec.detect_request(m, o, list(x), None, None, 0),
        lambda ch: object_detection_pb2_grpc.ObjectDetectionStub(ch).Detect,
    ),
    "segment": TypedTask(
        "images", lambda m, o, x: vision_codec.segment_request(m, o, list(x), 0),
        lambda ch: image_segmentation_pb2_grpc.ImageSegmentationStub(ch).Segment,
    ),
}  # fmt: skip


def typed_call(
    channel: grpc.aio.Channel, task: str, model: str, version: str, payload: Payload, timeout_s: float
) -> Call:
    """A typed taskserve.v1 service; each request carries ``payload.batch_size`` texts or images."""
    try:
        spec = TYPED_TASKS[task]
    except KeyError:
        raise ValueError(f"unknown typed task {task!r}; choose one of {sorted(TYPED_TASKS)}") from None
    items: Sequence[Any] = payload.texts if spec.needs == "texts" else payload.images
    if not items:
        raise ValueError(f"typed task {task!r} needs a payload of {spec.needs} (--payload text or image)")
    ref, opts, size = ModelRef(name=model, version=version), RequestOptions(), payload.batch_size
    requests = [spec.build(ref, opts, items[i : i + size]) for i in range(0, len(items) - size + 1, size)]
    method = spec.method(channel)

    async def call(i: int) -> object:
        return await method(requests[i % len(requests)], timeout=timeout_s)

    return call
