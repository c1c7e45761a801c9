"""Base of the tasks whose input is images: decoding and preprocessing into pixels."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from pydantic import Field

from taskserve.server.tasks.base import ServedModel, Task, TaskContext, check_count
from taskserve.server.tasks.images import (
    ImageSettings,
    ImageSource,
    check_request_pixels,
    decode_image,
    preprocessing_from,
    read_preprocessor_config,
)
from taskserve.server.tasks.options import ModelFile, TaskOptions


@dataclass(frozen=True)
class PixelBatch:
    # Model input, (rows, 3, h, w) or (rows, h, w, 3).
    pixels: np.ndarray
    # (height, width) of each original image.
    sizes: list[tuple[int, int]]


class ImageOptions(TaskOptions):
    """The keys every image task reads."""

    image: ImageSettings | None = Field(
        None, description="image preprocessing (below); default: preprocessor_config's, else the input's dims"
    )
    preprocessor_config: ModelFile = Field(
        "preprocessor_config.json", description="Hugging Face image processor config, read when image is unset"
    )
    pixel_input: str | None = Field(None, description="the pixel input (default: pixel_values, or the only input)")


class VisionTask(Task):
    """A task fed with images. ``load`` reads the preprocessor config (blocking)."""

    options: ImageOptions

    # Resize to one exact size, never crop: outputs in image coordinates
    # (boxes, masks) then map back to the original by scaling.
    fixed_size: ClassVar[bool] = False

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        self.pixel_input = self._pixel_input()
        dims = next((t.dims for t in model.config.inputs or () if t.name == self.pixel_input), None)
        if dims is not None and model.config.max_batch_size == 0:
            dims = dims[1:]  # the graph's own batch axis
        hf = read_preprocessor_config(model.model_dir, self.options.preprocessor_config)
        self.preprocessing = preprocessing_from(
            self.options.image,
            hf,
            dims,
            self.input_dtype(self.pixel_input, np.float32),
            model.name,
            self.fixed_size,
        )

    def _pixel_input(self) -> str:
        if self.options.pixel_input:
            return self.options.pixel_input
        names = self.input_names()
        if names is not None and "pixel_values" not in names and len(names) == 1:
            return next(iter(names))
        return "pixel_values"

    def _prepare(self, image: ImageSource, what: str) -> tuple[np.ndarray, tuple[int, int]]:
        """Blocking: decode and preprocess one image; also its original (height, width)."""
        decoded = decode_image(image, self.limits.max_image_pixels, what)
        return self.preprocessing.apply(decoded), (decoded.shape[0], decoded.shape[1])

    async def pixels(self, images: Sequence[ImageSource], what: str = "images") -> PixelBatch:
        check_count(what, len(images), self.limits)
        check_request_pixels(images, self.limits.max_image_pixels, self.limits.max_request_pixels, what)
        with self.stage("preprocess"):
            # One pool job per image: decoding is the heaviest per-item work, so images
            # decode in parallel across the pool.
            prepared = await asyncio.gather(
                *(self.context.run(self._prepare, image, f"{what}[{i}]") for i, image in enumerate(images)),
                return_exceptions=True,
            )
        for result in prepared:
            if isinstance(result, BaseException):
                raise result  # the first bad image by position, whichever failed first
        done = [r for r in prepared if not isinstance(r, BaseException)]
        return PixelBatch(self.preprocessing.stack([p for p, _ in done]), [size for _, size in done])
