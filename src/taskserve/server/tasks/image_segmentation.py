"""Semantic segmentation: images -> one PNG mask per class present, with its area.

For SegFormer-style models: per-class logits at a reduced resolution
(rows, classes, h, w). They are softmaxed, resized to the original image and
argmaxed per pixel. task_options: ``mask_output`` ("logits"), plus the image
preprocessing keys (vision.py; images are resized to one exact size).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from taskserve.server.tasks.base import CallOptions, softmax
from taskserve.server.tasks.images import ImageSource, encode_png, resize_plane
from taskserve.server.tasks.vision import ImageOptions, VisionTask


@dataclass(frozen=True)
class SegmentParams:
    # Leave out classes covering fewer pixels (0: keep every class present).
    min_area: int = 0


@dataclass(frozen=True)
class Segment:
    label: str
    index: int
    # Mean probability of the class over its pixels.
    score: float
    area: int
    # 8-bit grayscale PNG of the original size: 255 on the class, 0 elsewhere.
    mask_png: bytes


@dataclass(frozen=True)
class Segmentation:
    segments: tuple[Segment, ...]
    width: int
    height: int


def segment_one(
    logits: np.ndarray, size: tuple[int, int], labels: Sequence[str], min_area: int
) -> Segmentation:
    """One image's (classes, h, w) logits -> segments at the original (height, width)."""
    height, width = size
    probs = softmax(logits, axis=0)
    full = np.stack([resize_plane(p, height, width) for p in probs])
    label_map = full.argmax(axis=0)
    segments = []
    for index in np.unique(label_map):
        mask = label_map == index
        area = int(mask.sum())
        if area < max(min_area, 1):
            continue
        score = float(full[index][mask].mean())
        png = encode_png(mask.astype(np.uint8) * 255)
        segments.append(Segment(labels[int(index)], int(index), score, area, png))
    segments.sort(key=lambda s: (-s.area, s.index))
    return Segmentation(tuple(segments), width, height)


class ImageSegmentationOptions(ImageOptions):
    mask_output: str | None = Field(None, description="the per-class logits output (default logits)")
    # Written by the exporter for clients; the server reads nothing from it.
    segmentation: str | None = Field(None, description="the kind of masks (semantic), for clients")


class ImageSegmenter(VisionTask):
    task = "image-segmentation"
    options: ImageSegmentationOptions
    fixed_size = True

    async def segment(
        self, images: Sequence[ImageSource], params: SegmentParams, options: CallOptions
    ) -> list[Segmentation]:
        batch = await self.pixels(images)
        output = self.output_name("logits", self.options.mask_output, "mask_output")
        logits = (await self.infer({self.pixel_input: batch.pixels}, options, [output]))[output].astype(
            np.float32
        )
        labels = self.labels(logits.shape[1])

        def postprocess() -> list[Segmentation]:
            return [
                segment_one(logits[i], size, labels, params.min_area) for i, size in enumerate(batch.sizes)
            ]

        return await self.offload("postprocess", postprocess)
