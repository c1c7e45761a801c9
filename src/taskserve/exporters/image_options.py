"""Image preprocessing written to ``task_options.image``, and a reference implementation.

Formula, per channel: ``(pixel * rescale_factor - mean) / std`` on RGB values 0..255
after resizing, laid out NCHW.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

_RESAMPLE_NAMES = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}
_RESAMPLE = {v: k for k, v in _RESAMPLE_NAMES.items()}


def image_options(
    size: tuple[int, int],
    mean: list[float],
    std: list[float],
    rescale_factor: float,
    resample: str = "bilinear",
    resize_mode: str = "exact",
    crop: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """``resize_mode`` "exact" resizes to ``size`` [height, width]; "shortest_edge" scales the
    shorter side to ``size[0]`` keeping the aspect ratio, then center-crops to ``crop`` if set."""
    options: dict[str, Any] = {
        "size": [int(size[0]), int(size[1])],
        "resize_mode": resize_mode,
        "resample": resample,
        "rescale_factor": float(rescale_factor),
        "mean": [float(m) for m in mean],
        "std": [float(s) for s in std],
        "channel_order": "RGB",
        "layout": "NCHW",
    }
    if crop is not None:
        options["crop"] = [int(crop[0]), int(crop[1])]
    return options


def input_hw(options: dict[str, Any]) -> tuple[int, int] | None:
    """Height and width of the model input, or None when it varies per image."""
    if "crop" in options:
        return options["crop"][0], options["crop"][1]
    if options["resize_mode"] == "exact":
        return options["size"][0], options["size"][1]
    return None


def from_hf_processor(processor: Any) -> dict[str, Any]:
    """Translate a transformers image processor's settings."""
    size = dict(getattr(processor, "size", None) or {"height": 224, "width": 224})
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None
    if "height" in size and "width" in size:
        hw, mode = (size["height"], size["width"]), "exact"
    else:
        edge = size.get("shortest_edge", 224)
        hw, mode = (edge, edge), "shortest_edge"
    crop_hw = (crop["height"], crop["width"]) if crop else None
    do_rescale = getattr(processor, "do_rescale", True)
    do_normalize = getattr(processor, "do_normalize", True)
    mean = list(processor.image_mean) if do_normalize else [0.0, 0.0, 0.0]
    std = list(processor.image_std) if do_normalize else [1.0, 1.0, 1.0]
    resample = getattr(processor, "resample", 2)
    return image_options(
        hw,
        mean,
        std,
        float(getattr(processor, "rescale_factor", 1 / 255)) if do_rescale else 1.0,
        _RESAMPLE_NAMES.get(int(resample), "bilinear"),
        mode,
        crop_hw,
    )


def preprocess(image: Image.Image, options: dict[str, Any]) -> np.ndarray:
    """Reference preprocessing: one image -> float32 [3, H, W]."""
    image = image.convert("RGB")
    resample = Image.Resampling(_RESAMPLE[options["resample"]])
    h, w = options["size"]
    if options["resize_mode"] == "exact":
        image = image.resize((w, h), resample)
    else:
        scale = h / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), resample)
    if "crop" in options:
        ch, cw = options["crop"]
        left, top = (image.width - cw) // 2, (image.height - ch) // 2
        image = image.crop((left, top, left + cw, top + ch))
    pixels = np.asarray(image, dtype=np.float32) * options["rescale_factor"]
    pixels = (pixels - np.asarray(options["mean"], np.float32)) / np.asarray(options["std"], np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))
