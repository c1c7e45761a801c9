"""A model placed on a GPU this machine lacks is UNAVAILABLE with the reason; the rest serve."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as tc
from onnx import TensorProto

from taskserve.server.runtimes import devices
from tests.support.server import running_server
from tests.support.tiny_models import add_sub_graph, write_entry


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tc.InferenceServerClient]:
    repo = tmp_path_factory.mktemp("placement")
    write_entry(repo, "on_cpu", add_sub_graph(TensorProto.FLOAT), {"max_batch_size": 8})
    gpu_config = {"max_batch_size": 8, "gpus": [0], "instance_count": 2, "runtime": {"execution_providers": ["cuda"]}}
    write_entry(repo, "on_gpu", add_sub_graph(TensorProto.FLOAT), gpu_config)
    torch_config = {
        "max_batch_size": 8, "platform": "torch", "gpus": [1], "default_model_filename": "torch_model.json",
        "inputs": [{"name": "pixel_values", "datatype": "FP32", "dims": [3, 224, 224]}],
        "outputs": [{"name": "logits", "datatype": "FP32", "dims": [1000]}],
    }  # fmt: skip
    write_entry(repo, "torch_on_gpu", add_sub_graph(TensorProto.FLOAT), torch_config)
    patch = pytest.MonkeyPatch()
    patch.setattr(devices, "gpu_counter", lambda: 0)  # the same answer on a GPU machine
    try:
        with running_server(repo) as server:
            yield tc.InferenceServerClient(server.address)
    finally:
        patch.undo()


def test_missing_gpu_makes_the_model_unavailable_with_the_reason(client: tc.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["on_cpu"].state == "READY"
    for name, gpus in (("on_gpu", "[0]"), ("torch_on_gpu", "[1]")):
        assert index[name].state == "UNAVAILABLE"
        assert f"GPU(s) {gpus}" in index[name].reason and "no NVIDIA GPU" in index[name].reason
    assert not client.is_model_ready("on_gpu")


def test_the_other_models_serve(client: tc.InferenceServerClient) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = tc.InferInput(name, [2, 4], "FP32")
        tensor.set_data_from_numpy(a)
        inputs.append(tensor)
    result = client.infer("on_cpu", inputs)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), 2 * a)
