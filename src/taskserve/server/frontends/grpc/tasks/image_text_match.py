"""``taskserve.v1.ImageTextMatch``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import image_text_match_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import image_text_match_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, image_sources
from taskserve.server.tasks.image_text_match import ImageTextMatcher


class ImageTextMatchServicer(TaskServicer, pb_grpc.ImageTextMatchServicer):
    @unary
    async def Compare(
        self, request: pb.CompareImageTextRequest, context: Context
    ) -> pb.CompareImageTextResponse:
        images = image_sources(request.images)
        async with self.call(request.model, ImageTextMatcher, request.options, context) as call:
            results = await call.task.compare(images, list(request.captions), call.options)
            return pb.CompareImageTextResponse(
                model=call.served_by,
                results=[
                    pb.ImageTextScores(similarities=r.similarities, probabilities=r.probabilities)
                    for r in results
                ],
            )
