"""Image generation with a Stable Diffusion pipeline: text to image, image to image, inpainting.

The model this task is loaded for is the pipeline's UNet; ``task_options.parts`` names
the entries of the text encoder and the VAE decoder and encoder, each served by its
own batcher (see exporters/diffusion.py). The denoising loop (server/tasks/diffusion)
runs here: every UNet call is one ``InferRequest`` to the UNet's batcher, so the steps
of concurrent requests with the same latent size share a batch, and classifier-free
guidance adds rows (negative and positive prompt) to a call, never a call.

Every parameter is checked before any model runs (``InvalidInput``). Cancelling the
caller stops the loop at the step being awaited; a deadline that passes stops it at
the next step.

task_options (written by the exporter): ``ImageGenerationOptions`` below; the largest size
follows from ``attention_bytes`` and ``attention_memory_budget`` (see diffusion/budget.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import io
import json
import math
import secrets
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from pydantic import Field

from taskserve.protocol.datatypes import numpy_dtype
from taskserve.server.errors import DeadlineExceeded, InvalidInput, LimitExceeded, Overloaded
from taskserve.server.repository.paths import resolve_inside, shown
from taskserve.server.tasks.base import (
    CallOptions,
    ServedModel,
    Task,
    TaskConfigError,
    TaskContext,
    infer_rows,
)
from taskserve.server.tasks.diffusion.budget import DEFAULT_BUDGET, AttentionBudget, gib
from taskserve.server.tasks.diffusion.pipeline import (
    GenerationParams,
    Mode,
    denoising_steps,
    generate,
    image_seed,
    latent_preview,
    spec_from_options,
)
from taskserve.server.tasks.diffusion.schedulers import SchedulerKind, make_scheduler
from taskserve.server.tasks.images import ImageSource, check_request_pixels, declared_size, decode_image
from taskserve.server.tasks.options import Choice, ModelFile
from taskserve.server.tasks.tokenization import TextTokenizer, TokenizerOptions

DEFAULT_GUIDANCE = 7.5
DEFAULT_STRENGTH = {Mode.IMAGE_TO_IMAGE: 0.8, Mode.INPAINT: 1.0}


class OutputFormat(enum.Enum):
    PNG = "png"
    RAW_RGB = "raw-rgb"


@dataclass(frozen=True)
class ImageRequest:
    """One call's parameters as the caller sent them (0 / None: the default)."""

    mode: Mode
    prompt: str
    negative_prompt: str = ""
    width: int = 0
    height: int = 0
    steps: int = 0
    guidance_scale: float | None = None
    seed: int | None = None
    num_images: int = 0
    scheduler: SchedulerKind | None = None
    strength: float | None = None
    image: ImageSource | None = None
    mask: ImageSource | None = None
    output_format: OutputFormat = OutputFormat.PNG
    preview: bool = False


@dataclass(frozen=True)
class GenerationProgress:
    """Step ``step`` of ``total`` is done; ``previews``: one small PNG per image when asked."""

    step: int
    total: int
    previews: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class GeneratedImages:
    images: tuple[bytes, ...]
    width: int
    height: int
    seeds: tuple[int, ...]
    steps: int
    output_format: OutputFormat


GenerationEvent = GenerationProgress | GeneratedImages


@dataclass(frozen=True)
class _Checked:
    params: GenerationParams
    token_ids: np.ndarray
    image: np.ndarray | None
    mask: np.ndarray | None


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _read_scheduler_config(model: ServedModel, configured: str) -> dict[str, Any]:
    """The pipeline's scheduler_config.json, confined to the model directory."""
    path = resolve_inside(model.model_dir, configured, "task_options.scheduler_config")
    where = shown(path, model.model_dir)
    if not path.is_file():
        raise TaskConfigError(f"model {model.name!r}: scheduler config {where} is missing; re-export it")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise TaskConfigError(
            f"model {model.name!r}: scheduler config {where} is not readable JSON ({type(err).__name__}); re-export it"
        ) from None
    if not isinstance(data, dict):
        raise TaskConfigError(f"model {model.name!r}: scheduler config {where} is not a JSON object; re-export it")
    return data


class _ServedParts:
    """The pipeline's parts as batcher requests (``diffusion.pipeline.Parts``)."""

    def __init__(self, unet: ServedModel, parts: Mapping[str, ServedModel], options: CallOptions) -> None:
        self._unet = unet
        self._parts = parts
        self._options = options

    async def _call(self, model: ServedModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
        declared = {t.name: t for t in model.config.inputs or ()}
        feeds = {
            name: value.astype(numpy_dtype(declared[name].datatype), copy=False) if name in declared else value
            for name, value in inputs.items()
        }
        result = await infer_rows(model, feeds, self._options)
        return next(iter(result.values())).astype(np.float32, copy=False)

    async def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return await self._call(self._parts["text_encoder"], {"input_ids": input_ids})

    async def unet(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden}
        return await self._call(self._unet, inputs)

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return await self._call(self._parts["vae_decoder"], {"latent_sample": latents})

    async def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return await self._call(self._parts["vae_encoder"], {"sample": pixels})


class ImageGenerationOptions(TokenizerOptions):
    """Written by the exporter (exporters/diffusion.py); edit the limits in config.yaml."""

    parts: dict[str, str] = Field(
        default_factory=dict, description="the entries of text_encoder, vae_decoder (and vae_encoder)"
    )
    latent_channels: int = Field(4, ge=1, description="channels of the latents")
    unet_in_channels: int = Field(4, ge=1, description="UNet input channels: latent_channels, or 2x+1 to inpaint")
    vae_scale_factor: int = Field(8, ge=1, description="pixels per latent pixel")
    scaling_factor: float = Field(0.18215, description="latents are scaled by this after encoding")
    size_multiple: int = Field(8, ge=1, description="width and height must be multiples of this (at least 8)")
    default_size: int = Field(512, ge=1, description="width and height when a request does not say")
    max_pixels: int = Field(
        1024 * 1024, ge=1, description="ceiling on pixels per image, lowered to what the attention budget affords"
    )
    max_steps: int = Field(150, ge=1, description="denoising steps a request may ask for")
    max_images: int = Field(4, ge=1, description="images a request may ask for")
    default_scheduler: Choice[SchedulerKind] = Field(
        SchedulerKind.DDIM, description="scheduler when a request does not say"
    )
    scheduler_config: ModelFile = Field("scheduler_config.json", description="the diffusers scheduler config")
    max_concurrent_generations: int = Field(
        16, ge=1, description="generations at once on the pipeline; beyond: RESOURCE_EXHAUSTED"
    )
    attention_bytes: float = Field(
        0.0, ge=0, description="attention bytes per latent pixel squared (measured by the exporter; 0: no limit)"
    )
    attention_memory_budget: int = Field(
        DEFAULT_BUDGET, ge=1, description="attention memory (bytes) one request may take; sets the largest size"
    )


class ImageGenerator(Task):
    task = "image-generation"
    options: ImageGenerationOptions

    def __init__(self, model: ServedModel, context: TaskContext) -> None:
        super().__init__(model, context)
        self.tokenizer = TextTokenizer(model.model_dir, self.options, model.name)
        scheduler_config = _read_scheduler_config(model, self.options.scheduler_config)
        try:
            self.spec = spec_from_options(self.options, scheduler_config)
        except ValueError as err:
            raise TaskConfigError(f"model {model.name!r}: {err}") from None
        # Schedulers this pipeline's config supports, and why the others are refused.
        self.unsupported: dict[SchedulerKind, str] = {}
        for kind in SchedulerKind:
            try:
                make_scheduler(kind, scheduler_config)
            except ValueError as err:
                self.unsupported[kind] = str(err)
        parts = self.options.parts
        missing = sorted({"text_encoder", "vae_decoder"} - set(parts))
        if missing:
            raise TaskConfigError(f"model {model.name!r}: task_options.parts lacks {missing}; re-export the pipeline")
        self.part_names: dict[str, str] = dict(parts)
        self.size_multiple = max(8, self.options.size_multiple)
        self.default_size = self.options.default_size
        self.budget = AttentionBudget(
            self.options.attention_bytes, self.options.attention_memory_budget, self.spec.vae_scale_factor
        )
        # The configured ceiling, lowered to what the memory budget affords one image.
        afforded = self.budget.max_pixels(1)
        self.max_pixels = self.options.max_pixels
        if afforded is not None:
            self.max_pixels = min(self.max_pixels, afforded)
        self.max_steps = min(self.options.max_steps, int(scheduler_config.get("num_train_timesteps", 1000)))
        self.max_images = self.options.max_images
        self.max_concurrent = self.options.max_concurrent_generations
        self.default_scheduler = self.options.default_scheduler
        # Generations running now; touched on the event loop only.
        self.active = 0

    # -- checks, all before any model runs ---------------------------------------------

    def _check_size(self, width: int, height: int, what: str, images: int = 1) -> None:
        for name, value in (("width", width), ("height", height)):
            if value <= 0 or value % self.size_multiple:
                raise InvalidInput(
                    f"{what} {name} {value} must be a positive multiple of {self.size_multiple} for model "
                    f"{self.model.name!r}"
                )
        if width * height > self.max_pixels:
            raise LimitExceeded(
                f"{what} {width}x{height} is {width * height} pixels, over model {self.model.name!r}'s "
                f"limit of {self.max_pixels} (task_options.max_pixels and attention_memory_budget)"
            )
        cost = self.budget.cost(width, height, images)
        if cost > self.budget.budget:
            raise LimitExceeded(
                f"{what} {width}x{height} with {images} images needs about {gib(cost)} of attention memory, "
                f"over model {self.model.name!r}'s budget of {gib(self.budget.budget)} per request; at most "
                f"{self.budget.max_pixels(images)} pixels per image for {images} images (or raise "
                "task_options.attention_memory_budget)"
            )

    def _check_images(self, request: ImageRequest, count: int) -> None:
        """The sizes the image and mask declare, from their headers: checked before either is decoded."""
        sources = [s for s in (request.image, request.mask) if s is not None]
        check_request_pixels(
            sources, self.limits.max_image_pixels, self.limits.max_request_pixels, "image and mask"
        )
        if request.image is not None:
            width, height = declared_size(request.image)
            if width and height:
                self._check_size(width, height, "image", count)
        if request.mask is not None:
            width, height = declared_size(request.mask)
            if width * height > self.max_pixels:
                raise LimitExceeded(
                    f"mask {width}x{height} is {width * height} pixels, over model {self.model.name!r}'s "
                    f"limit of {self.max_pixels}"
                )

    def _check_numbers(self, request: ImageRequest) -> tuple[float, float, int, SchedulerKind]:
        if request.steps <= 0 or request.steps > self.max_steps:
            raise InvalidInput(f"settings.steps must be between 1 and {self.max_steps}, got {request.steps}")
        guidance = DEFAULT_GUIDANCE if request.guidance_scale is None else request.guidance_scale
        if not math.isfinite(guidance) or guidance < 0:
            raise InvalidInput(f"settings.guidance_scale must be >= 0, got {guidance}")
        strength = 1.0
        if request.mode is not Mode.TEXT_TO_IMAGE:
            strength = DEFAULT_STRENGTH[request.mode] if request.strength is None else request.strength
            if not math.isfinite(strength) or not 0.0 < strength <= 1.0:
                raise InvalidInput(f"strength must be in (0, 1], got {strength}")
        count = request.num_images or 1
        if count > self.max_images:
            raise InvalidInput(
                f"settings.num_images {count} is over model {self.model.name!r}'s limit of {self.max_images}"
            )
        kind = request.scheduler or self.default_scheduler
        if kind in self.unsupported:
            raise InvalidInput(
                f"model {self.model.name!r} cannot run the {kind.value} scheduler with its scheduler config: "
                f"{self.unsupported[kind]}"
            )
        limit = self.limits.max_text_chars
        for name, text in (("prompt", request.prompt), ("negative_prompt", request.negative_prompt)):
            if len(text) > limit:
                raise InvalidInput(f"settings.{name} has {len(text)} characters, over the limit of {limit}")
        latent_only = self.spec.unet_in_channels != self.spec.latent_channels
        if latent_only and request.mode is not Mode.INPAINT:
            raise InvalidInput(f"model {self.model.name!r} is an inpainting pipeline; call Inpaint")
        if request.mode is Mode.IMAGE_TO_IMAGE or request.mode is Mode.INPAINT:
            if request.image is None:
                raise InvalidInput("image is empty; send the image to start from")
            if request.mode is Mode.INPAINT and request.mask is None:
                raise InvalidInput("mask is empty; send a mask (white = repaint) of the image's size")
            if (request.width or request.height) and not (request.width and request.height):
                raise InvalidInput("set both settings.width and settings.height, or neither")
            if request.width:
                self._check_size(request.width, request.height, "settings", count)
            self._check_images(request, count)
        else:
            width, height = request.width or self.default_size, request.height or self.default_size
            self._check_size(width, height, "settings", count)
        return guidance, strength, count, kind

    def _prepare(self, request: ImageRequest) -> _Checked:
        """Blocking (decoding, tokenizing): runs on the worker pool."""
        guidance, strength, count, kind = self._check_numbers(request)
        width, height = request.width or self.default_size, request.height or self.default_size
        image = mask = None
        # Every size was checked on the headers; decoding checks them again against the same limit.
        max_pixels = min(self.max_pixels, self.limits.max_image_pixels)
        if request.image is not None and request.mode is not Mode.TEXT_TO_IMAGE:
            image = decode_image(request.image, max_pixels, "image")
            height, width = image.shape[:2]
            if request.width and (request.width, request.height) != (width, height):
                raise InvalidInput(
                    f"settings asks for {request.width}x{request.height} but the image is {width}x{height}; "
                    "leave width and height 0 or match the image"
                )
            self._check_size(width, height, "image", count)
        if request.mask is not None and request.mode is Mode.INPAINT:
            rgb = decode_image(request.mask, max_pixels, "mask")
            if rgb.shape[:2] != (height, width):
                raise InvalidInput(
                    f"mask is {rgb.shape[1]}x{rgb.shape[0]} but the image is {width}x{height}; they must match"
                )
            mask = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.uint8)
        seed = secrets.randbits(63) if request.seed is None else request.seed
        params = GenerationParams(
            mode=request.mode, width=width, height=height, steps=request.steps, guidance_scale=guidance,
            seed=seed, num_images=count, scheduler=kind, strength=strength,
        )  # fmt: skip
        texts = [request.negative_prompt, request.prompt] if params.guided else [request.prompt]
        encodings = self.tokenizer.encode(texts, truncate=True, what="prompt")
        ids = np.full((len(texts), self.tokenizer.max_length), self.tokenizer.pad_id, dtype=np.int64)
        for row, enc in enumerate(encodings):
            ids[row, : len(enc.ids)] = enc.ids
        return _Checked(params, ids, image, mask)

    def _resolve_parts(self, mode: Mode) -> dict[str, ServedModel]:
        lookup = self.context.models
        if lookup is None:
            raise TaskConfigError("image generation needs the server's model lookup (TaskContext.models)")
        wanted = ["text_encoder", "vae_decoder"]
        if mode is not Mode.TEXT_TO_IMAGE:
            wanted.append("vae_encoder")
        if "vae_encoder" in wanted and "vae_encoder" not in self.part_names:
            raise InvalidInput(f"model {self.model.name!r} has no VAE encoder part; it serves TextToImage only")
        return {key: lookup(self.part_names[key]) for key in wanted}

    # -- running ---------------------------------------------------------------------

    def _encode(self, pixels: np.ndarray, fmt: OutputFormat) -> tuple[bytes, ...]:
        if fmt is OutputFormat.RAW_RGB:
            return tuple(np.ascontiguousarray(p).tobytes() for p in pixels)
        return tuple(_png(p) for p in pixels)

    async def generate(self, request: ImageRequest, options: CallOptions) -> AsyncGenerator[GenerationEvent, None]:
        """Progress after each step, then the images (the last event)."""
        checked = await self.offload("preprocess", self._prepare, request)
        parts = self._resolve_parts(request.mode)
        if self.active >= self.max_concurrent:
            raise Overloaded(
                f"model {self.model.name!r} is running {self.active} generations, its limit; retry with backoff"
            )
        self.active += 1
        try:
            events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()

            async def on_step(step: int, total: int, latents: np.ndarray) -> None:
                previews: tuple[bytes, ...] = ()
                if request.preview:
                    previews = await self.offload(
                        "postprocess", lambda: tuple(_png(p) for p in latent_preview(latents))
                    )
                events.put_nowait(GenerationProgress(step, total, previews))
                if options.deadline is not None and time.monotonic() > options.deadline and step < total:
                    raise DeadlineExceeded(f"the deadline passed after step {step} of {total}; no images")

            async def run() -> None:
                try:
                    served = _ServedParts(self.model, parts, options)
                    pixels = await generate(
                        served, self.spec, checked.params, checked.token_ids, checked.image, checked.mask, on_step
                    )
                    encoded = await self.offload("postprocess", self._encode, pixels, request.output_format)
                    p = checked.params
                    events.put_nowait(
                        GeneratedImages(
                            images=encoded,
                            width=p.width,
                            height=p.height,
                            seeds=tuple(image_seed(p.seed, i) for i in range(p.num_images)),
                            steps=denoising_steps(p.steps, p.strength),
                            output_format=request.output_format,
                        )  # fmt: skip
                    )
                except Exception as err:  # handed to the consumer, which raises it
                    events.put_nowait(err)

            runner = asyncio.ensure_future(run())
            try:
                while True:
                    event = await events.get()
                    if isinstance(event, BaseException):
                        raise event
                    yield event
                    if isinstance(event, GeneratedImages):
                        return
            finally:
                # The consumer stopped (cancelled, deadline, error): stop the loop at the step it awaits.
                runner.cancel()
        finally:
            self.active -= 1

    async def run(self, request: ImageRequest, options: CallOptions) -> GeneratedImages:
        """The images only (the unary calls)."""
        # Closed here, not by the garbage collector: the generation's slot is freed at once.
        async with contextlib.aclosing(self.generate(request, options)) as events:
            async for event in events:
                if isinstance(event, GeneratedImages):
                    return event
        raise AssertionError("generate ends with the images")  # pragma: no cover
