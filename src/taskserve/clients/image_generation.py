"""What ``client.image_generation`` sends and returns, shared by the asyncio namespace
(``_async/image_generation.py``) and the blocking one generated from it.

Images (input image, mask) are anything ``client.vision`` takes: uint8 arrays, PIL
images, encoded bytes or paths. ``scheduler``: "ddim", "euler", "dpm-solver++" or None
(the pipeline's default); ``output_format``: "png" or "raw-rgb".
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from taskserve.clients.images import ImageInput, to_image_proto
from taskserve.clients.text_codec import model_ref, request_options
from taskserve.protocol.generated.taskserve.v1 import image_generation_pb2 as pb

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
