"""``taskserve.v1.QuestionAnswering``."""

from __future__ import annotations

from taskserve.protocol.generated.taskserve.v1 import question_answering_pb2 as pb
from taskserve.protocol.generated.taskserve.v1 import question_answering_pb2_grpc as pb_grpc
from taskserve.server.frontends.grpc.status import unary
from taskserve.server.frontends.grpc.tasks.call import Context, TaskServicer
from taskserve.server.tasks.question_answering import AnswerParams, QAItem, QuestionAnswerer


class QuestionAnsweringServicer(TaskServicer, pb_grpc.QuestionAnsweringServicer):
    @unary
    async def Answer(self, request: pb.AnswerRequest, context: Context) -> pb.AnswerResponse:
        items = [QAItem(question=item.question, context=item.context) for item in request.items]
        params = AnswerParams(
            top_k=request.top_k,
            max_answer_length=request.max_answer_length,
            doc_stride=request.doc_stride,
            allow_no_answer=request.allow_no_answer,
        )
        async with self.call(request.model, QuestionAnswerer, request.options, context) as call:
            results = await call.task.answer(items, params, call.options)
            return pb.AnswerResponse(
                model=call.served_by,
                results=[
                    pb.Answers(
                        answers=[
                            pb.AnswerSpan(text=a.text, score=a.score, start=a.start, end=a.end)
                            for a in answers
                        ]
                    )
                    for answers in results
                ],
            )
