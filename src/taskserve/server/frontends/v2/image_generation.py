"""The plain v2 face of an image-generation model: a prompt in, PNG images out.

Inputs: ``prompt`` (BYTES, [1]), optional ``negative_prompt`` (BYTES, [1]) and
``parameters`` (BYTES, [1]: a JSON object with ``width``, ``height`` or ``size``
("512x512"), ``steps``, ``guidance_scale``, ``seed``, ``num_images``, ``scheduler``
(ddim, euler, dpm-solver++)). The same keys may come as request parameters; the
``parameters`` input wins where both set one. Outputs: ``image`` (BYTES, [n]: one PNG
per image) and ``seed`` (INT64, [n]: each image's seed, to reproduce it).

The UNet, text encoder and VAE tensors stay internal; the typed ImageGeneration service
(image to image, inpainting, progress previews) runs the same task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np

from taskserve.server.errors import InvalidInput
from taskserve.server.frontends.v2.values import integer, json_object
from taskserve.server.repository.config import TensorConfig
from taskserve.server.tasks.base import CallOptions
from taskserve.server.tasks.diffusion.pipeline import Mode
from taskserve.server.tasks.diffusion.schedulers import SchedulerKind
from taskserve.server.tasks.image_generation import ImageGenerator, ImageRequest, OutputFormat

INPUTS = (
    TensorConfig(name="prompt", datatype="BYTES", dims=(1,)),
    TensorConfig(name="negative_prompt", datatype="BYTES", dims=(1,), optional=True),
    TensorConfig(name="parameters", datatype="BYTES", dims=(1,), optional=True),
)
OUTPUTS = (
    TensorConfig(name="image", datatype="BYTES", dims=(-1,)),
    TensorConfig(name="seed", datatype="INT64", dims=(-1,)),
)
PARAMETER_KEYS = ("width", "height", "size", "steps", "guidance_scale", "seed", "num_images", "scheduler")
# Denoising steps when the request names none (the typed service asks for them).
DEFAULT_STEPS = 25
MAX_PARAMETER_CHARS = 4096


def _text(tensors: Mapping[str, np.ndarray], name: str) -> str:
    array = tensors.get(name)
    if array is None:
        return ""
    if array.size != 1:
        raise InvalidInput(f"input {name!r} holds {array.size} elements; send exactly one")
    try:
        return bytes(array.reshape(-1)[0]).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidInput(f"input {name!r} is not valid UTF-8 text") from None


def _integer(key: str, value: object) -> int:
    return integer(f"parameter {key!r}", value)


def _size(value: object) -> tuple[int, int]:
    text = str(value)
    width, sep, height = text.partition("x")
    if not sep or not width.isdigit() or not height.isdigit() or len(text) > 16:
        raise InvalidInput(f"parameter 'size' must look like 512x512 (width x height), got {text[:40]!r}")
    return int(width), int(height)


def image_request(tensors: Mapping[str, np.ndarray], parameters: Mapping[str, object], max_steps: int) -> ImageRequest:
    """The task request the decoded tensors and request parameters make."""
    prompt = _text(tensors, "prompt")
    if not prompt.strip():
        raise InvalidInput("input 'prompt' is empty; send the text to draw")
    values: dict[str, object] = {k: parameters[k] for k in PARAMETER_KEYS if k in parameters}
    raw = _text(tensors, "parameters")
    if raw:
        parsed = json_object(raw, "parameters", PARAMETER_KEYS, MAX_PARAMETER_CHARS)
        values.update(parsed)
    width = _integer("width", values["width"]) if values.get("width") is not None else 0
    height = _integer("height", values["height"]) if values.get("height") is not None else 0
    if values.get("size") is not None:
        width, height = _size(values["size"])
    guidance = values.get("guidance_scale")
    if guidance is not None and (
        isinstance(guidance, bool) or not isinstance(guidance, (int, float)) or not math.isfinite(guidance)
    ):
        raise InvalidInput(f"parameter 'guidance_scale' must be a finite number, got {str(guidance)[:40]!r}")
    scheduler = None
    if values.get("scheduler") is not None:
        try:
            scheduler = SchedulerKind(values["scheduler"])
        except ValueError:
            raise InvalidInput(
                f"parameter 'scheduler' must be one of {[k.value for k in SchedulerKind]}, "
                f"got {str(values['scheduler'])[:40]!r}"
            ) from None
    steps = _integer("steps", values["steps"]) if values.get("steps") is not None else min(DEFAULT_STEPS, max_steps)
    return ImageRequest(
        mode=Mode.TEXT_TO_IMAGE, prompt=prompt, negative_prompt=_text(tensors, "negative_prompt"),
        width=width, height=height, steps=steps,
        guidance_scale=float(guidance) if guidance is not None else None,
        seed=_integer("seed", values["seed"]) if values.get("seed") is not None else None,
        num_images=_integer("num_images", values["num_images"]) if values.get("num_images") is not None else 0,
        scheduler=scheduler, output_format=OutputFormat.PNG,
    )  # fmt: skip


async def generate(
    task: ImageGenerator, tensors: Mapping[str, np.ndarray], parameters: Mapping[str, object], options: CallOptions
) -> dict[str, np.ndarray]:
    """Run the request to its images: ``image`` (PNG bytes) and ``seed`` per image."""
    request = image_request(tensors, parameters, task.max_steps)
    result = await task.run(request, options)
    images = np.empty(len(result.images), dtype=np.object_)
    images[:] = list(result.images)
    return {"image": images, "seed": np.asarray(result.seeds, dtype=np.int64)}
