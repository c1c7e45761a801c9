"""``taskserve.v1.TokenClassification``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import token_classification_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import token_classification_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer, optional_bool
from taskserve.server.tasks.token_classification import Aggregation, TagParams, TokenClassifier

_AGGREGATIONS = {
    pb.AGGREGATION_STRATEGY_NONE: Aggregation.NONE,
    pb.AGGREGATION_STRATEGY_FIRST: Aggregation.FIRST,
    pb.AGGREGATION_STRATEGY_AVERAGE: Aggregation.AVERAGE,
    pb.AGGREGATION_STRATEGY_MAX: Aggregation.MAX,
}


class TokenClassificationServicer(TaskServicer, pb_grpc.TokenClassificationServicer):
    @unary
    async def Tag(self, request: pb.TagRequest, context: Context) -> pb.TagResponse:
        params = TagParams(
            aggregation=_AGGREGATIONS.get(request.aggregation),
            ignore_labels=tuple(request.ignore_labels) or None,
            truncate=optional_bool(request, "truncate"),
        )
        async with self.call(request.model, TokenClassifier, request.options, context) as call:
            results = await call.task.tag(list(request.texts), params, call.options)
            return pb.TagResponse(
                model=call.served_by,
                results=[
                    pb.TaggedText(
                        entities=[
                            pb.Entity(label=e.label, score=e.score, start=e.start, end=e.end, text=e.text)
                            for e in entities
                        ]
                    )
                    for entities in results
                ],
            )
