"""``client.image_generation``: the ImageGeneration service.

    images = client.image_generation.text_to_image("a cat", model="sd", steps=20, seed=1)
    images[0].pixels()  # (H, W, 3) uint8 (decoding PNG needs Pillow)
    for event in client.image_generation.text_to_image_stream("a cat", model="sd", steps=20):
        ...  # ImageProgress per step, then ImageResult

Images (input image, mask) are anything ``client.vision`` takes: uint8 arrays, PIL
images, encoded bytes or paths. ``scheduler``: "ddim", "euler", "dpm-solver++" or None
(the pipeline's default); ``output_format``: "png" or "raw-rgb".
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc.aio

from taskserve.clients._async.calls import AsyncCaller
from taskserve.clients.image_generation import (
    GeneratedImage,
    ImageProgress,
    ImageResult,
    event,
    image_to_image_request,
    inpaint_request,
    result,
    text_to_image_request,
)
from taskserve.clients.images import ImageInput
from taskserve.protocol.generated.taskserve.v1 import image_generation_pb2_grpc as pb_grpc


class AsyncImageGenerationNamespace:
    """asyncio image generation. Keyword arguments:
    negative_prompt, width, height, steps, guidance_scale, seed, num_images, scheduler,
    output_format, preview (streams), priority, queue_timeout_us, version, timeout."""

    def __init__(self, channel: grpc.aio.Channel, caller: AsyncCaller) -> None:
        self._caller = caller
        self._stub = pb_grpc.ImageGenerationStub(channel)

    async def text_to_image(
        self,
        prompt: str,
        *,
        model: str,
        version: str = "",
        priority: int = 0,
        queue_timeout_us: int = 0,
        timeout: float | None = None,
        **kw: Any,
    ) -> list[GeneratedImage]:
        req = text_to_image_request(prompt, model, version, priority, queue_timeout_us, **kw)
        return result(await self._caller.unary(self._stub.TextToImage, req, timeout)).images

    async def image_to_image(
        self,
        image: ImageInput,
        prompt: str,
        *,
        model: str,
        version: str = "",
        priority: int = 0,
        queue_timeout_us: int = 0,
        timeout: float | None = None,
        strength: float | None = None,
        **kw: Any,
    ) -> list[GeneratedImage]:
        req = image_to_image_request(image, prompt, model, version, priority, queue_timeout_us, strength, **kw)
        return result(await self._caller.unary(self._stub.ImageToImage, req, timeout)).images

    async def inpaint(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str,
        *,
        model: str,
        version: str = "",
        priority: int = 0,
        queue_timeout_us: int = 0,
        timeout: float | None = None,
        strength: float | None = None,
        **kw: Any,
    ) -> list[GeneratedImage]:
        req = inpaint_request(image, mask, prompt, model, version, priority, queue_timeout_us, strength, **kw)
        return result(await self._caller.unary(self._stub.Inpaint, req, timeout)).images

    def text_to_image_stream(
        self,
        prompt: str,
        *,
        model: str,
        version: str = "",
        priority: int = 0,
        queue_timeout_us: int = 0,
        timeout: float | None = None,
        **kw: Any,
    ) -> AsyncIterator[ImageProgress | ImageResult]:
        req = text_to_image_request(prompt, model, version, priority, queue_timeout_us, **kw)
        return self._caller.streamed(self._stub.TextToImageStream, req, timeout, event)

    def image_to_image_stream(
        self,
        image: ImageInput,
        prompt: str,
        *,
        model: str,
        version: str = "",
        priority: int = 0,
        queue_timeout_us: int = 0,
        timeout: float | None = None,
        strength: float | None = None,
        **kw: Any,
    ) -> AsyncIterator[ImageProgress | ImageResult]:
        req = image_to_image_request(image, prompt, model, version, priority, queue_timeout_us, strength, **kw)
        return self._caller.streamed(self._stub.ImageToImageStream, req, timeout, event)

    def inpaint_stream(
        self,
        image: ImageInput,
        mask: ImageInput,
        prompt: str,
        *,
        model: str,
        version: str = "",
        priority: int = 0,
        queue_timeout_us: int = 0,
        timeout: float | None = None,
        strength: float | None = None,
        **kw: Any,
    ) -> AsyncIterator[ImageProgress | ImageResult]:
        req = inpaint_request(image, mask, prompt, model, version, priority, queue_timeout_us, strength, **kw)
        return self._caller.streamed(self._stub.InpaintStream, req, timeout, event)
