"""``taskserve.v1.ImageSegmentation``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import image_segmentation_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import image_segmentation_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, image_sources
from taskserve.server.tasks.image_segmentation import ImageSegmenter, SegmentParams


class ImageSegmentationServicer(TaskServicer, pb_grpc.ImageSegmentationServicer):
    @unary
    async def Segment(self, request: pb.SegmentRequest, context: Context) -> pb.SegmentResponse:
        images = image_sources(request.images)
        async with self.call(request.model, ImageSegmenter, request.options, context) as call:
            results = await call.task.segment(images, SegmentParams(min_area=request.min_area), call.options)
            return pb.SegmentResponse(
                model=call.served_by,
                results=[
                    pb.Segmentation(
                        width=r.width,
                        height=r.height,
                        segments=[
                            pb.Segment(
                                label=s.label, index=s.index, score=s.score, area=s.area, mask_png=s.mask_png
                            )
                            for s in r.segments
                        ],
                    )
                    for r in results
                ],
            )
