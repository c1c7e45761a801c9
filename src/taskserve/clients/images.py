"""Turn what callers hold (numpy arrays, PIL images, encoded bytes, file paths) into ``Image`` messages.

Arrays and PIL images travel raw (HWC uint8), so nothing is re-encoded on the
client; bytes and files travel as they are (JPEG, PNG, ...) and the server decodes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
import numpy.typing as npt

from taskserve.protocol.generated.taskserve.v1 import common_pb2

if TYPE_CHECKING:
    from PIL.Image import Image as PILImage

ImageInput = Union[bytes, str, "os.PathLike[str]", npt.NDArray[np.uint8], "PILImage"]


def _is_pil_image(obj: object) -> bool:
    # Duck-typed so the base install never imports Pillow.
    return type(obj).__module__.startswith("PIL.") and hasattr(obj, "convert")


def _raw(array: np.ndarray) -> common_pb2.Image:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (HWC), got {array.dtype}; scale and cast first")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise ValueError(f"image arrays must be (H, W) or (H, W, C) with C 1, 3 or 4, got shape {array.shape}")
    height, width, channels = array.shape
    raw = common_pb2.RawImage(height=height, width=width, channels=channels, data=np.ascontiguousarray(array).tobytes())
    return common_pb2.Image(raw=raw)


def to_image_proto(image: ImageInput) -> common_pb2.Image:
    if isinstance(image, bytes):
        return common_pb2.Image(encoded=image)
    if isinstance(image, (str, os.PathLike)):
        return common_pb2.Image(encoded=Path(image).read_bytes())
    if isinstance(image, np.ndarray):
        return _raw(image)
    if _is_pil_image(image):
        mode = "L" if image.mode in ("L", "1", "I", "F") else "RGB"
        return _raw(np.asarray(image.convert(mode), dtype=np.uint8))
    raise TypeError(f"unsupported image {type(image).__name__}: pass a uint8 HWC array, a PIL image, bytes or a path")


def to_image_protos(images: Sequence[ImageInput] | npt.NDArray[np.uint8]) -> list[common_pb2.Image]:
    """A list of images, or a uint8 array of shape (N, H, W, C) holding N images."""
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise TypeError(
                f"an image batch array must be (N, H, W, C), got shape {images.shape}; wrap one image in a list"
            )
        return [_raw(img) for img in images]
    if isinstance(images, (bytes, str)) or _is_pil_image(images):
        raise TypeError("pass a list of images, even for one image")
    return [to_image_proto(img) for img in images]
