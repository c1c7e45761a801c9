"""``client.image_generation``: the ImageGeneration service, blocking and asyncio flavours.

    images = client.image_generation.text_to_image("a cat", model="sd", steps=20, seed=1)
    images[0].pixels()  # (H, W, 3) uint8 (decoding PNG needs Pillow)
    for event in client.image_generation.text_to_image_stream("a cat", model="sd", steps=20):
        ...  # ImageProgress per step, then ImageResult

Images (input image, mask) are anything ``client.vision`` takes: uint8 arrays, PIL
images, encoded bytes or paths. ``scheduler``: "ddim", "euler", "dpm-solver++" or None
(the pipeline's default); ``output_format``: "png" or "raw-rgb".
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import numpy as np

from taskserve.clients.calls import AsyncCaller, SyncCaller
from taskserve.clients.images import ImageInput, to_image_proto
from taskserve.clients.text_codec import model_ref, request_options
from taskserve.protocol.generated.taskserve.v1 import image_generation_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import image_generation_pb2_grpc as pb_grpc

SCHEDULERS = {
    None: pb.DIFFUSION_SCHEDULER_UNSPECIFIED,
    "ddim": pb.DIFFUSION_SCHEDULER_DDIM,
    "euler": pb.DIFFUSION_SCHEDULER_EULER,
    "dpm-solver++": pb.DIFFUSION_SCHEDULER_DPM_SOLVER_PP,
}
FORMATS = {"png": pb.GENERATED_IMAGE_FORMAT_PNG, "raw-rgb": pb.GENERATED_IMAGE_FORMAT_RAW_RGB}


@dataclass(frozen=True)
class GeneratedImage:
    data: bytes
    width: int
    height: int
    # "png" or "raw-rgb".
    format: str
    seed: int

    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8."""
        if self.format == "raw-rgb":
            return np.frombuffer(self.data, dtype=np.uint8).reshape(self.height, self.width, 3)
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.data)).convert("RGB"))


@dataclass(frozen=True)
class ImageProgress:
    """Step ``step`` of ``total`` is done; ``previews``: PNGs when asked for."""

    step: int
    total: int
    previews: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ImageResult:
    images: list[GeneratedImage]
    # Denoising steps run.
    steps: int


def _settings(prompt: str, kw: dict[str, Any]) -> pb.GenerationSettings:
    scheduler = kw.pop("scheduler", None)
    fmt = kw.pop("output_format", "png")
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler {scheduler!r} is not one of {[k for k in SCHEDULERS if k]}")
    if fmt not in FORMATS:
        raise ValueError(f"output_format {fmt!r} is not one of {list(FORMATS)}")
    settings = pb.GenerationSettings(
        prompt=prompt, negative_prompt=kw.pop("negative_prompt", ""), width=kw.pop("width", 0),
        height=kw.pop("height", 0), steps=kw.pop("steps", 0), num_images=kw.pop("num_images", 1),
        scheduler=SCHEDULERS[scheduler], output_format=FORMATS[fmt], preview=kw.pop("preview", False),
    )  # fmt: skip
    guidance, seed = kw.pop("guidance_scale", None), kw.pop("seed", None)
    if guidance is not None:
        settings.guidance_scale = guidance
    if seed is not None:
        settings.seed = seed
    if kw:
        raise TypeError(f"unexpected keyword arguments {sorted(kw)}")
    return settings


def text_to_image_request(
    prompt: str, model: str, version: str, priority: int, queue_timeout_us: int, **kw: Any
) -> pb.TextToImageRequest:
    return pb.TextToImageRequest(
        model=model_ref(model, version), options=request_options(priority, queue_timeout_us),
        settings=_settings(prompt, kw),
    )  # fmt: skip


def image_to_image_request(
    image: ImageInput,
    prompt: str,
    model: str,
    version: str,
    priority: int,
    queue_timeout_us: int,
    strength: float | None = None,
    **kw: Any,
) -> pb.ImageToImageRequest:
    req = pb.ImageToImageRequest(
        model=model_ref(model, version), options=request_options(priority, queue_timeout_us),
        settings=_settings(prompt, kw), image=to_image_proto(image),
    )  # fmt: skip
    if strength is not None:
        req.strength = strength
    return req


def inpaint_request(
    image: ImageInput,
    mask: ImageInput,
    prompt: str,
    model: str,
    version: str,
    priority: int,
    queue_timeout_us: int,
    strength: float | None = None,
    **kw: Any,
) -> pb.InpaintRequest:
    req = pb.InpaintRequest(
        model=model_ref(model, version), options=request_options(priority, queue_timeout_us),
        settings=_settings(prompt, kw), image=to_image_proto(image), mask=to_image_proto(mask),
    )  # fmt: skip
    if strength is not None:
        req.strength = strength
    return req


_FORMAT_NAMES = {pb.GENERATED_IMAGE_FORMAT_RAW_RGB: "raw-rgb"}


def result(response: pb.GenerateImagesResponse) -> ImageResult:
    images = [
        GeneratedImage(i.data, i.width, i.height, _FORMAT_NAMES.get(i.format, "png"), i.seed) for i in response.images
    ]
    return ImageResult(images, response.steps)


def event(message: pb.ImageGenerationEvent) -> ImageProgress | ImageResult:
    if message.HasField("result"):
        return result(message.result)
    p = message.progress
    return ImageProgress(p.step, p.total, tuple(p.previews))


class ImageGenerationNamespace:
    """Blocking image generation; safe to share between threads. Keyword arguments:
    negative_prompt, width, height, steps, guidance_scale, seed, num_images, scheduler,
    output_format, preview (streams), priority, queue_timeout_us, version, timeout."""

    def __init__(self, channel: grpc.Channel, caller: SyncCaller) -> None:
        self._caller = caller
        self._stub = pb_grpc.ImageGenerationStub(channel)

    def text_to_image(
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
        return result(self._caller.unary(self._stub.TextToImage, req, timeout)).images

    def image_to_image(
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
        return result(self._caller.unary(self._stub.ImageToImage, req, timeout)).images

    def inpaint(
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
        return result(self._caller.unary(self._stub.Inpaint, req, timeout)).images

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
    ) -> Iterator[ImageProgress | ImageResult]:
        req = text_to_image_request(prompt, model, version, priority, queue_timeout_us, **kw)
        return (event(m) for m in self._caller.server_stream(self._stub.TextToImageStream, req, timeout))

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
    ) -> Iterator[ImageProgress | ImageResult]:
        req = image_to_image_request(image, prompt, model, version, priority, queue_timeout_us, strength, **kw)
        return (event(m) for m in self._caller.server_stream(self._stub.ImageToImageStream, req, timeout))

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
    ) -> Iterator[ImageProgress | ImageResult]:
        req = inpaint_request(image, mask, prompt, model, version, priority, queue_timeout_us, strength, **kw)
        return (event(m) for m in self._caller.server_stream(self._stub.InpaintStream, req, timeout))


class AsyncImageGenerationNamespace:
    """The same calls for asyncio (``grpc.aio`` channel)."""

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

    async def text_to_image_stream(
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
        async for message in self._caller.server_stream(self._stub.TextToImageStream, req, timeout):
            yield event(message)

    async def image_to_image_stream(
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
        async for message in self._caller.server_stream(self._stub.ImageToImageStream, req, timeout):
            yield event(message)

    async def inpaint_stream(
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
        async for message in self._caller.server_stream(self._stub.InpaintStream, req, timeout):
            yield event(message)
