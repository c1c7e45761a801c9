"""``taskserve.v1.ImageClassification``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, image_sources, label_scores
from taskserve.server.tasks.image_classification import ClassifyImageParams, ImageClassifier


class ImageClassificationServicer(TaskServicer, pb_grpc.ImageClassificationServicer):
    @unary
    async def Classify(self, request: pb.ClassifyImageRequest, context: Context) -> pb.ClassifyImageResponse:
        images = image_sources(request.images)
        async with self.call(request.model, ImageClassifier, request.options, context) as call:
            results = await call.task.classify(images, ClassifyImageParams(top_k=request.top_k), call.options)
            return pb.ClassifyImageResponse(model=call.served_by, results=[label_scores(r) for r in results])
