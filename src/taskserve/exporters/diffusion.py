"""``taskserve-export diffusers``: a Stable Diffusion pipeline folder (or hub id) -> four
repository entries the server serves as one image-generation pipeline.

    NAME               the UNet; task image-generation; tokenizer and scheduler config;
                       task_options.parts names the three others
    NAME-text-encoder  CLIP text encoder (input_ids -> last_hidden_state), task tensor
    NAME-vae-decoder   latents -> image, task tensor
    NAME-vae-encoder   image -> latent mean and log-variance, task tensor

Each part goes through the usual export pipeline (export, validate against torch,
optimize, optional fp16) with its own batcher. Then the whole pipeline is validated:
the server's numpy denoising loop over the exported parts against diffusers' own torch
pipeline, same scheduler, steps and noise, for each call and scheduler (a table of max
abs pixel differences). Only then are the entries moved into the repository.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from taskserve.exporters.attention_cost import attention_bytes
from taskserve.exporters.errors import ExportError, UsageError, ValidationFailed
from taskserve.exporters.pipeline import ExportOptions, run_export
from taskserve.exporters.progress import Steps, format_table
from taskserve.exporters.repository_entry import check_writable
from taskserve.exporters.spec import ExportedModel
from taskserve.exporters.validate import open_session
from taskserve.server.tasks.diffusion.budget import DEFAULT_BUDGET, AttentionBudget
from taskserve.server.tasks.diffusion.pipeline import (
    GenerationParams,
    Mode,
    PipelineSpec,
    denoising_steps,
    draw_noise,
    generate,
    spec_from_options,
)
from taskserve.server.tasks.diffusion.schedulers import SchedulerKind
from taskserve.server.tasks.image_generation import ImageGenerationOptions

log = logging.getLogger("taskserve.exporters.diffusion")

PARTS = {"text_encoder": "text-encoder", "vae_decoder": "vae-decoder", "vae_encoder": "vae-encoder"}
TORCH_SCHEDULERS = {
    SchedulerKind.DDIM: "DDIMScheduler",
    SchedulerKind.EULER: "EulerDiscreteScheduler",
    SchedulerKind.DPM_SOLVER_PP: "DPMSolverMultistepScheduler",
}
# Largest pixel difference (0-255) accepted between the served pipeline and diffusers' (fp32).
PIXEL_TOLERANCE = 2


def part_names(name: str) -> dict[str, str]:
    return {key: f"{name}-{suffix}" for key, suffix in PARTS.items()}


def load_pipeline(model: str | Path) -> Any:
    """A diffusers pipeline from a local folder or a hub id (needs a network)."""
    from diffusers import DiffusionPipeline

    ref = str(model)
    try:
        pipe = DiffusionPipeline.from_pretrained(ref, safety_checker=None, requires_safety_checker=False)
    except Exception as err:  # hub, file and config errors come in many types
        raise UsageError(f"cannot load a diffusers pipeline from {ref!r}: {err}") from None
    missing = [p for p in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if getattr(pipe, p, None) is None]
    if missing:
        raise UsageError(
            f"{ref!r} is a {type(pipe).__name__} without {missing}; export a Stable Diffusion "
            "(StableDiffusionPipeline or StableDiffusionInpaintPipeline) folder"
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _modules(pipe: Any) -> dict[str, tuple[Any, dict[str, Any], list[str], dict[str, dict[int, str]]]]:
    """Per part: (module, example inputs, output names, dynamic axes)."""
    import torch

    class TextEncoder(torch.nn.Module):
        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.encoder(input_ids, return_dict=False)[0]  # type: ignore[no-any-return]

    class UNet(torch.nn.Module):
        def __init__(self, unet: Any) -> None:
            super().__init__()
            self.unet = unet

        def forward(self, sample: torch.Tensor, timestep: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
            return self.unet(sample, timestep, hidden, return_dict=False)[0]  # type: ignore[no-any-return]

    class VaeDecoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, latents: torch.Tensor) -> torch.Tensor:
            return self.vae.decode(latents, return_dict=False)[0]  # type: ignore[no-any-return]

    class VaeEncoder(torch.nn.Module):
        def __init__(self, vae: Any) -> None:
            super().__init__()
            self.vae = vae

        def forward(self, pixels: torch.Tensor) -> torch.Tensor:
            moments = self.vae.encoder(pixels)
            if self.vae.quant_conv is not None:
                moments = self.vae.quant_conv(moments)
            return moments  # type: ignore[no-any-return]

    gen = torch.Generator().manual_seed(0)
    length = int(pipe.tokenizer.model_max_length)
    hidden = int(pipe.text_encoder.config.hidden_size)
    vsf = int(pipe.vae_scale_factor)
    latent = 8  # latent pixels of the example: a multiple of every UNet's down-sampling
    ids = torch.tensor([pipe.tokenizer("a photo", padding="max_length", max_length=length).input_ids])
    image_axes = {0: "batch", 2: "height", 3: "width"}
    pixels = torch.rand((1, 3, latent * vsf, latent * vsf), generator=gen) * 2 - 1
    return {
        "text_encoder": (TextEncoder(pipe.text_encoder), {"input_ids": ids}, ["last_hidden_state"],
                         {"input_ids": {0: "batch"}, "last_hidden_state": {0: "batch"}}),
        "unet": (
            UNet(pipe.unet),
            {
                "sample": torch.randn((1, pipe.unet.config.in_channels, latent, latent), generator=gen),
                "timestep": torch.tensor([500.0]),
                "encoder_hidden_states": torch.randn((1, length, hidden), generator=gen),
            },
            ["out_sample"],
            {"sample": image_axes, "timestep": {0: "batch"}, "encoder_hidden_states": {0: "batch"},
             "out_sample": image_axes},
        ),
        "vae_decoder": (VaeDecoder(pipe.vae), {"latent_sample": torch.randn((1, 4, latent, latent), generator=gen)},
                        ["sample"], {"latent_sample": image_axes, "sample": image_axes}),
        "vae_encoder": (VaeEncoder(pipe.vae), {"sample": pixels},
                        ["latent_parameters"], {"sample": image_axes, "latent_parameters": image_axes}),
    }  # fmt: skip


def _never_padded(exported: ExportedModel) -> ExportedModel:
    """Images and latents of different sizes never share a batch: no padding, sizes join the key.
    No CPU memory arena either: it would keep the largest size's peak for good."""
    runtime = {**exported.runtime, "cpu_memory_arena": False}
    if exported.inputs is None:
        return dataclasses.replace(exported, runtime=runtime)
    inputs = [dataclasses.replace(t, padding="none") if -1 in t.dims else t for t in exported.inputs]
    return dataclasses.replace(exported, inputs=inputs, runtime=runtime)


def _tokenizer_files(pipe: Any, work: Path) -> dict[str, Path]:
    """tokenizer.json (converted from CLIP's slow vocab/merges when the folder lacks it) and its config."""
    from transformers import CLIPTokenizerFast

    slow, fast = work / "slow", work / "fast"
    pipe.tokenizer.save_pretrained(slow)
    CLIPTokenizerFast.from_pretrained(slow).save_pretrained(fast)
    return {f: fast / f for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")}


def _memory_budget(cost_per_pixel2: float, vsf: int, default_size: int) -> int:
    """The default budget, raised (to whole GiB) when one image of the default size needs more."""
    needed = AttentionBudget(cost_per_pixel2, DEFAULT_BUDGET, vsf).cost(default_size, default_size, 1)
    gib = 1 << 30
    return max(DEFAULT_BUDGET, -(-needed // gib) * gib)


def _task_options(pipe: Any, name: str, max_images: int, cost_per_pixel2: float) -> dict[str, Any]:
    vsf = int(pipe.vae_scale_factor)
    levels = len(pipe.unet.config.block_out_channels)
    default_size = int(pipe.unet.config.sample_size) * vsf
    return {
        "parts": part_names(name),
        "latent_channels": int(pipe.vae.config.latent_channels),
        "unet_in_channels": int(pipe.unet.config.in_channels),
        "vae_scale_factor": vsf,
        "scaling_factor": float(pipe.vae.config.scaling_factor),
        # The exported UNet has fixed up-sampling: latents divisible by its down-sampling.
        "size_multiple": max(8, vsf * 2 ** (levels - 1)),
        "default_size": default_size,
        # The ceiling; the server lowers it to what attention_memory_budget affords.
        "max_pixels": 1024 * 1024,
        "attention_bytes": cost_per_pixel2,
        "attention_memory_budget": _memory_budget(cost_per_pixel2, vsf, default_size),
        "max_steps": 150,
        "max_images": max_images,
        "default_scheduler": SchedulerKind.DDIM.value,
        "scheduler_config": "scheduler_config.json",
        "tokenizer": "tokenizer.json",
        "max_length": int(pipe.tokenizer.model_max_length),
    }


# -- validation: the served loop over ONNX parts vs diffusers' torch pipeline ------------------


class OnnxParts:
    """The pipeline's parts as onnxruntime sessions over written entries (``Parts``)."""

    def __init__(self, repo: Path, name: str) -> None:
        names = {"unet": name, **part_names(name)}
        self._sessions = {key: open_session(repo / entry / "1" / "model.onnx") for key, entry in names.items()}

    def _run(self, key: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        session = self._sessions[key]
        out: np.ndarray = session.run(None, feeds)[0]
        return out

    async def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self._run("text_encoder", {"input_ids": input_ids.astype(np.int64)})

    async def unet(self, sample: np.ndarray, timestep: np.ndarray, hidden: np.ndarray) -> np.ndarray:
        return self._run("unet", {"sample": sample, "timestep": timestep, "encoder_hidden_states": hidden})

    async def decode(self, latents: np.ndarray) -> np.ndarray:
        return self._run("vae_decoder", {"latent_sample": latents})

    async def encode_image(self, pixels: np.ndarray) -> np.ndarray:
        return self._run("vae_encoder", {"sample": pixels})


def token_ids(tokenizer: Any, prompt: str, negative: str, guided: bool) -> np.ndarray:
    """(2 or 1, 77) ids as the server builds them: padded to max length, cut there."""
    texts = [negative, prompt] if guided else [prompt]
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True).input_ids
    return np.asarray(ids, dtype=np.int64)


@contextlib.contextmanager
def injected_noise(draws: Sequence[np.ndarray]) -> Iterator[None]:
    """Make diffusers' pipelines draw ``draws`` (in order) instead of torch's generator, so
    both sides start from the same noise. Draws past the list (a 4-channel inpainting
    pipeline's unused masked-image sample) are zeros."""
    import importlib

    import torch

    queue = list(draws)
    modules = [
        importlib.import_module(m)
        for m in (
            "diffusers.models.autoencoders.vae",
            "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion",
            "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img",
            "diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_inpaint",
        )
    ]

    def fake(shape: Any, generator: Any = None, device: Any = None, dtype: Any = None, layout: Any = None) -> Any:
        if not queue:
            return torch.zeros(tuple(shape), dtype=dtype or torch.float32)
        value = torch.from_numpy(queue.pop(0).copy()).reshape(tuple(shape))
        return value.to(dtype or torch.float32)

    saved = [getattr(m, "randn_tensor") for m in modules]  # noqa: B009 (modules typed as ModuleType)
    try:
        for m in modules:
            setattr(m, "randn_tensor", fake)  # noqa: B010
        yield
    finally:
        for m, original in zip(modules, saved, strict=True):
            setattr(m, "randn_tensor", original)  # noqa: B010


def diffusers_reference(
    pipe: Any,
    spec: PipelineSpec,
    params: GenerationParams,
    prompt: str,
    negative_prompt: str = "",
    image: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """diffusers' own pipeline, image by image, with the server's noise: (n, H, W, 3) uint8.

    Strength is passed so that diffusers' int(strength * steps) equals the server's
    round(strength * steps). Inpainted images get the server's pixel-space blend."""
    import diffusers
    from PIL import Image

    scheduler = getattr(diffusers, TORCH_SCHEDULERS[params.scheduler]).from_config(spec.scheduler_config)
    components = {**pipe.components, "scheduler": scheduler}
    cls = {
        Mode.TEXT_TO_IMAGE: diffusers.StableDiffusionPipeline,
        Mode.IMAGE_TO_IMAGE: diffusers.StableDiffusionImg2ImgPipeline,
        Mode.INPAINT: diffusers.StableDiffusionInpaintPipeline,
    }[params.mode]
    runner = cls(**components, requires_safety_checker=False)
    runner.set_progress_bar_config(disable=True)
    kwargs: dict[str, Any] = {
        "prompt": prompt, "negative_prompt": negative_prompt, "height": params.height, "width": params.width,
        "num_inference_steps": params.steps, "guidance_scale": params.guidance_scale, "output_type": "np",
    }  # fmt: skip
    if params.mode is not Mode.TEXT_TO_IMAGE:
        assert image is not None
        run = denoising_steps(params.steps, params.strength)
        kwargs["image"] = Image.fromarray(image)
        kwargs["strength"] = 1.0 if run == params.steps else (run + 0.5) / params.steps
    if params.mode is Mode.INPAINT:
        assert mask is not None
        kwargs["mask_image"] = Image.fromarray(mask, mode="L")
    h, w = params.height // spec.vae_scale_factor, params.width // spec.vae_scale_factor
    images = []
    for i in range(params.num_images):
        one = dataclasses.replace(params, num_images=1, seed=(params.seed + i) % (1 << 64))
        noise = draw_noise(one, spec, (spec.latent_channels, h, w))
        with injected_noise([v[0] for v in noise.values()]):
            out = runner(**kwargs).images
        images.append((np.asarray(out[0]) * 255).round().astype(np.uint8))
    result = np.stack(images)
    if params.mode is Mode.INPAINT:
        assert image is not None and mask is not None
        keep = (mask.astype(np.float32) / 255.0) < 0.5
        result = np.where(keep[None, :, :, None], image[None], result)
    return result


@dataclass(frozen=True)
class PipelineCheck:
    call: str
    scheduler: str
    steps: int
    max_abs_pixel_diff: int
    tolerance: int

    @property
    def ok(self) -> bool:
        return self.max_abs_pixel_diff <= self.tolerance


def _check_cases(size: int) -> list[tuple[Mode, SchedulerKind, np.ndarray | None, np.ndarray | None]]:
    rng = np.random.default_rng(7)
    image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=np.uint8)
    mask[size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 255
    cases: list[tuple[Mode, SchedulerKind, np.ndarray | None, np.ndarray | None]] = [
        (Mode.TEXT_TO_IMAGE, kind, None, None) for kind in SchedulerKind
    ]
    cases.append((Mode.IMAGE_TO_IMAGE, SchedulerKind.EULER, image, None))
    cases.append((Mode.INPAINT, SchedulerKind.DPM_SOLVER_PP, image, mask))
    return cases


def validate_pipeline(
    pipe: Any, repo: Path, name: str, steps: int = 3, tolerance: int = PIXEL_TOLERANCE
) -> list[PipelineCheck]:
    """Every call through the exported parts vs diffusers, at the smallest valid size."""
    config_path = repo / name / "config.yaml"
    import yaml

    options = yaml.safe_load(config_path.read_text())["task_options"]
    scheduler_config = json.loads((repo / name / options["scheduler_config"]).read_text())
    spec = spec_from_options(ImageGenerationOptions.model_validate(options), scheduler_config)
    parts = OnnxParts(repo, name)
    size = int(options["size_multiple"]) * max(1, 32 // int(options["size_multiple"]))
    checks = []
    for mode, kind, image, mask in _check_cases(size):
        if mode is Mode.TEXT_TO_IMAGE and spec.unet_in_channels != spec.latent_channels:
            continue  # an inpainting UNet only inpaints
        if mode is Mode.IMAGE_TO_IMAGE and spec.unet_in_channels != spec.latent_channels:
            continue
        params = GenerationParams(
            mode=mode, width=size, height=size, steps=steps, guidance_scale=7.5, seed=1234, num_images=1,
            scheduler=kind, strength=0.7 if mode is Mode.IMAGE_TO_IMAGE else 1.0,
        )  # fmt: skip
        ids = token_ids(pipe.tokenizer, "a cat on the mat", "blurry", params.guided)
        ours = asyncio.run(generate(parts, spec, params, ids, image, mask))
        theirs = diffusers_reference(pipe, spec, params, "a cat on the mat", "blurry", image, mask)
        diff = int(np.abs(ours.astype(np.int16) - theirs.astype(np.int16)).max())
        run = denoising_steps(steps, params.strength)
        checks.append(PipelineCheck(mode.value, kind.value, run, diff, tolerance))
    return checks


def checks_table(checks: Sequence[PipelineCheck]) -> str:
    rows = [
        (c.call, c.scheduler, c.steps, c.max_abs_pixel_diff, c.tolerance, "ok" if c.ok else "MISMATCH") for c in checks
    ]
    return format_table(("call", "scheduler", "steps", "max |pixel diff|", "tolerance", "status"), rows)


# -- the export ------------------------------------------------------------------------------


@dataclass
class DiffusersExport:
    entries: list[Path]
    checks: list[PipelineCheck]
    summary: str


def export_diffusers(
    model: str | Path,
    out: Path,
    name: str,
    *,
    max_batch_size: int = 8,
    max_images: int = 4,
    fp16: bool = False,
    optimize: bool = True,
    validate: bool = True,
    validation_steps: int = 3,
    progress: bool = True,
    stream: TextIO | None = None,
    tags: Mapping[str, Any] | None = None,
) -> DiffusersExport:
    """Export a Stable Diffusion pipeline as four entries under ``out`` (see the module doc)."""
    from taskserve.exporters.sources.torch_module import export_module

    out = Path(out)
    check_writable(out)
    ExportOptions(out=out, name=name).check()
    stream = stream or sys.stderr
    names = part_names(name)
    step_names = ["load", *(f"export {k}" for k in ("text_encoder", "unet", "vae_decoder", "vae_encoder"))]
    step_names += ["validate pipeline", "install"]
    steps = Steps(name, step_names, stream=stream, enabled=progress)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.staging-", dir=out))
    checks: list[PipelineCheck] = []
    try:
        with steps.step("load") as rec:
            pipe = load_pipeline(model)
            rec.detail = f"{type(pipe).__name__}, UNet in_channels {pipe.unet.config.in_channels}"
        modules = _modules(pipe)
        cost_per_pixel2 = attention_bytes(pipe, modules)
        common: dict[str, Any] = {
            "fp16": fp16, "optimize": optimize, "progress": False, "stream": stream, "tags": dict(tags or {}),
        }  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="taskserve-diffusers-") as tmp:
            extra = _tokenizer_files(pipe, Path(tmp))
            sched_path = Path(tmp) / "scheduler_config.json"
            sched_path.write_text(json.dumps(dict(pipe.scheduler.config), indent=2, default=str))
            extra["scheduler_config.json"] = sched_path
            for key in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
                module, example, outputs, axes = modules[key]
                entry = name if key == "unet" else names[key]
                task = "image-generation" if key == "unet" else "tensor"
                options = _task_options(pipe, name, max_images, cost_per_pixel2) if key == "unet" else {}
                files = extra if key == "unet" else {}

                def source(work: Path, module: Any = module, example: Any = example, outputs: Any = outputs,
                           axes: Any = axes, task: str = task, options: Any = options,
                           files: Any = files, key: str = key) -> ExportedModel:  # fmt: skip
                    exported = export_module(
                        module, example, work, output_names=outputs, task=task, dynamic_axes=axes,
                        task_options=options, max_batch_size=max_batch_size,
                        source={"kind": "diffusers", "model": str(model), "part": key},
                    )  # fmt: skip
                    exported.extra_files.update(files)
                    return _never_padded(exported)

                with steps.step(f"export {key}") as rec:
                    result = run_export(source, ExportOptions(out=staging, name=entry, **common), f"{key} of {model}")
                    rec.detail = f"{entry}: max abs diff {max(d.max_abs_diff for d in result.diffs):.2e}"
        if validate:
            with steps.step("validate pipeline") as rec:
                try:
                    checks = validate_pipeline(pipe, staging, name, validation_steps)
                except Exception as err:  # onnxruntime CPU lacks fp16 kernels for some ops
                    if not fp16:
                        raise
                    rec.detail = f"fp16: not checked on CPU ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
                if checks:
                    worst = max(c.max_abs_pixel_diff for c in checks)
                    rec.detail = f"{len(checks)} calls vs diffusers, max |pixel diff| {worst}"
                    if any(not c.ok for c in checks) and not fp16:
                        raise ValidationFailed("the served pipeline differs from diffusers':\n" + checks_table(checks))
        else:
            steps.skip("validate pipeline", "--no-validate")
        with steps.step("install") as rec:
            entries = []
            for entry in [name, *names.values()]:
                entries.append(_install(staging / entry, out / entry))
            rec.detail = ", ".join(e.name for e in entries)
    finally:
        steps.close()
        shutil.rmtree(staging, ignore_errors=True)
    summary = steps.summary() + ("\n\n" + checks_table(checks) if checks else "")
    if progress:
        print(summary, file=stream)
    return DiffusersExport(entries, checks, summary)


def _install(src: Path, target: Path) -> Path:
    """Move a staged entry into place, replacing an older one."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
        os.rename(src, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(src, target)
    return target


__all__ = [
    "DiffusersExport",
    "ExportError",
    "OnnxParts",
    "PipelineCheck",
    "diffusers_reference",
    "export_diffusers",
    "injected_noise",
    "load_pipeline",
    "token_ids",
    "validate_pipeline",
]
