"""The Stable Diffusion denoising loop in numpy around four model calls.

``generate`` runs text-to-image, image-to-image and inpainting the way diffusers'
``StableDiffusion(Img2Img|Inpaint)Pipeline`` does (same conditioning, guidance, scheduler
calls and post-processing), over a ``Parts`` object that runs the text encoder, UNet and
VAE. The task's ``Parts`` sends each call to that part's batcher; the exporter's runs
onnxruntime sessions directly, to validate an export against diffusers.

Randomness is numpy's: image i of a request draws from ``PCG64(seed + i)``, float32
standard normals, in this order (``noise_order``): the VAE sample of the input image
(image-to-image; inpainting with a 4-channel UNet or strength < 1), the initial latent
noise, then the VAE sample of the masked image (9-channel inpainting UNets).
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from taskserve.server.tasks.diffusion.schedulers import DiffusionScheduler, SchedulerKind, make_scheduler

F32 = np.float32
# Stable Diffusion 1.x latents -> approximate RGB: a linear map good enough for a progress preview.
_LATENT_RGB = np.array(
    [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]], dtype=F32
)


class Mode(enum.Enum):
    TEXT_TO_IMAGE = "text-to-image"
    IMAGE_TO_IMAGE = "image-to-image"
    INPAINT = "inpaint"


@dataclass(frozen=True)
class PipelineSpec:
    """What a pipeline's parts are (written by the exporter into task_options)."""

    latent_channels: int
    # 4: a text-to-image UNet (inpainting blends latents); 9: an inpainting UNet.
    unet_in_channels: int
    # Pixels per latent pixel.
    vae_scale_factor: int
    # Latents are scaled by this after encoding and divided by it before decoding.
    scaling_factor: float
    scheduler_config: dict[str, Any]


@dataclass(frozen=True)
class GenerationParams:
    mode: Mode
    width: int
    height: int
    steps: int
    guidance_scale: float
    seed: int
    num_images: int
    scheduler: SchedulerKind
    # In (0, 1]: the share of ``steps`` run (image-to-image, inpainting).
    strength: float = 1.0

    @property
    def guided(self) -> bool:
        return self.guidance_scale > 1.0


class SpecOptions(Protocol):
    """The task_options a spec is made of (``ImageGenerationOptions``, typed and checked)."""

    @property
    def latent_channels(self) -> int: ...
    @property
    def unet_in_channels(self) -> int: ...
    @property
    def vae_scale_factor(self) -> int: ...
    @property
    def scaling_factor(self) -> float: ...


def spec_from_options(options: SpecOptions, scheduler_config: Mapping[str, Any]) -> PipelineSpec:
    """The spec the exporter wrote into task_options; ``ValueError`` says what is wrong."""
    spec = PipelineSpec(
        latent_channels=options.latent_channels,
        unet_in_channels=options.unet_in_channels,
        vae_scale_factor=options.vae_scale_factor,
        scaling_factor=options.scaling_factor,
        scheduler_config=dict(scheduler_config),
    )
    if spec.unet_in_channels not in (spec.latent_channels, 2 * spec.latent_channels + 1):
        raise ValueError(
            f"task_options.unet_in_channels {spec.unet_in_channels} fits neither a text-to-image UNet "
            f"({spec.latent_channels}) nor an inpainting UNet ({2 * spec.latent_channels + 1})"
        )
    if spec.vae_scale_factor < 1:
        raise ValueError("task_options.vae_scale_factor must be >= 1")
    return spec


class Parts(Protocol):
    """The pipeline's models; every array's first axis is rows."""

    async def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        """(rows, length) token ids -> (rows, length, hidden) hidden states."""

    async def unet(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        """(rows, C, h, w), (rows,) float32, (rows, length, hidden) -> predicted noise (rows, 4, h, w)."""

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        """(rows, 4, h, w) unscaled latents -> (rows, 3, H, W) images in about [-1, 1]."""

    async def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        """(rows, 3, H, W) images in [-1, 1] -> (rows, 2 * 4, h, w) mean and log-variance."""


# Called after each step with (step done, total steps, current latents).
StepCallback = Callable[[int, int, np.ndarray], Awaitable[None]]


def denoising_steps(steps: int, strength: float) -> int:
    """Steps run at ``strength``: round(strength * steps), at least 1."""
    if strength >= 1.0:
        return steps
    return max(1, min(steps, int(np.floor(strength * steps + 0.5))))


def noise_order(mode: Mode, unet_in_channels: int, strength: float) -> tuple[str, ...]:
    """The draws of one image's generator, in order (see the module docstring)."""
    draws: list[str] = []
    if mode is Mode.IMAGE_TO_IMAGE or (mode is Mode.INPAINT and (unet_in_channels == 4 or strength < 1.0)):
        draws.append("image")
    draws.append("initial")
    if mode is Mode.INPAINT and unet_in_channels > 4:
        draws.append("masked_image")
    return tuple(draws)


def image_seed(seed: int, index: int) -> int:
    return (seed + index) % (1 << 64)


def draw_noise(params: GenerationParams, spec: PipelineSpec, latent_shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Every image's noise, stacked over images, keyed by ``noise_order``'s names."""
    names = noise_order(params.mode, spec.unet_in_channels, params.strength)
    per_image: dict[str, list[np.ndarray]] = {name: [] for name in names}
    for i in range(params.num_images):
        rng = np.random.Generator(np.random.PCG64(image_seed(params.seed, i)))
        for name in names:
            per_image[name].append(rng.standard_normal(latent_shape, dtype=F32))
    return {name: np.stack(arrays) for name, arrays in per_image.items()}


def to_model_pixels(image: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 -> (1, 3, H, W) float32 in [-1, 1], as diffusers' image processor."""
    x = image.astype(F32) / F32(255.0)
    out: np.ndarray = (F32(2.0) * x - F32(1.0)).transpose(2, 0, 1)[None]
    return out


def binarize_mask(mask: np.ndarray) -> np.ndarray:
    """(H, W) uint8 grayscale -> (H, W) float32 of 0 and 1 (>= 0.5 after /255 repaints)."""
    m = mask.astype(F32) / F32(255.0)
    out: np.ndarray = (m >= F32(0.5)).astype(F32)
    return out


def to_uint8(images: np.ndarray) -> np.ndarray:
    """(rows, 3, H, W) decoder output -> (rows, H, W, 3) uint8, as diffusers' post-processing."""
    x = np.clip(images.astype(F32) / F32(2.0) + F32(0.5), 0.0, 1.0).transpose(0, 2, 3, 1)
    out: np.ndarray = (x * F32(255.0)).round().astype(np.uint8)
    return out


def latent_preview(latents: np.ndarray) -> np.ndarray:
    """(rows, 4, h, w) latents -> (rows, h, w, 3) uint8, a rough image for progress messages."""
    rgb = np.einsum("bchw,cr->bhwr", latents[:, : _LATENT_RGB.shape[0]], _LATENT_RGB)
    out: np.ndarray = (np.clip((rgb + 1.0) / 2.0, 0.0, 1.0) * 255).round().astype(np.uint8)
    return out


async def _sample_latents(parts: Parts, spec: PipelineSpec, pixels: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """The VAE's latent distribution sampled with ``noise``, scaled: diffusers' retrieve_latents.

    ``pixels``: (1, 3, H, W), encoded once at pixel size; ``noise``: (n, C, h, w), one draw per
    image. The encoder's moments are the same for every image, so only the sampling repeats."""
    moments = (await parts.encode_image(pixels)).astype(F32)
    mean, logvar = np.split(moments, 2, axis=1)
    std = np.exp(F32(0.5) * np.clip(logvar, -30.0, 20.0))
    out: np.ndarray = (mean + std * noise) * F32(spec.scaling_factor)
    return out.astype(F32)


async def generate(
    parts: Parts,
    spec: PipelineSpec,
    params: GenerationParams,
    token_ids: np.ndarray,
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
    on_step: StepCallback | None = None,
) -> np.ndarray:
    """Images (num_images, H, W, 3) uint8. ``token_ids``: (2, length) negative then positive
    prompt when guided, else (1, length) the prompt. ``image``: (H, W, 3) uint8;
    ``mask``: (H, W) uint8 grayscale (inpainting). Parameters are checked by the caller."""
    n = params.num_images
    vsf = spec.vae_scale_factor
    h, w = params.height // vsf, params.width // vsf
    latent_shape = (spec.latent_channels, h, w)
    noise = draw_noise(params, spec, latent_shape)

    texts = (await parts.encode_text(token_ids)).astype(F32)
    # Rows: [negative] * n + [positive] * n when guided (diffusers' order), else [prompt] * n.
    hidden = np.repeat(texts, n, axis=0)

    scheduler: DiffusionScheduler = make_scheduler(params.scheduler, spec.scheduler_config)
    scheduler.set_timesteps(params.steps)
    run = denoising_steps(params.steps, params.strength)
    start = params.steps - run
    if start:
        scheduler.set_begin_index(start)
    timesteps = scheduler.timesteps[start:]

    pixels = to_model_pixels(image) if image is not None else None
    image_latents: np.ndarray | None = None
    if "image" in noise:
        assert pixels is not None
        image_latents = await _sample_latents(parts, spec, pixels, noise["image"])
    if params.mode is Mode.IMAGE_TO_IMAGE or params.strength < 1.0:
        # diffusers noises the image even at strength 1 in image-to-image.
        assert image_latents is not None
        latents = scheduler.add_noise(image_latents, noise["initial"], timesteps[0])
    else:
        latents = (noise["initial"] * scheduler.init_noise_sigma).astype(F32)

    mask_latents: np.ndarray | None = None
    masked_latents: np.ndarray | None = None
    if params.mode is Mode.INPAINT:
        assert mask is not None and pixels is not None
        binary = binarize_mask(mask)
        # Nearest-neighbour downsampling, as torch's interpolate: latent pixel (i, j) is pixel (vsf*i, vsf*j).
        mask_latents = np.repeat(binary[None, None, ::vsf, ::vsf], n, axis=0)
        if spec.unet_in_channels > spec.latent_channels:
            masked = pixels * (binary < 0.5).astype(F32)[None, None]
            masked_latents = await _sample_latents(parts, spec, masked, noise["masked_image"])

    for i, t in enumerate(timesteps):
        model_in = np.concatenate([latents, latents]) if params.guided else latents
        model_in = scheduler.scale_model_input(model_in, t)
        if masked_latents is not None and mask_latents is not None:
            extra = [mask_latents, masked_latents]
            if params.guided:
                extra = [np.concatenate([e, e]) for e in extra]
            model_in = np.concatenate([model_in, *extra], axis=1)
        rows = model_in.shape[0]
        predicted = (await parts.unet(model_in.astype(F32), np.full((rows,), t, dtype=F32), hidden)).astype(F32)
        if params.guided:
            uncond, cond = predicted[:n], predicted[n:]
            predicted = uncond + F32(params.guidance_scale) * (cond - uncond)
        latents = scheduler.step(predicted, t, latents)
        if mask_latents is not None and spec.unet_in_channels == spec.latent_channels:
            # A 4-channel UNet repaints everywhere: keep the (re-noised) image outside the mask.
            assert image_latents is not None
            proper = image_latents
            if i < len(timesteps) - 1:
                proper = scheduler.add_noise(image_latents, noise["initial"], timesteps[i + 1])
            latents = ((F32(1) - mask_latents) * proper + mask_latents * latents).astype(F32)
        if on_step is not None:
            await on_step(i + 1, len(timesteps), latents)

    decoded = await parts.decode((latents / F32(spec.scaling_factor)).astype(F32))
    images = to_uint8(decoded)
    if params.mode is Mode.INPAINT:
        assert image is not None and mask is not None
        # Blend in pixel space: every pixel outside the mask is the input's, byte for byte.
        keep = binarize_mask(mask) < 0.5
        images = np.where(keep[None, :, :, None], image[None], images)
    return images
