"""``taskserve.v1.TextClassification``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, label_scores, optional_bool
from taskserve.server.tasks.base import ScoreFunction
from taskserve.server.tasks.text_classification import ClassifyTextParams, TextClassifier

_FUNCTIONS = {
    pb.SCORE_FUNCTION_SOFTMAX: ScoreFunction.SOFTMAX,
    pb.SCORE_FUNCTION_SIGMOID: ScoreFunction.SIGMOID,
    pb.SCORE_FUNCTION_NONE: ScoreFunction.NONE,
}


class TextClassificationServicer(TaskServicer, pb_grpc.TextClassificationServicer):
    @unary
    async def Classify(self, request: pb.ClassifyTextRequest, context: Context) -> pb.ClassifyTextResponse:
        params = ClassifyTextParams(
            top_k=request.top_k,
            function=_FUNCTIONS.get(request.function),
            truncate=optional_bool(request, "truncate"),
        )
        async with self.call(request.model, TextClassifier, request.options, context) as call:
            results = await call.task.classify(list(request.texts), params, call.options)
            return pb.ClassifyTextResponse(model=call.served_by, results=[label_scores(r) for r in results])
