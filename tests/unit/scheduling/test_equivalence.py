"""Batched results equal unbatched ones, request by request: random lengths, rows,
priorities and arrival order, through a fake runtime and a real tiny ONNX model
whose outputs depend on padding being masked out."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import Runtime, TensorInfo
from taskserve.server.scheduling.base import InferRequest, InferResult
from taskserve.server.serving.factory import create_scheduler

from .fakes import FakeRuntime, masked_outputs
from .harness import batcher, running, token_config

os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

VOCAB, WIDTH = 50, 4


def random_request(
    rng: np.random.Generator, id_name: str, mask_name: str, max_rows: int, outputs: list[str]
) -> InferRequest:
    rows = int(rng.integers(1, max_rows + 1))
    lengths = rng.integers(1, 13, size=rows)
    width = int(lengths.max())
    ids = np.zeros((rows, width), np.int64)
    mask = np.zeros((rows, width), np.int64)
    for r, n in enumerate(lengths):
        ids[r, :n] = rng.integers(1, VOCAB, size=n)
        mask[r, :n] = 1
    wanted = (
        None
        if rng.random() < 0.5
        else tuple(sorted(rng.choice(outputs, size=1 + int(rng.integers(len(outputs))), replace=False)))
    )
    return InferRequest(
        inputs={id_name: ids, mask_name: mask}, output_names=wanted, priority=int(rng.integers(1, 3))
    )


async def submit_in_random_order(
    scheduler: Any, requests: list[InferRequest], rng: np.random.Generator
) -> list[InferResult]:
    """Submit every request, shuffled: a first burst of 8 (queued before the batcher
    looks, so they surely share batches), then yielding to the loop a random number
    of times between requests."""
    order = rng.permutation(len(requests))
    tasks: dict[int, asyncio.Task[InferResult]] = {}
    for n, i in enumerate(order):
        tasks[int(i)] = asyncio.create_task(scheduler.submit(requests[int(i)]))
        for _ in range(int(rng.integers(0, 3)) if n >= 8 else 0):
            await asyncio.sleep(0)
    return [await tasks[i] for i in range(len(requests))]


def assert_same(result: InferResult, expected: dict[str, np.ndarray], wanted: tuple[str, ...] | None) -> None:
    names = set(wanted) if wanted is not None else set(expected)
    assert set(result.outputs) == names
    for name in names:
        assert result.outputs[name].shape == expected[name].shape, name
        np.testing.assert_allclose(result.outputs[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("seed", [0, 1, 2])
async def test_fake_runtime_batched_equals_unbatched(seed: int) -> None:
    rng = np.random.default_rng(seed)
    config = token_config(
        max_batch_size=6,
        instance_count=2,
        dynamic_batching={"priority_levels": 2, "preferred_batch_sizes": [4], "length_buckets": [4, 8]},
    )
    runtimes = [FakeRuntime(), FakeRuntime()]
    requests = [random_request(rng, "ids", "mask", 3, ["hidden", "pooled", "length"]) for _ in range(60)]
    async with running(batcher(config, runtimes)) as s:
        results = await submit_in_random_order(s, requests, rng)
    for request, result in zip(requests, results, strict=False):
        assert_same(result, masked_outputs(dict(request.inputs)), request.output_names)
    batches = runtimes[0].batches + runtimes[1].batches
    assert len(batches) < len(requests)  # requests really were batched together
    assert any(b["ids"].shape[1] > 1 and (b["mask"] == 0).any() for b in batches)  # and padded


def build_pooling_model(path: Path) -> None:
    """Masked mean pooling over an embedding lookup: padding tokens must not count."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    emb = np.random.default_rng(42).standard_normal((VOCAB, WIDTH)).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["embedding", "input_ids"], ["tokens"], axis=0),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("Mul", ["tokens", "mask3"], ["token_embeddings"]),
        helper.make_node("ReduceSum", ["token_embeddings", "axis1"], ["summed"], keepdims=0),
        helper.make_node("ReduceSum", ["maskf", "axis1"], ["count"], keepdims=1),
        helper.make_node("Max", ["count", "tiny"], ["safe_count"]),
        helper.make_node("Div", ["summed", "safe_count"], ["sentence_embedding"]),
    ]
    graph = helper.make_graph(
        nodes,
        "masked_mean_pooling",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [
            helper.make_tensor_value_info(
                "token_embeddings", TensorProto.FLOAT, ["batch", "sequence", WIDTH]
            ),
            helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", WIDTH]),
        ],
        initializer=[
            numpy_helper.from_array(emb, "embedding"),
            numpy_helper.from_array(np.array([1], np.int64), "axis1"),
            numpy_helper.from_array(np.array([2], np.int64), "axis2"),
            numpy_helper.from_array(np.array([1e-9], np.float32), "tiny"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


class SessionRuntime(Runtime):
    """A bare onnxruntime session, used when taskserve's OnnxRuntime is not available."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.session: Any = None

    def load(self) -> None:
        import onnxruntime as ort

        self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo(i.name, "INT64", (-1, -1)) for i in self.session.get_inputs()]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo(o.name, "FP32", ()) for o in self.session.get_outputs()]

    def infer(
        self, inputs: dict[str, np.ndarray], output_names: list[str] | None = None
    ) -> dict[str, np.ndarray]:
        names = output_names or [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, inputs), strict=False))


def onnx_config() -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "pooling",
            "max_batch_size": 8,
            "instance_count": 2,
            "inputs": [
                # A non-zero id pad: only the mask keeps padding out of the result.
                {"name": "input_ids", "datatype": "INT64", "dims": [-1], "pad_value": 3},
                {"name": "attention_mask", "datatype": "INT64", "dims": [-1], "pad_value": 0},
            ],
            "outputs": [
                {
                    "name": "token_embeddings",
                    "datatype": "FP32",
                    "dims": [-1, WIDTH],
                    "unpad_like": "input_ids",
                },
                {"name": "sentence_embedding", "datatype": "FP32", "dims": [WIDTH]},
            ],
            "dynamic_batching": {"max_queue_delay_us": 2000, "priority_levels": 2},
            "runtime": {"execution_providers": ["cpu"], "intra_op_threads": 1},
        }
    )


def make_runtime(path: Path, config: ModelConfig) -> Runtime:
    try:
        from taskserve.server.runtimes.onnx import OnnxRuntime
    except ImportError:
        return SessionRuntime(path)
    return OnnxRuntime(path, config)


@pytest.fixture(scope="session")
def pooling_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scheduling") / "pooling" / "1" / "model.onnx"
    build_pooling_model(path)
    return path


async def test_onnx_model_batched_equals_unbatched(pooling_model: Path) -> None:
    import onnxruntime as ort

    config = onnx_config()
    runtimes = [make_runtime(pooling_model, config) for _ in range(config.instance_count)]
    for runtime in runtimes:
        runtime.load()
    reference = ort.InferenceSession(str(pooling_model), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(7)
    outputs = ["token_embeddings", "sentence_embedding"]
    requests = [random_request(rng, "input_ids", "attention_mask", 3, outputs) for _ in range(40)]
    scheduler = create_scheduler(config, runtimes, None)
    await scheduler.start()
    try:
        results = await submit_in_random_order(scheduler, requests, rng)
    finally:
        await scheduler.stop()
    for request, result in zip(requests, results, strict=False):
        alone = dict(zip(outputs, reference.run(outputs, dict(request.inputs)), strict=False))
        assert_same(result, alone, request.output_names)
    # Some requests shared a batch with others.
    assert any(r.batch_size > len(q.inputs["input_ids"]) for q, r in zip(requests, results, strict=False))
