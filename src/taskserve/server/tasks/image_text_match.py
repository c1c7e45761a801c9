"""Image-text matching, CLIP-style: images x captions -> cosine similarities and
zero-shot probabilities over the captions.

The model is one graph taking ``input_ids`` (+ ``attention_mask``) and
``pixel_values`` with different row counts (captions, images), so it cannot be
batched with other requests: its config needs ``max_batch_size: 0``.
task_options: ``image_embeds_output`` ("image_embeds"), ``text_embeds_output``
("text_embeds"), ``logits_output`` ("logits_per_image"; when the model has no
such output, ``logit_scale`` (100) times the similarities), plus the tokenizer's
and the image preprocessing keys.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pydantic import Field

from taskserve.server.tasks.base import (
    CallOptions,
    ServedModel,
    TaskConfigError,
    TaskContext,
    check_texts,
    softmax,
)
from taskserve.server.tasks.images import ImageSource
from taskserve.server.tasks.sentence_embedding import l2_normalize
from taskserve.server.tasks.text import TextOptions, TextTask
from taskserve.server.tasks.vision import ImageOptions, VisionTask


@dataclass(frozen=True)
class ImageTextScores:
    # One per caption, in order.
    similarities: tuple[float, ...]
    probabilities: tuple[float, ...]


class ImageTextMatchOptions(ImageOptions, TextOptions):
    logit_scale: float = Field(100.0, description="similarities times this are the logits, when the model has none")
    image_embeds_output: str | None = Field(None, description="the image embeddings output (default image_embeds)")
    text_embeds_output: str | None = Field(None, description="the text embeddings output (default text_embeds)")
    logits_output: str | None = Field(None, description="the logits output (default logits_per_image)")


class ImageTextMatcher(VisionTask, TextTask):
    task = "image-text-match"
    options: ImageTextMatchOptions

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        if model.config.max_batch_size > 0:
            raise TaskConfigError(
                f"model {model.name!r}: an image-text-match graph takes images and captions in different numbers, "
                "which the batcher cannot combine; set max_batch_size: 0 in its config.yaml"
            )

    async def compare(
        self, images: Sequence[ImageSource], captions: Sequence[str], options: CallOptions
    ) -> list[ImageTextScores]:
        """Per image, its scores against every caption."""
        check_texts("captions", captions, self.limits)
        pixels = await self.pixels(images)
        tokens = await self.tokenize(captions, self.truncate(None), "captions")
        image_out = self.output_name("image_embeds", self.options.image_embeds_output, "image_embeds_output")
        text_out = self.output_name("text_embeds", self.options.text_embeds_output, "text_embeds_output")
        logits_out = self.output_name("logits_per_image", self.options.logits_output, "logits_output")
        names = self.output_names()
        wanted = [image_out, text_out] + ([logits_out] if names is None or logits_out in names else [])
        out = await self.infer({**tokens.arrays, self.pixel_input: pixels.pixels}, options, wanted)
        scale = self.options.logit_scale

        def postprocess() -> list[ImageTextScores]:
            image = l2_normalize(out[image_out].astype(np.float32))
            text = l2_normalize(out[text_out].astype(np.float32))
            similarities = np.clip(image @ text.T, -1.0, 1.0)
            logits = out[logits_out].astype(np.float32) if logits_out in out else scale * similarities
            probabilities = softmax(logits, axis=1)
            return [
                ImageTextScores(tuple(float(s) for s in sim), tuple(float(p) for p in prob))
                for sim, prob in zip(similarities, probabilities, strict=True)
            ]

        return await self.offload("postprocess", postprocess)
