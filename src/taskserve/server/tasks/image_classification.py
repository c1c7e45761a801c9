"""Image classification: images -> ranked labels.

task_options: ``output`` (default "logits"), ``activation`` ("softmax" default |
"sigmoid" | "none"), ``top_k`` (5), plus the image preprocessing keys (vision.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from taskserve.server.tasks.base import CallOptions, LabelScore, ScoreFunction, apply_function, ranked
from taskserve.server.tasks.images import ImageSource
from taskserve.server.tasks.vision import ImageOptions, VisionTask


@dataclass(frozen=True)
class ClassifyImageParams:
    # 0: task_options.top_k, else 5.
    top_k: int = 0


class ImageClassificationOptions(ImageOptions):
    top_k: int = Field(5, ge=1, description="labels per image when a request does not say")


class ImageClassifier(VisionTask):
    task = "image-classification"
    options: ImageClassificationOptions

    async def classify(
        self, images: Sequence[ImageSource], params: ClassifyImageParams, options: CallOptions
    ) -> list[tuple[LabelScore, ...]]:
        """One ranked label list per image, in order."""
        batch = await self.pixels(images)
        output = self.output_name("logits", self.options.output)
        logits = (await self.infer({self.pixel_input: batch.pixels}, options, [output]))[output].astype(
            np.float32
        )
        function = self.score_function_option() or ScoreFunction.SOFTMAX
        labels = self.labels(logits.shape[-1])
        top_k = params.top_k or self.options.top_k

        def postprocess() -> list[tuple[LabelScore, ...]]:
            scores = apply_function(logits.reshape(logits.shape[0], -1), function)
            return [ranked(row, labels, top_k) for row in scores]

        return await self.offload("postprocess", postprocess)
