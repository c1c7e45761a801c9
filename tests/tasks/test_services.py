"""Service registration, metrics, scheduling hints and admission control."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2 as tc
from taskserve.protocol.generated.taskserve.v1 import text_classification_pb2_grpc as tc_grpc
from taskserve.server.errors import Overloaded
from taskserve.server.tasks.base import CallOptions, TaskContext, TaskLimits
from taskserve.server.tasks.text_classification import ClassifyTextParams, TextClassifier
from tests.support.server import ServerThread
from tests.tasks.fakes import fake_model, write_tokenizer

TYPED_SERVICES = [
    "taskserve.v1.TextClassification", "taskserve.v1.TokenClassification", "taskserve.v1.SentenceEmbedding",
    "taskserve.v1.SentenceSimilarity", "taskserve.v1.QuestionAnswering", "taskserve.v1.FillMask",
    "taskserve.v1.ImageClassification", "taskserve.v1.ObjectDetection", "taskserve.v1.ImageSegmentation",
    "taskserve.v1.ImageTextMatch", "taskserve.v1.TextGeneration", "taskserve.v1.Translation",
    "taskserve.v1.Summarization", "taskserve.v1.Text2Text", "taskserve.v1.ImageGeneration",
]  # fmt: skip


def test_every_typed_service_is_registered_and_reflected(
    task_server: ServerThread, channel: grpc.Channel
) -> None:
    assert task_server.app is not None
    assert set(TYPED_SERVICES) <= set(task_server.app.service_names)
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    listed = {s.name for r in responses for s in r.list_services_response.service}
    assert set(TYPED_SERVICES) <= listed


def test_typed_requests_count_in_the_model_metrics(task_server: ServerThread, channel: grpc.Channel) -> None:
    assert task_server.app is not None
    registry = task_server.app.metrics.registry
    labels = {"model": "tiny-textcls", "version": "1"}

    def value(name: str, **extra: str) -> float:
        return registry.get_sample_value(name, {**labels, **extra}) or 0.0

    ok, bad = (
        value("taskserve_request_success_total"),
        value("taskserve_request_failure_total", reason="invalid_input"),
    )
    stub = tc_grpc.TextClassificationStub(channel)
    stub.Classify(tc.ClassifyTextRequest(model=common.ModelRef(name="tiny-textcls"), texts=["The cat sat."]))
    with pytest.raises(grpc.RpcError):
        stub.Classify(tc.ClassifyTextRequest(model=common.ModelRef(name="tiny-textcls"), texts=[""]))
    assert value("taskserve_request_success_total") == ok + 1
    assert value("taskserve_request_failure_total", reason="invalid_input") == bad + 1
    assert value("taskserve_stage_duration_seconds_count", stage="preprocess") > 0


async def test_call_options_reach_the_scheduler(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    write_tokenizer(model_dir)
    model = fake_model(
        model_dir, "text-classification", lambda x: {"logits": np.zeros((len(x["input_ids"]), 2), np.float32)}
    )
    context = TaskContext(workers=1)
    try:
        task = TextClassifier.load(model, context)
        await task.classify(["cat"], ClassifyTextParams(), CallOptions(priority=2, deadline=123.0))
    finally:
        context.close()
    [request] = model.scheduler.requests
    assert (request.priority, request.deadline, request.output_names) == (2, 123.0, ("logits",))


def test_admission_refuses_at_once_when_saturated() -> None:
    context = TaskContext(TaskLimits(max_concurrent_requests=2), workers=1)
    try:
        with context.admit(), context.admit():
            third = context.admit()
            with pytest.raises(Overloaded, match="limit"):
                third.__enter__()
        with context.admit():  # permits come back
            pass
    finally:
        context.close()
