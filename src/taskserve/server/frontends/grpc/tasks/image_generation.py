"""``taskserve.v1.ImageGeneration``: three calls, each unary and server-streaming."""

from __future__ import annotations

from collections.abc import AsyncIterator

from taskserve.protocol.generated.taskserve.v1 import common_pb2
from taskserve.protocol.generated.taskserve.v1 import image_generation_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import image_generation_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import server_stream, unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, image_source
from taskserve.server.tasks.diffusion.pipeline import Mode
from taskserve.server.tasks.diffusion.schedulers import SchedulerKind
from taskserve.server.tasks.image_generation import (
    GeneratedImages,
    GenerationEvent,
    ImageGenerator,
    ImageRequest,
    OutputFormat,
)

_SCHEDULERS = {
    pb.DIFFUSION_SCHEDULER_UNSPECIFIED: None,
    pb.DIFFUSION_SCHEDULER_DDIM: SchedulerKind.DDIM,
    pb.DIFFUSION_SCHEDULER_EULER: SchedulerKind.EULER,
    pb.DIFFUSION_SCHEDULER_DPM_SOLVER_PP: SchedulerKind.DPM_SOLVER_PP,
}
_FORMATS = {
    pb.GENERATED_IMAGE_FORMAT_UNSPECIFIED: OutputFormat.PNG,
    pb.GENERATED_IMAGE_FORMAT_PNG: OutputFormat.PNG,
    pb.GENERATED_IMAGE_FORMAT_RAW_RGB: OutputFormat.RAW_RGB,
}
_FORMAT_CODES = {
    OutputFormat.PNG: pb.GENERATED_IMAGE_FORMAT_PNG,
    OutputFormat.RAW_RGB: pb.GENERATED_IMAGE_FORMAT_RAW_RGB,
}

AnyRequest = pb.TextToImageRequest | pb.ImageToImageRequest | pb.InpaintRequest


def _request(request: AnyRequest, mode: Mode) -> ImageRequest:
    s = request.settings
    image = mask = None
    strength = None
    if isinstance(request, (pb.ImageToImageRequest, pb.InpaintRequest)):
        image = image_source(request.image, "image") if request.HasField("image") else None
        strength = request.strength if request.HasField("strength") else None
    if isinstance(request, pb.InpaintRequest):
        mask = image_source(request.mask, "mask") if request.HasField("mask") else None
    return ImageRequest(
        mode=mode, prompt=s.prompt, negative_prompt=s.negative_prompt, width=s.width, height=s.height,
        steps=s.steps, guidance_scale=s.guidance_scale if s.HasField("guidance_scale") else None,
        seed=s.seed if s.HasField("seed") else None, num_images=s.num_images,
        scheduler=_SCHEDULERS.get(s.scheduler), strength=strength, image=image, mask=mask,
        output_format=_FORMATS.get(s.output_format, OutputFormat.PNG), preview=s.preview,
    )  # fmt: skip


def _result(served_by: common_pb2.ServedBy, result: GeneratedImages) -> pb.GenerateImagesResponse:
    fmt = _FORMAT_CODES[result.output_format]
    return pb.GenerateImagesResponse(
        model=served_by,
        images=[
            pb.GeneratedImage(data=data, width=result.width, height=result.height, format=fmt, seed=seed)
            for data, seed in zip(result.images, result.seeds, strict=True)
        ],
        steps=result.steps,
    )


def _event(served_by: common_pb2.ServedBy, event: GenerationEvent) -> pb.ImageGenerationEvent:
    if isinstance(event, GeneratedImages):
        return pb.ImageGenerationEvent(model=served_by, result=_result(served_by, event))
    progress = pb.GenerationProgress(step=event.step, total=event.total, previews=list(event.previews))
    return pb.ImageGenerationEvent(model=served_by, progress=progress)


class ImageGenerationServicer(TaskServicer, pb_grpc.ImageGenerationServicer):
    async def _unary(self, request: AnyRequest, mode: Mode, context: Context) -> pb.GenerateImagesResponse:
        params = _request(request, mode)
        async with self.call(request.model, ImageGenerator, request.options, context) as call:
            return _result(call.served_by, await call.task.run(params, call.options))

    async def _stream(
        self, request: AnyRequest, mode: Mode, context: Context
    ) -> AsyncIterator[pb.ImageGenerationEvent]:
        params = _request(request, mode)
        async with self.call(request.model, ImageGenerator, request.options, context) as call:
            async for event in call.task.generate(params, call.options):
                yield _event(call.served_by, event)

    @unary
    async def TextToImage(self, request: pb.TextToImageRequest, context: Context) -> pb.GenerateImagesResponse:
        return await self._unary(request, Mode.TEXT_TO_IMAGE, context)

    @unary
    async def ImageToImage(self, request: pb.ImageToImageRequest, context: Context) -> pb.GenerateImagesResponse:
        return await self._unary(request, Mode.IMAGE_TO_IMAGE, context)

    @unary
    async def Inpaint(self, request: pb.InpaintRequest, context: Context) -> pb.GenerateImagesResponse:
        return await self._unary(request, Mode.INPAINT, context)

    @server_stream
    async def TextToImageStream(
        self, request: pb.TextToImageRequest, context: Context
    ) -> AsyncIterator[pb.ImageGenerationEvent]:
        async for event in self._stream(request, Mode.TEXT_TO_IMAGE, context):
            yield event

    @server_stream
    async def ImageToImageStream(
        self, request: pb.ImageToImageRequest, context: Context
    ) -> AsyncIterator[pb.ImageGenerationEvent]:
        async for event in self._stream(request, Mode.IMAGE_TO_IMAGE, context):
            yield event

    @server_stream
    async def InpaintStream(
        self, request: pb.InpaintRequest, context: Context
    ) -> AsyncIterator[pb.ImageGenerationEvent]:
        async for event in self._stream(request, Mode.INPAINT, context):
            yield event
