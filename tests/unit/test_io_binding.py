"""I/O binding through onnxruntime's binding API, run on the CPU provider (the code is the
one GPU sessions use, with device "cpu"): results equal session.run, device buffers are
reused per shape, and the fixed-shape (CUDA graph) path pads and cuts correctly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from onnx import TensorProto

from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.io_binding import IoBinder
from tests.support.tiny_models import add_sub_graph, identity_graph, write_entry


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("binding")
    return {
        "add_sub": write_entry(root, "add_sub", add_sub_graph(TensorProto.FLOAT), {}) / "1" / "model.onnx",
        "identity": write_entry(root, "identity", identity_graph(TensorProto.FLOAT, ["batch", "seq"]), {})
        / "1"
        / "model.onnx",
    }


def _session(path: Path) -> onnxruntime.InferenceSession:
    return onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_bound_run_equals_plain_run_and_reuses_buffers(models: dict[str, Path]) -> None:
    session = _session(models["add_sub"])
    config = ModelConfig.model_validate({"name": "add_sub", "max_batch_size": 8})
    binder = IoBinder(session, onnxruntime, config, device="cpu")
    rng = np.random.default_rng(0)
    for rows in (2, 2, 5, 2):
        a, b = rng.random((rows, 4), dtype=np.float32), rng.random((rows, 4), dtype=np.float32)
        got = binder.run({"INPUT0": a, "INPUT1": b}, ["OUTPUT0", "OUTPUT1"])
        want = session.run(["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
        np.testing.assert_array_equal(got["OUTPUT0"], want[0])
        np.testing.assert_array_equal(got["OUTPUT1"], want[1])
    # Two shapes seen, two inputs each: four device buffers, one copy per input per batch.
    assert len(binder._buffers) == 4 and binder.copies_in == 8
    only = binder.run({"INPUT0": a, "INPUT1": b}, ["OUTPUT1"])
    assert list(only) == ["OUTPUT1"]
    binder.close()


def test_fixed_shape_path_pads_to_the_bucket_and_cuts_back(models: dict[str, Path]) -> None:
    session = _session(models["identity"])
    config = ModelConfig.model_validate(
        {
            "name": "identity",
            "max_batch_size": 8,
            "inputs": [{"name": "INPUT0", "datatype": "FP32", "dims": [-1], "pad_value": -1}],
            "dynamic_batching": {"length_buckets": [4, 8]},
        }
    )
    binder = IoBinder(session, onnxruntime, config, device="cpu", cuda_graphs=True)
    rng = np.random.default_rng(1)
    for rows, length in ((3, 3), (3, 2), (4, 4), (2, 7), (3, 3)):
        x = rng.random((rows, length), dtype=np.float32)
        out = binder.run({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"]
        np.testing.assert_array_equal(out, x)
    # (4 rows, 4 long) served three batches; (2, 8) one.
    assert binder.graphs == 2
    # Longer than the last bucket: runs unpadded.
    x = rng.random((1, 9), dtype=np.float32)
    np.testing.assert_array_equal(binder.run({"INPUT0": x}, ["OUTPUT0"])["OUTPUT0"], x)
    assert binder.graphs == 2
