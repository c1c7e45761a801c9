"""Object detection: images -> boxes in the original image's pixels, labels, scores.

Made for DETR-style models (DETR, YOLOS, ...): per query class logits and a
normalized box. task_options: ``logits_output`` ("logits"), ``boxes_output``
("pred_boxes"), ``box_format`` ("cxcywh" | "xyxy"), ``boxes_normalized`` (true:
in [0, 1]; false: in model-input pixels), ``no_object_class`` (true, the default:
softmax scores with the last class meaning "no object"; false: sigmoid scores per
class), ``score_threshold`` (0.5), ``iou_threshold``
(0.5), ``max_detections`` (100), plus the image preprocessing keys (vision.py;
images are resized to one exact size, never cropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field

from taskserve.server.errors import InvalidInput
from taskserve.server.tasks.base import CallOptions, TaskConfigError, sigmoid, softmax
from taskserve.server.tasks.images import ImageSource
from taskserve.server.tasks.vision import ImageOptions, VisionTask


@dataclass(frozen=True)
class DetectParams:
    # None / 0: task_options, else the documented defaults.
    score_threshold: float | None = None
    iou_threshold: float | None = None
    max_detections: int = 0


@dataclass(frozen=True)
class Box:
    x_min: float
    y_min: float
    x_max: float
    y_max: float


@dataclass(frozen=True)
class Detection:
    label: str
    score: float
    index: int
    box: Box


@dataclass(frozen=True)
class ImageDetections:
    detections: tuple[Detection, ...]
    width: int
    height: int


def to_xyxy(boxes: np.ndarray, box_format: str) -> np.ndarray:
    if box_format == "xyxy":
        return boxes
    cx, cy, w, h = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    return np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def iou(box: np.ndarray, others: np.ndarray) -> np.ndarray:
    """IoU of one xyxy box with each of ``others``."""
    x1 = np.maximum(box[0], others[:, 0])
    y1 = np.maximum(box[1], others[:, 1])
    x2 = np.minimum(box[2], others[:, 2])
    y2 = np.minimum(box[3], others[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (others[:, 2] - others[:, 0]) * (others[:, 3] - others[:, 1])
    out: np.ndarray = inter / np.maximum(area + areas - inter, 1e-9)
    return out


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy per-class non-maximum suppression; kept indices, best first."""
    order = list(np.argsort(-scores, kind="stable"))
    kept: list[int] = []
    while order:
        best = order.pop(0)
        kept.append(int(best))
        if not order or iou_threshold >= 1.0:
            continue
        rest = np.array(order)
        overlap = iou(boxes[best], boxes[rest])
        suppressed = (overlap > iou_threshold) & (classes[rest] == classes[best])
        order = [int(i) for i in rest[~suppressed]]
    return kept


class ObjectDetectionOptions(ImageOptions):
    box_format: Literal["cxcywh", "xyxy"] = Field("cxcywh", description="how the boxes output is laid out")
    boxes_normalized: bool = Field(True, description="boxes in [0, 1] of the input (false: in input pixels)")
    no_object_class: bool = Field(
        True, description="the last class means no object: softmax scores (false: sigmoid per class)"
    )
    score_threshold: float = Field(0.5, ge=0, le=1, description="lowest score reported when a request does not say")
    iou_threshold: float = Field(
        0.5, gt=0, le=1, description="overlap above which NMS drops a box, when a request does not say"
    )
    max_detections: int = Field(100, ge=1, description="boxes per image when a request does not say")
    logits_output: str | None = Field(None, description="the class-logits output (default logits)")
    boxes_output: str | None = Field(None, description="the boxes output (default pred_boxes)")


class ObjectDetector(VisionTask):
    task = "object-detection"
    options: ObjectDetectionOptions
    fixed_size = True

    def _thresholds(self, params: DetectParams) -> tuple[float, float, int]:
        score = params.score_threshold if params.score_threshold is not None else self.options.score_threshold
        overlap = params.iou_threshold if params.iou_threshold is not None else self.options.iou_threshold
        limit = params.max_detections or self.options.max_detections
        if not 0.0 <= score <= 1.0:
            raise InvalidInput(f"score_threshold must be in [0, 1], got {score}")
        if not 0.0 < overlap <= 1.0:
            raise InvalidInput(f"iou_threshold must be in (0, 1], got {overlap}")
        return score, overlap, limit

    def _class_scores(self, logits: np.ndarray) -> np.ndarray:
        """(queries, classes) scores, the "no object" class removed."""
        if self.options.no_object_class:
            return softmax(logits, axis=-1)[:, :-1]
        return sigmoid(logits)

    def _normalized(self, boxes: np.ndarray) -> np.ndarray:
        """xyxy boxes in [0, 1] of the model input."""
        xyxy = to_xyxy(boxes, self.options.box_format)
        if not self.options.boxes_normalized:
            size = self.preprocessing.output_size
            if size is None:
                raise TaskConfigError(f"model {self.model.name!r}: pixel boxes need a fixed input size")
            xyxy = xyxy / np.array([size[1], size[0], size[1], size[0]], dtype=np.float32)
        return xyxy

    def _detect_one(
        self,
        logits: np.ndarray,
        boxes: np.ndarray,
        size: tuple[int, int],
        labels: list[str],
        thresholds: tuple[float, float, int],
    ) -> ImageDetections:
        score_min, iou_max, limit = thresholds
        height, width = size
        scores = self._class_scores(logits)
        classes = scores.argmax(axis=-1)
        best = scores[np.arange(scores.shape[0]), classes]
        keep = best >= score_min
        xyxy = self._normalized(boxes[keep])
        # Normalized coordinates survive the exact (even anisotropic) resize, so
        # scaling by the original size gives original pixels.
        xyxy = np.clip(xyxy, 0.0, 1.0) * np.array([width, height, width, height], dtype=np.float32)
        classes, best = classes[keep], best[keep]
        kept = nms(xyxy, best, classes, iou_max)[:limit]
        detections = tuple(
            Detection(
                labels[int(classes[i])], float(best[i]), int(classes[i]), Box(*(float(v) for v in xyxy[i]))
            )
            for i in kept
        )
        return ImageDetections(detections, width, height)

    async def detect(
        self, images: Sequence[ImageSource], params: DetectParams, options: CallOptions
    ) -> list[ImageDetections]:
        thresholds = self._thresholds(params)
        batch = await self.pixels(images)
        logits_name = self.output_name("logits", self.options.logits_output, "logits_output")
        boxes_name = self.output_name("pred_boxes", self.options.boxes_output, "boxes_output")
        out = await self.infer({self.pixel_input: batch.pixels}, options, [logits_name, boxes_name])
        logits, boxes = out[logits_name].astype(np.float32), out[boxes_name].astype(np.float32)
        labels = self.labels(logits.shape[-1] - (1 if self.options.no_object_class else 0))

        def postprocess() -> list[ImageDetections]:
            return [
                self._detect_one(logits[i], boxes[i], size, labels, thresholds)
                for i, size in enumerate(batch.sizes)
            ]

        return await self.offload("postprocess", postprocess)
