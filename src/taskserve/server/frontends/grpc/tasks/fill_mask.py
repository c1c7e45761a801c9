"""``taskserve.v1.FillMask``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import fill_mask_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import fill_mask_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, optional_bool
from taskserve.server.tasks.fill_mask import FillParams, MaskFiller, MaskPrediction


def _prediction(prediction: MaskPrediction) -> pb.MaskPrediction:
    return pb.MaskPrediction(
        start=prediction.start,
        completions=[
            pb.MaskCompletion(token=c.token, token_id=c.token_id, score=c.score, sequence=c.sequence)
            for c in prediction.completions
        ],
    )


class FillMaskServicer(TaskServicer, pb_grpc.FillMaskServicer):
    @unary
    async def Fill(self, request: pb.FillMaskRequest, context: Context) -> pb.FillMaskResponse:
        params = FillParams(top_k=request.top_k, truncate=optional_bool(request, "truncate"))
        async with self.call(request.model, MaskFiller, request.options, context) as call:
            results = await call.task.fill(list(request.texts), params, call.options)
            return pb.FillMaskResponse(
                model=call.served_by,
                results=[
                    pb.FilledText(masks=[_prediction(p) for p in predictions]) for predictions in results
                ],
            )
