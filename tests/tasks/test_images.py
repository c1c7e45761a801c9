"""Image decoding limits and preprocessing settings (task layer, no server)."""

from __future__ import annotations

import io
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

import taskserve.server
from taskserve.server.errors import InvalidInput, LimitExceeded
from taskserve.server.tasks.base import TaskConfigError
from taskserve.server.tasks.images import RawImage, decode_image, preprocessing_from


def _encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def test_decode_formats_to_rgb() -> None:
    gray = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4) * 20, mode="L")
    for fmt in ("PNG", "WEBP", "BMP"):
        pixels = decode_image(
            _encode(gray, fmt, **({"lossless": True} if fmt == "WEBP" else {})), 10_000, "img"
        )
        assert pixels.shape == (3, 4, 3) and pixels.dtype == np.uint8
        assert (pixels[..., 0] == np.asarray(gray)).all()
    rgba = Image.new("RGBA", (5, 2), (10, 20, 30, 0))
    assert decode_image(_encode(rgba, "PNG"), 100, "img")[0, 0].tolist() == [10, 20, 30]


def test_decode_applies_exif_orientation() -> None:
    image = Image.new("RGB", (6, 2), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    pixels = decode_image(_encode(image, "JPEG", exif=exif), 100, "img")
    assert pixels.shape == (6, 2, 3)


def test_decode_refuses_bombs_and_unknown_formats() -> None:
    with pytest.raises(InvalidInput, match="img is 300x300 pixels, over the limit of 50000"):
        decode_image(_encode(Image.new("1", (300, 300)), "PNG"), 50_000, "img")
    with pytest.raises(InvalidInput, match="could not be decoded"):
        decode_image(_encode(Image.new("RGB", (4, 4)), "TIFF"), 100, "img")  # TIFF is not accepted
    with pytest.raises(InvalidInput, match="is empty"):
        decode_image(b"", 100, "img")


def test_raw_images() -> None:
    data = bytes(range(24))
    rgb = decode_image(RawImage(height=2, width=4, channels=3, data=data), 100, "img")
    assert rgb.tolist() == np.frombuffer(data, np.uint8).reshape(2, 4, 3).tolist()
    rgba = decode_image(RawImage(height=2, width=3, channels=4, data=data), 100, "img")
    assert rgba.shape == (2, 3, 3) and rgba[0, 0].tolist() == [0, 1, 2]
    gray = decode_image(RawImage(height=4, width=6, channels=1, data=data), 100, "img")
    assert gray.shape == (4, 6, 3) and gray[0, 1].tolist() == [1, 1, 1]
    with pytest.raises(InvalidInput, match="over the limit of 10"):
        decode_image(RawImage(height=4, width=6, channels=1, data=data), 10, "img")
    with pytest.raises(InvalidInput, match="positive"):
        decode_image(RawImage(height=0, width=6, channels=1, data=b""), 10, "img")


def test_preprocessing_shortest_edge_crop_and_normalize() -> None:
    options = {"image": {"size": [32, 32], "resize_mode": "shortest_edge", "crop": [24, 20], "rescale_factor": 1.0,
                         "mean": [100, 100, 100], "std": [2, 2, 2]}}  # fmt: skip
    prep = preprocessing_from(options["image"], {}, None, np.dtype(np.float32), "m")
    image = np.full((40, 80, 3), 120, np.uint8)
    out = prep.apply(image)
    assert out.shape == (3, 24, 20) and out.dtype == np.float32
    assert out == pytest.approx(np.full((3, 24, 20), 10.0))
    # Hugging Face preprocessor_config.json, used when task_options.image is absent.
    hf = {
        "do_resize": True,
        "size": {"height": 16, "width": 8},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    }
    prep = preprocessing_from(None, hf, None, np.dtype(np.float32), "m")
    assert prep.apply(np.zeros((50, 50, 3), np.uint8)).shape == (3, 16, 8)
    # Nothing configured: the pixel input's fixed dims decide.
    prep = preprocessing_from(None, {}, (3, 10, 12), np.dtype(np.float32), "m")
    assert prep.apply(np.zeros((50, 50, 3), np.uint8)).shape == (3, 10, 12)
    # Detection and segmentation resize to one exact size (the model's input size) and never crop.
    fixed = preprocessing_from(options["image"], {}, None, np.dtype(np.float32), "m", fixed_size=True)
    stripes = np.zeros((40, 80, 3), np.uint8)
    stripes[:, :40] = 255
    resized = fixed.apply(stripes)
    assert resized.shape == (3, 24, 20)
    # Not cropped: the left half of the original is the left half of the input.
    assert (resized[0, :, :9] > 0).all() and (resized[0, :, 11:] < 0).all()
    nhwc = preprocessing_from(
        {"size": [4, 4], "layout": "NHWC"}, {}, None, np.dtype(np.float32), "m"
    )
    assert nhwc.apply(image).shape == (4, 4, 3)
    with pytest.raises(TaskConfigError, match="no image size"):
        preprocessing_from(None, {}, None, np.dtype(np.float32), "m")
    with pytest.raises(TaskConfigError, match="resize_mode"):
        preprocessing_from({"size": 4, "resize_mode": "fit"}, {}, None, np.dtype(np.float32), "m")


def _declaring(fmt: str, width: int, height: int) -> bytes:
    """A small PNG or JPEG whose header declares width x height (its pixel data is 8x8)."""
    data = bytearray(_encode(Image.new("RGB", (8, 8), (10, 200, 10)), fmt))
    if fmt == "PNG":
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC, so Pillow reads it
    else:  # SOF0: FFC0, length (2), precision (1), height (2), width (2)
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize(("fmt", "side"), [("PNG", 7000), ("JPEG", 7000), ("JPEG", 60000), ("PNG", 60000)])
def test_declared_size_is_refused_before_any_pixel_is_decoded(
    monkeypatch: pytest.MonkeyPatch, fmt: str, side: int
) -> None:
    # 60000² is past twice Pillow's own bomb limit, where Image.open itself refuses.
    decoded: list[object] = []
    original = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or original(self))
    with pytest.raises(LimitExceeded, match="over the limit of 40000000"):
        decode_image(_declaring(fmt, side, side), 40_000_000, "images[0]")
    assert decoded == []
    assert decode_image(_declaring(fmt, 8, 8), 40_000_000, "images[0]").shape == (8, 8, 3)
    assert decoded and set(decoded) == {(8, 8)}  # the spy sees a real decode


def test_only_images_py_decodes_images() -> None:
    """Every image the server decodes goes through decode_image, which checks the header
    first: no other server module opens images with Pillow."""
    root = Path(taskserve.server.__file__).parent
    openers = re.compile(r"Image\.open\(|ImageFile\.Parser|Image\.frombytes\(|imageio|cv2\.imdecode")
    found = [
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if openers.search(path.read_text(encoding="utf-8")) and path.name != "images.py"
    ]
    assert found == []
