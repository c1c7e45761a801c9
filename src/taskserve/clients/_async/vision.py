"""``client.vision``: the typed image services.

Images may be uint8 HWC numpy arrays, PIL images, encoded bytes (JPEG, PNG, ...)
or file paths, always passed as a list (or an (N, H, W, C) array).
Keyword arguments as in ``client.text``.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc.aio

from taskserve.clients import vision_codec as codec
from taskserve.clients._async.calls import AsyncCaller
from taskserve.clients.results import Classification, Detections, ImageTextScores, Segmentation
from taskserve.clients.text_codec import classifications, model_ref, request_options
from taskserve.clients.vision_codec import Images
from taskserve.protocol.generated.taskserve.v1 import (
    image_classification_pb2_grpc,
    image_segmentation_pb2_grpc,
    image_text_match_pb2_grpc,
    object_detection_pb2_grpc,
)


class AsyncVisionNamespace:
    """asyncio image tasks."""

    def __init__(self, channel: grpc.aio.Channel, caller: AsyncCaller) -> None:
        self._caller = caller
        self._classification = image_classification_pb2_grpc.ImageClassificationStub(channel)
        self._detection = object_detection_pb2_grpc.ObjectDetectionStub(channel)
        self._segmentation = image_segmentation_pb2_grpc.ImageSegmentationStub(channel)
        self._match = image_text_match_pb2_grpc.ImageTextMatchStub(channel)

    async def classify(
        self, images: Images, *, model: str, version: str = "", top_k: int = 0,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> list[Classification]:  # fmt: skip
        """Labels for each image, best first, with softmax probabilities."""
        req = codec.classify_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), images, top_k
        )
        return classifications((await self._caller.unary(self._classification.Classify, req, timeout)).results)

    async def detect(
        self, images: Images, *, model: str, version: str = "", score_threshold: float | None = None,
        iou_threshold: float | None = None, max_detections: int = 0,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> list[Detections]:  # fmt: skip
        """Objects in each image with pixel boxes in the original image's coordinates."""
        req = codec.detect_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), images, score_threshold,
            iou_threshold, max_detections,
        )  # fmt: skip
        return codec.detections(await self._caller.unary(self._detection.Detect, req, timeout))

    async def segment(
        self, images: Images, *, model: str, version: str = "", min_area: int = 0,
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> list[Segmentation]:  # fmt: skip
        """Classes present in each image with a PNG mask each (``Segment.mask()`` decodes it)."""
        req = codec.segment_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), images, min_area
        )
        return codec.segmentations(await self._caller.unary(self._segmentation.Segment, req, timeout))

    async def match(
        self, images: Images, captions: Sequence[str], *, model: str, version: str = "",
        priority: int = 0, queue_timeout_us: int = 0, timeout: float | None = None,
    ) -> ImageTextScores:  # fmt: skip
        """Every image scored against every caption (CLIP-style zero-shot)."""
        req = codec.match_request(
            model_ref(model, version), request_options(priority, queue_timeout_us), images, captions
        )
        return codec.match_scores(await self._caller.unary(self._match.Compare, req, timeout))
