"""The image-generation task over fake batchers: how many calls and rows reach the UNet,
the concurrency cap, and that a finished or refused call frees its slot."""

from __future__ import annotations

import asyncio
import io
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image, ImageFile

from taskserve.server.errors import InvalidInput, LimitExceeded, Overloaded
from taskserve.server.repository.config import load_model_config
from taskserve.server.tasks.base import CallOptions, TaskContext
from taskserve.server.tasks.diffusion.pipeline import Mode
from taskserve.server.tasks.image_generation import GeneratedImages, GenerationProgress, ImageGenerator, ImageRequest
from tests.diffusion.conftest import NAME, TinyPipeline
from tests.tasks.fakes import FakeModel, FakeScheduler


def _fakes(repo: Path, unet_delay: float = 0.0) -> dict[str, FakeModel]:
    """The pipeline's four entries with their real configs, computing stand-in outputs."""

    def unet(inputs: Any) -> dict[str, np.ndarray]:
        sample = inputs["sample"]
        return {"out_sample": np.full((sample.shape[0], 4, *sample.shape[2:]), 0.1, np.float32)}

    def text(inputs: Any) -> dict[str, np.ndarray]:
        return {"last_hidden_state": np.zeros((inputs["input_ids"].shape[0], 77, 32), np.float32)}

    def decode(inputs: Any) -> dict[str, np.ndarray]:
        latents = inputs["latent_sample"]
        return {"sample": np.zeros((latents.shape[0], 3, latents.shape[2] * 2, latents.shape[3] * 2), np.float32)}

    def encode(inputs: Any) -> dict[str, np.ndarray]:
        pixels = inputs["sample"]
        return {
            "latent_parameters": np.zeros((pixels.shape[0], 8, pixels.shape[2] // 2, pixels.shape[3] // 2), np.float32)
        }

    class SlowScheduler(FakeScheduler):
        async def submit(self, request: Any) -> Any:
            await asyncio.sleep(unet_delay)
            return await super().submit(request)

    fns = {NAME: (unet, SlowScheduler), f"{NAME}-text-encoder": (text, FakeScheduler),
           f"{NAME}-vae-decoder": (decode, FakeScheduler), f"{NAME}-vae-encoder": (encode, FakeScheduler)}  # fmt: skip
    return {
        name: FakeModel(name, load_model_config(repo / name), repo / name, cls(fn)) for name, (fn, cls) in fns.items()
    }


def _task(tiny_pipeline: TinyPipeline, unet_delay: float = 0.0) -> tuple[ImageGenerator, dict[str, FakeModel]]:
    models = _fakes(tiny_pipeline.repo, unet_delay)
    context = TaskContext(models=models.__getitem__)
    return ImageGenerator.load(models[NAME], context), models


def _request(**kw: Any) -> ImageRequest:
    return ImageRequest(**{"mode": Mode.TEXT_TO_IMAGE, "prompt": "a cat", "width": 32, "height": 32, "steps": 3,
                           "seed": 1, **kw})  # fmt: skip


def test_guidance_doubles_rows_not_calls(tiny_pipeline: TinyPipeline) -> None:
    task, models = _task(tiny_pipeline)
    unet = models[NAME].scheduler
    result = asyncio.run(task.run(_request(num_images=3, guidance_scale=7.5), CallOptions()))
    assert len(result.images) == 3
    assert [r.inputs["sample"].shape[0] for r in unet.requests] == [6, 6, 6]  # one call per step, 2 rows per image
    assert [r.inputs["input_ids"].shape for r in models[f"{NAME}-text-encoder"].scheduler.requests] == [(2, 77)]
    unet.requests.clear()
    asyncio.run(task.run(_request(num_images=3, guidance_scale=1.0), CallOptions()))
    assert [r.inputs["sample"].shape[0] for r in unet.requests] == [3, 3, 3]
    # Every row of a step carries that step's timestep; steps go down.
    timesteps = [float(r.inputs["timestep"][0]) for r in unet.requests]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 3
    assert task.active == 0


def test_progress_events_then_images(tiny_pipeline: TinyPipeline) -> None:
    task, _ = _task(tiny_pipeline)

    async def collect() -> list[Any]:
        return [e async for e in task.generate(_request(steps=4), CallOptions())]

    events = asyncio.run(collect())
    assert [(e.step, e.total) for e in events[:-1] if isinstance(e, GenerationProgress)] == [
        (i, 4) for i in (1, 2, 3, 4)
    ]
    assert isinstance(events[-1], GeneratedImages) and events[-1].seeds == (1,)


def test_concurrency_cap_refuses_at_once_and_frees_slots(tiny_pipeline: TinyPipeline) -> None:
    task, models = _task(tiny_pipeline, unet_delay=0.05)
    task.max_concurrent = 2

    async def scenario() -> list[Any]:
        calls = [asyncio.ensure_future(task.run(_request(seed=i), CallOptions())) for i in range(3)]
        return await asyncio.gather(*calls, return_exceptions=True)

    outcomes = asyncio.run(scenario())
    assert sum(isinstance(o, Overloaded) for o in outcomes) == 1
    assert sum(isinstance(o, GeneratedImages) for o in outcomes) == 2
    assert task.active == 0


def test_bad_parameters_reach_no_model(tiny_pipeline: TinyPipeline) -> None:
    task, models = _task(tiny_pipeline)
    with pytest.raises(InvalidInput, match="steps"):
        asyncio.run(task.run(_request(steps=0), CallOptions()))
    with pytest.raises(InvalidInput, match="mask"):
        asyncio.run(task.run(_request(mode=Mode.INPAINT, image=b"not read", mask=None), CallOptions()))
    assert all(not m.scheduler.requests for m in models.values())
    assert task.active == 0


def test_cancelling_stops_the_loop_at_the_awaited_step(tiny_pipeline: TinyPipeline) -> None:
    task, models = _task(tiny_pipeline, unet_delay=0.05)
    unet = models[NAME].scheduler

    async def scenario() -> tuple[int, int]:
        call = asyncio.ensure_future(task.run(_request(steps=100), CallOptions()))
        deadline = time.monotonic() + 30
        while len(unet.requests) < 3:  # the loop is running its steps
            assert time.monotonic() < deadline and not call.done()
            await asyncio.sleep(0.01)
        at_cancel = len(unet.requests)
        call.cancel()
        # A loop that swallowed the cancel would go on to its 100 steps and return normally.
        with pytest.raises(asyncio.CancelledError):
            await call
        return at_cancel, len(unet.requests)

    at_cancel, at_end = asyncio.run(scenario())
    # The UNet call it was awaiting may have been recorded; none started after the cancel.
    assert at_cancel <= at_end <= at_cancel + 1 < 100
    assert task.active == 0


def _declaring(fmt: str, width: int, height: int) -> bytes:
    """A small PNG or JPEG whose header declares width x height (its pixel data is 8x8)."""
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=fmt)
    data = bytearray(buffer.getvalue())
    if fmt == "PNG":
        data[16:24] = width.to_bytes(4, "big") + height.to_bytes(4, "big")
        data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # IHDR's CRC, so Pillow reads it
    else:  # the SOF0 segment: FFC0, length (2), precision (1), height (2), width (2)
        sof = data.index(b"\xff\xc0")
        data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.fixture
def pixel_decodes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Sizes of every image whose pixels Pillow decodes (``ImageFile.load``) during the test."""
    decoded: list[tuple[int, int]] = []
    original = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> Any:
        decoded.append(self.size)
        return original(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return decoded


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_declared_sizes_are_refused_before_any_pixel_is_decoded(
    tiny_pipeline: TinyPipeline, pixel_decodes: list[tuple[int, int]], fmt: str
) -> None:
    task, models = _task(tiny_pipeline)
    huge = _declaring(fmt, 6000, 6000)  # a few hundred bytes declaring 36 MP (under the server's 40 MP)
    assert len(huge) < 2000
    small = _declaring("PNG", 32, 32)
    limit = f"limit of {task.max_pixels}"
    calls = [
        (_request(mode=Mode.IMAGE_TO_IMAGE, image=huge, width=0, height=0), rf"image 6000x6000 .*{limit}"),
        (_request(mode=Mode.INPAINT, image=huge, mask=small, width=0, height=0), rf"image 6000x6000 .*{limit}"),
        (_request(mode=Mode.INPAINT, image=small, mask=huge, width=0, height=0), rf"mask 6000x6000 .*{limit}"),
    ]
    for request, message in calls:
        with pytest.raises(LimitExceeded, match=message):
            asyncio.run(task.run(request, CallOptions()))
    assert pixel_decodes == []
    assert all(not m.scheduler.requests for m in models.values())
    assert task.active == 0
