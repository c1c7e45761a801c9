"""Requests and results of the typed image services (taskserve.v1): protobuf <-> client types."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from taskserve.clients.images import ImageInput, to_image_protos
from taskserve.clients.results import (
    BoundingBox,
    Detection,
    Detections,
    ImageTextScores,
    Segment,
    Segmentation,
)
from taskserve.clients.text_codec import check_texts
from taskserve.protocol.generated.taskserve.v1 import (
    common_pb2,
    image_classification_pb2,
    image_segmentation_pb2,
    image_text_match_pb2,
    object_detection_pb2,
)

Images = Sequence[ImageInput] | npt.NDArray[np.uint8]


def classify_request(
    ref: common_pb2.ModelRef, opts: common_pb2.RequestOptions, images: Images, top_k: int
) -> image_classification_pb2.ClassifyImageRequest:
    return image_classification_pb2.ClassifyImageRequest(
        model=ref, options=opts, images=to_image_protos(images), top_k=top_k
    )


def detect_request(
    ref: common_pb2.ModelRef,
    opts: common_pb2.RequestOptions,
    images: Images,
    score_threshold: float | None,
    iou_threshold: float | None,
    max_detections: int,
) -> object_detection_pb2.DetectRequest:
    return object_detection_pb2.DetectRequest(
        model=ref, options=opts, images=to_image_protos(images), score_threshold=score_threshold,
        iou_threshold=iou_threshold, max_detections=max_detections,
    )  # fmt: skip


def detections(response: object_detection_pb2.DetectResponse) -> list[Detections]:
    return [
        Detections(
            tuple(
                Detection(d.label, d.score, d.index, BoundingBox(d.box.x_min, d.box.y_min, d.box.x_max, d.box.y_max))
                for d in r.detections
            ),
            r.width,
            r.height,
        )
        for r in response.results
    ]


def segment_request(
    ref: common_pb2.ModelRef, opts: common_pb2.RequestOptions, images: Images, min_area: int
) -> image_segmentation_pb2.SegmentRequest:
    return image_segmentation_pb2.SegmentRequest(
        model=ref, options=opts, images=to_image_protos(images), min_area=min_area
    )


def segmentations(response: image_segmentation_pb2.SegmentResponse) -> list[Segmentation]:
    return [
        Segmentation(
            tuple(Segment(s.label, s.index, s.score, s.area, s.mask_png) for s in r.segments),
            r.width,
            r.height,
        )
        for r in response.results
    ]


def match_request(
    ref: common_pb2.ModelRef, opts: common_pb2.RequestOptions, images: Images, captions: Sequence[str]
) -> image_text_match_pb2.CompareImageTextRequest:
    return image_text_match_pb2.CompareImageTextRequest(
        model=ref, options=opts, images=to_image_protos(images), captions=check_texts(captions, "captions")
    )


def match_scores(response: image_text_match_pb2.CompareImageTextResponse) -> ImageTextScores:
    sims = np.asarray([list(r.similarities) for r in response.results], dtype=np.float32)
    probs = np.asarray([list(r.probabilities) for r in response.results], dtype=np.float32)
    return ImageTextScores(sims, probs)
