"""Images in: decoding (with a pixel limit) and the resize / crop / normalize a
vision model expects.

Blocking numpy and Pillow work: call it on the task worker pool.
"""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taskserve.server.errors import InvalidInput, LimitExceeded, caller_safe
from taskserve.server.repository.paths import resolve_inside
from taskserve.server.tasks.base import TaskConfigError

# Encoded formats accepted; others (e.g. PSD, EPS) are refused rather than parsed.
ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
# Hugging Face's default normalization (IMAGENET_STANDARD_MEAN / _STD).
_DEFAULT_MEAN = (0.5, 0.5, 0.5)
_DEFAULT_STD = (0.5, 0.5, 0.5)
_FLOAT32: np.dtype[np.generic] = np.dtype(np.float32)

# A size: one side, [height, width] or {height, width}.
Size = int | list[int] | dict[str, int]


class ImageSettings(BaseModel):
    """``task_options.image``: how a model wants its pixels (the exporter writes it; a
    Hugging Face preprocessor_config.json is read into the same form). Pixels become
    ``(pixel * rescale_factor - mean) / std``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    size: Size | None = Field(None, description="[height, width] (exact), or the shortest edge's length")
    resize_mode: Literal["exact", "shortest_edge"] = Field(
        "exact", description="exact: resize to size; shortest_edge: the shorter side to size[0], aspect kept"
    )
    crop: Size | None = Field(None, description="[height, width] center crop after resizing")
    resample: str = Field("bilinear", description="nearest, bilinear, bicubic or lanczos")
    rescale_factor: float = Field(1 / 255, description="pixel values (0..255) are multiplied by this")
    mean: float | list[float] = Field(list(_DEFAULT_MEAN), description="subtracted per channel (R, G, B)")
    std: float | list[float] = Field(list(_DEFAULT_STD), description="divided by per channel (R, G, B)")
    channel_order: str = Field("RGB", description="RGB or BGR")
    layout: str = Field("NCHW", description="NCHW or NHWC")


@dataclass(frozen=True)
class RawImage:
    """Uncompressed HWC uint8 pixels."""

    height: int
    width: int
    channels: int
    data: bytes


# An image as callers send it: encoded bytes or raw pixels.
ImageSource = bytes | RawImage


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def declared_size(source: ImageSource) -> tuple[int, int]:
    """(width, height) an image declares, read from its header without decoding pixels
    ((0, 0) when unreadable: decoding then explains). Cheap: a PNG's IHDR is read
    directly, other formats through Pillow's lazy open, which stops after the header."""
    if isinstance(source, RawImage):
        return max(0, source.width), max(0, source.height)
    if source[:8] == _PNG_SIGNATURE and len(source) >= 24 and source[12:16] == b"IHDR":
        return int.from_bytes(source[16:20], "big"), int.from_bytes(source[20:24], "big")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            width, height = Image.open(io.BytesIO(source), formats=ALLOWED_FORMATS).size
    except Exception:  # noqa: BLE001 - not an image we read; decode_image says why
        return 0, 0
    return int(width), int(height)


def check_request_pixels(images: Sequence[ImageSource], max_image: int, max_request: int, what: str) -> None:
    """Refuse, before any decoding, a request whose images declare more pixels than the
    limits allow (one image, or all together): decoding them is the costly part."""
    total = 0
    for i, image in enumerate(images):
        width, height = declared_size(image)
        if width * height > max_image:
            raise LimitExceeded(
                f"{what}[{i}] is {width}x{height} pixels, over the limit of {max_image} per image; send a smaller "
                "image (or raise limits.max_image_pixels in the model's config.yaml, or --max-image-pixels)"
            )
        total += width * height
    if total > max_request:
        raise LimitExceeded(
            f"{what}: the images declare {total} pixels together, over the limit of {max_request} per request; "
            "split the request (or raise limits.max_request_pixels in the model's config.yaml, "
            "or --max-request-pixels)"
        )


def decode_image(source: ImageSource, max_pixels: int, what: str) -> np.ndarray:
    """An RGB uint8 array (height, width, 3): the one way the server decodes an image.

    The size the image declares (its header, read by Pillow's lazy open) is checked
    against ``max_pixels`` before any pixel is decoded, so a small file declaring a huge
    size costs a header read. Raises LimitExceeded (naming the limit) past it, and
    InvalidInput for images that cannot be decoded."""
    if isinstance(source, RawImage):
        return _from_raw(source, max_pixels, what)
    if not source:
        raise InvalidInput(f"{what} is empty; send JPEG, PNG or WebP bytes or a raw array")
    try:
        with warnings.catch_warnings():
            # Pillow warns (and past twice its limit, raises) on huge images; our own limit decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(io.BytesIO(source), formats=ALLOWED_FORMATS)
            # The header gives the size before any pixel is decoded.
            width, height = opened.size
            if width * height > max_pixels:
                raise LimitExceeded(
                    f"{what} is {width}x{height} pixels, over the limit of {max_pixels}; send a smaller image"
                )
            rgb = ImageOps.exif_transpose(opened).convert("RGB")
    except InvalidInput:
        raise
    except Image.DecompressionBombError:
        raise LimitExceeded(
            f"{what} declares too many pixels (over the limit of {max_pixels}); send a smaller image"
        ) from None
    except UnidentifiedImageError:
        # Pillow's message names its file object, address included: say what went wrong instead.
        raise InvalidInput(
            f"{what} could not be decoded: it is not a {', '.join(ALLOWED_FORMATS)} image"
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        raise InvalidInput(
            f"{what} could not be decoded as {', '.join(ALLOWED_FORMATS)}: {caller_safe(str(err), 200)}"
        ) from None
    return np.asarray(rgb, dtype=np.uint8)


def _from_raw(raw: RawImage, max_pixels: int, what: str) -> np.ndarray:
    if raw.height <= 0 or raw.width <= 0:
        raise InvalidInput(f"{what}: raw height and width must be positive, got {raw.height}x{raw.width}")
    if raw.channels not in (1, 3, 4):
        raise InvalidInput(f"{what}: raw channels must be 1 (gray), 3 (RGB) or 4 (RGBA), got {raw.channels}")
    if raw.height * raw.width > max_pixels:
        raise LimitExceeded(f"{what} is {raw.width}x{raw.height} pixels, over the limit of {max_pixels}")
    expected = raw.height * raw.width * raw.channels
    if len(raw.data) != expected:
        raise InvalidInput(
            f"{what}: raw data holds {len(raw.data)} bytes; {raw.height}x{raw.width}x{raw.channels} needs {expected}"
        )
    pixels = np.frombuffer(raw.data, dtype=np.uint8).reshape(raw.height, raw.width, raw.channels)
    if raw.channels == 1:
        return np.repeat(pixels, 3, axis=2)
    return np.ascontiguousarray(pixels[:, :, :3])


def _pair(value: object, key: str, model: str) -> tuple[int, int]:
    """(height, width) from an int, a [h, w] list or a {"height", "width"} mapping."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    if isinstance(value, Mapping) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    raise TaskConfigError(
        f"model {model!r}: {key} must be a size, [height, width] or {{height, width}}; got {value!r}"
    )


@dataclass(frozen=True)
class ImagePreprocessing:
    """How a model wants its pixels: resize (to an exact size, or the shortest edge
    to a length), optional center crop, rescale, normalize, channel layout."""

    size: tuple[int, int] | None = None
    shortest_edge: int | None = None
    crop: tuple[int, int] | None = None
    resample: Image.Resampling = Image.Resampling.BILINEAR
    rescale_factor: float = 1 / 255
    mean: tuple[float, ...] = _DEFAULT_MEAN
    std: tuple[float, ...] = _DEFAULT_STD
    channels_first: bool = True
    bgr: bool = False
    dtype: np.dtype[np.generic] = _FLOAT32

    @property
    def output_size(self) -> tuple[int, int] | None:
        """(height, width) of every preprocessed image, when fixed."""
        return self.crop or self.size

    def apply(self, image: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (3, h, w) (or (h, w, 3)) normalized floats."""
        pil = Image.fromarray(image)
        if self.size is not None:
            pil = pil.resize((self.size[1], self.size[0]), self.resample)
        elif self.shortest_edge is not None:
            w, h = pil.size
            scale = self.shortest_edge / min(w, h)
            pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), self.resample)
        pixels: np.ndarray = np.asarray(pil, dtype=np.float32)
        if self.bgr:
            pixels = pixels[:, :, ::-1]
        if self.crop is not None:
            pixels = _center_crop(pixels, *self.crop)
        pixels = (pixels * self.rescale_factor - np.asarray(self.mean, np.float32)) / np.asarray(
            self.std, np.float32
        )
        if self.channels_first:
            pixels = pixels.transpose(2, 0, 1)
        return np.ascontiguousarray(pixels, dtype=self.dtype)

    def stack(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        """Preprocessed images as one batch; they must share a size."""
        shapes = {a.shape for a in arrays}
        if len(shapes) > 1:
            raise TaskConfigError(
                f"images preprocess to different sizes {sorted(shapes)}; set task_options.image.crop or "
                "resize_mode: exact so every image gets one size"
            )
        return np.stack(arrays)


def _center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    h, w = pixels.shape[:2]
    if h < height or w < width:
        # Smaller than the crop: pad with zeros around it, as Hugging Face processors do.
        padded = np.zeros((max(h, height), max(w, width), pixels.shape[2]), pixels.dtype)
        top, left = (padded.shape[0] - h) // 2, (padded.shape[1] - w) // 2
        padded[top : top + h, left : left + w] = pixels
        pixels, h, w = padded, padded.shape[0], padded.shape[1]
    top, left = (h - height) // 2, (w - width) // 2
    return pixels[top : top + height, left : left + width]


def read_preprocessor_config(
    model_dir: Path, filename: str = "preprocessor_config.json"
) -> dict[str, object]:
    path = resolve_inside(model_dir, filename, "task_options.preprocessor_config")
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else {}


_HF_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


def _from_hf(hf: Mapping[str, Any]) -> dict[str, Any]:
    """A Hugging Face preprocessor_config.json in the ``task_options.image`` format."""
    settings: dict[str, Any] = {}
    size = hf.get("size")
    if hf.get("do_resize", True) and size is not None:
        if isinstance(size, Mapping) and "shortest_edge" in size:
            settings.update(size=[size["shortest_edge"]] * 2, resize_mode="shortest_edge")
        else:
            settings.update(size=size, resize_mode="exact")
    if hf.get("do_center_crop") and hf.get("crop_size") is not None:
        settings["crop"] = hf["crop_size"]
    if isinstance(hf.get("resample"), int):
        settings["resample"] = _HF_RESAMPLE.get(hf["resample"], "bilinear")
    settings["rescale_factor"] = hf.get("rescale_factor", 1 / 255) if hf.get("do_rescale", True) else 1.0
    if hf.get("do_normalize", True):
        settings.update(mean=list(hf.get("image_mean", _DEFAULT_MEAN)), std=list(hf.get("image_std", _DEFAULT_STD)))
    else:
        settings.update(mean=[0.0, 0.0, 0.0], std=[1.0, 1.0, 1.0])
    return settings


def preprocessing_from(
    configured: ImageSettings | Mapping[str, Any] | None,
    hf: Mapping[str, Any],
    input_dims: Sequence[int] | None,
    dtype: np.dtype[np.generic],
    model: str,
    fixed_size: bool = False,
) -> ImagePreprocessing:
    """A model's preprocessing, from the first of: ``task_options.image`` (what the
    exporter writes: ``configured``, ``ImageSettings``), the Hugging Face
    ``preprocessor_config.json``, the pixel input's dims.
    ``fixed_size`` (detection, segmentation) resizes to one exact size and never
    crops, so outputs map back to the original image by scaling alone.
    """
    settings = _settings(configured if configured is not None else _from_hf(hf), model)
    layout = settings.layout.upper()
    if layout not in ("NCHW", "NHWC"):
        raise TaskConfigError(f"model {model!r}: image layout must be NCHW or NHWC, got {layout!r}")
    order = settings.channel_order.upper()
    if order not in ("RGB", "BGR"):
        raise TaskConfigError(f"model {model!r}: image channel_order must be RGB or BGR, got {order!r}")

    dims_size = None
    if input_dims is not None and len(input_dims) == 3:
        h, w = (input_dims[1], input_dims[2]) if layout == "NCHW" else (input_dims[0], input_dims[1])
        if h > 0 and w > 0:
            dims_size = (h, w)
    size = _pair(settings.size, "image size", model) if settings.size is not None else None
    mode = settings.resize_mode
    crop = _pair(settings.crop, "image crop", model) if settings.crop else None
    exact, shortest = (size, None) if mode == "exact" else (None, size[0] if size else None)
    if fixed_size:
        exact = exact or crop or dims_size or ((shortest, shortest) if shortest else None)
        shortest, crop = None, None
    elif exact is None and shortest is None:
        exact = dims_size
    if exact is None and shortest is None and crop is None:
        raise TaskConfigError(
            f"model {model!r}: no image size known; set task_options.image.size, e.g. [224, 224]"
        )

    resample_name = settings.resample
    if resample_name not in _RESAMPLE:
        raise TaskConfigError(
            f"model {model!r}: image resample must be one of {sorted(_RESAMPLE)}, got {resample_name!r}"
        )
    mean, std = (
        _triple(settings.mean, "mean", model),
        _triple(settings.std, "std", model),
    )
    if any(v == 0 for v in std):
        raise TaskConfigError(f"model {model!r}: image std values must be non-zero, got {list(std)}")
    return ImagePreprocessing(
        size=exact, shortest_edge=shortest, crop=crop, resample=_RESAMPLE[resample_name],
        rescale_factor=settings.rescale_factor, mean=mean, std=std,
        channels_first=layout == "NCHW", bgr=order == "BGR", dtype=dtype,
    )  # fmt: skip


def _settings(given: ImageSettings | Mapping[str, Any], model: str) -> ImageSettings:
    """``given`` as checked settings (a preprocessor_config.json's, or a mapping in tests)."""
    if isinstance(given, ImageSettings):
        return given
    try:
        return ImageSettings.model_validate(dict(given))
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise TaskConfigError(f"model {model!r}: image {where}: {first['msg']}") from None


def _triple(value: object, key: str, model: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        return (float(value), float(value), float(value))
    if isinstance(value, (list, tuple)) and len(value) == 3:
        return (float(value[0]), float(value[1]), float(value[2]))
    raise TaskConfigError(
        f"model {model!r}: {key} must be a number or three numbers (R, G, B), got {value!r}"
    )


def encode_png(mask: np.ndarray) -> bytes:
    """A 2-D uint8 array as an 8-bit grayscale PNG."""
    buffer = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def resize_plane(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of one float map (h, w) to (height, width)."""
    image = Image.fromarray(plane.astype(np.float32), mode="F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
