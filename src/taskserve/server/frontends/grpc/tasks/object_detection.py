"""``taskserve.v1.ObjectDetection``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import object_detection_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import object_detection_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, image_sources
from taskserve.server.tasks.object_detection import DetectParams, ImageDetections, ObjectDetector


def _detections(result: ImageDetections) -> pb.Detections:
    return pb.Detections(
        width=result.width,
        height=result.height,
        detections=[
            pb.Detection(
                label=d.label,
                score=d.score,
                index=d.index,
                box=pb.BoundingBox(
                    x_min=d.box.x_min, y_min=d.box.y_min, x_max=d.box.x_max, y_max=d.box.y_max
                ),
            )
            for d in result.detections
        ],
    )


class ObjectDetectionServicer(TaskServicer, pb_grpc.ObjectDetectionServicer):
    @unary
    async def Detect(self, request: pb.DetectRequest, context: Context) -> pb.DetectResponse:
        images = image_sources(request.images)
        params = DetectParams(
            score_threshold=request.score_threshold if request.HasField("score_threshold") else None,
            iou_threshold=request.iou_threshold if request.HasField("iou_threshold") else None,
            max_detections=request.max_detections,
        )
        async with self.call(request.model, ObjectDetector, request.options, context) as call:
            results = await call.task.detect(images, params, call.options)
            return pb.DetectResponse(model=call.served_by, results=[_detections(r) for r in results])
