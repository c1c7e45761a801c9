"""What callers read (status details, RepositoryIndex reasons) holds no server path, no
memory address and no traceback, and stays short: bad configs and bad inputs across
tasks, a refused ONNX external-data file, a YAML alias bomb, a reason of many problems."""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.protocol.generated.taskserve.v1 import common_pb2, image_classification_pb2
from taskserve.protocol.generated.taskserve.v1 import image_classification_pb2_grpc as ic_grpc
from taskserve.server.errors import ConfigError
from taskserve.server.repository.config import load_model_config
from taskserve.server.serving.manager import MAX_REASON_CHARS
from taskserve.server.tasks.images import decode_image
from tests.support.server import ServerThread, running_server
from tests.support.tiny_models import add_sub_graph, identity_graph, write_entry

ADDRESS = re.compile(r"0x[0-9a-fA-F]{6,}")


def alias_bomb(levels: int = 6, width: int = 10) -> str:
    """A few hundred bytes of YAML that expand to width**levels strings (a million here),
    put where validation fails, so the old message quoted all of them."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    lines.append(f"labels: *l{levels - 1}")
    return "\n".join(lines) + "\n"


def _external_data_out(model_dir: Path, outside: Path) -> None:
    """An ONNX model whose initializer is stored in a file outside the model directory."""
    outside.write_bytes(np.ones(4, np.float32).tobytes())
    weights = numpy_helper.from_array(np.ones((4,), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    init = model.graph.initializer[0]
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../../" + outside.name), ("offset", "0"), ("length", "16")):
        entry = init.external_data.add()
        entry.key, entry.value = key, value
    (model_dir / "1").mkdir(parents=True)
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    (model_dir / "config.yaml").write_text(yaml.safe_dump({"max_batch_size": 4}))


def _image_classifier() -> onnx.GraphProto:
    """pixel_values (batch, 3, 8, 8) -> logits (batch, 3): the channel means."""
    return helper.make_graph(
        [helper.make_node("ReduceMean", ["pixel_values"], ["logits"], axes=[2, 3], keepdims=0)],
        "classify",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
    )


@dataclass(frozen=True)
class Layout:
    root: Path
    repo: Path


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    root = tmp_path_factory.mktemp("messages")
    repo = root / "repo"
    graph = identity_graph(TensorProto.FLOAT, ["batch", 2])
    _external_data_out(repo / "ext_data", root / "weights-outside.bin")
    (write_entry(repo, "yaml_bomb", graph, {}) / "config.yaml").write_text(alias_bomb())
    many = {f"not_an_option_{i}": i for i in range(300)}
    write_entry(repo, "long_reason", graph, {"max_batch_size": 4, "task": "text-classification", "task_options": many})
    config_dir = write_entry(repo, "config_dir", graph, {}) / "config.yaml"
    config_dir.unlink()
    config_dir.mkdir()
    (write_entry(repo, "bad_yaml", graph, {}) / "config.yaml").write_text("max_batch_size: [1,\n")
    write_entry(repo, "no_tokenizer", graph, {"max_batch_size": 4, "task": "text-classification"})
    write_entry(root / "outside", "other", add_sub_graph(), {"max_batch_size": 8})
    linked = write_entry(repo, "version_link", graph, {"max_batch_size": 4})
    (linked / "2").symlink_to(root / "outside" / "other" / "1", target_is_directory=True)
    write_entry(repo, "images", _image_classifier(), {
        "max_batch_size": 4, "task": "image-classification",
        "task_options": {"image": {"size": [8, 8]}, "id2label": {0: "r", 1: "g", 2: "b"}},
    })  # fmt: skip
    return Layout(root, repo)


@pytest.fixture(scope="module")
def server(layout: Layout) -> Iterator[ServerThread]:
    with running_server(layout.repo, model_control_mode="explicit") as server:
        yield server


def _check(layout: Layout, text: str, where: str) -> None:
    for base in (layout.root, layout.root.resolve(), layout.repo, Path.cwd()):
        assert str(base) not in text, (where, text)
    assert not ADDRESS.search(text), (where, text)
    assert "Traceback" not in text, (where, text)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def test_no_message_holds_a_path_an_address_or_a_traceback(layout: Layout, server: ServerThread) -> None:
    good_png = _png(np.zeros((8, 8, 3), np.uint8))
    bad_images = {
        "garbage": common_pb2.Image(encoded=b"this is not an image at all"),
        "truncated": common_pb2.Image(encoded=good_png[: len(good_png) // 2]),
        "raw-size": common_pb2.Image(raw=common_pb2.RawImage(height=8, width=8, channels=3, data=b"\0" * 5)),
    }
    seen: dict[str, str] = {}
    with grpc.insecure_channel(server.address) as channel:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        classify = ic_grpc.ImageClassificationStub(channel)
        index = {m.name: m for m in v2.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models}
        assert index["images"].state == "READY", index["images"].reason
        failed = sorted(name for name, m in index.items() if m.state != "READY")
        assert {"ext_data", "yaml_bomb", "long_reason", "config_dir", "bad_yaml", "no_tokenizer"} <= set(failed)
        for name in failed:
            seen[f"index {name}"] = index[name].reason
            for label, call in (
                ("infer", lambda n: v2.ModelInfer(pb.ModelInferRequest(model_name=n), timeout=10)),
                ("metadata", lambda n: v2.ModelMetadata(pb.ModelMetadataRequest(name=n), timeout=10)),
                ("load", lambda n: v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=n), timeout=30)),
                ("classify", lambda n: classify.Classify(
                    image_classification_pb2.ClassifyImageRequest(model=common_pb2.ModelRef(name=n)), timeout=10
                )),
            ):  # fmt: skip
                with pytest.raises(grpc.RpcError) as err:
                    call(name)
                seen[f"{label} {name}"] = err.value.details() or ""
        for label, image in bad_images.items():
            request = image_classification_pb2.ClassifyImageRequest(
                model=common_pb2.ModelRef(name="images"), images=[image]
            )
            with pytest.raises(grpc.RpcError) as err:
                classify.Classify(request, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
            seen[f"classify images {label}"] = err.value.details() or ""
        with pytest.raises(grpc.RpcError) as err:
            v2.ModelInfer(pb.ModelInferRequest(model_name="images", inputs=[pb.ModelInferRequest.InferInputTensor(
                name="nope", datatype="FP32", shape=[1, 3, 8, 8])]), timeout=10)  # fmt: skip
        seen["infer images wrong input"] = err.value.details() or ""
    assert "external" in seen["index ext_data"].lower(), seen["index ext_data"]  # the refusal itself is kept
    for where, text in seen.items():
        _check(layout, text, where)


def test_a_bad_inpaint_mask_or_image_names_no_object_address() -> None:
    for what in ("mask", "image"):
        with pytest.raises(Exception) as err:
            decode_image(b"\x89PNG but not really", 1 << 20, what)
        message = getattr(err.value, "message", str(err.value))
        assert message.startswith(what) and not ADDRESS.search(message) and "BytesIO" not in message, message


def test_a_yaml_alias_bomb_is_refused_with_a_short_reason(layout: Layout, tmp_path: Path) -> None:
    bomb = alias_bomb()
    assert len(bomb) < 1000
    (tmp_path / "bomb").mkdir()
    (tmp_path / "bomb" / "config.yaml").write_text(bomb)
    with pytest.raises(ConfigError) as err:
        load_model_config(tmp_path / "bomb")
    assert "alias" in err.value.message and len(err.value.message) < 300, err.value.message[:400]
    # Plain aliases that expand to little still load (exporters' YAML may hold them).
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "config.yaml").write_text("max_batch_size: 4\nwarmup: &w {batch_sizes: [4]}\n")
    assert load_model_config(tmp_path / "ok").warmup.batch_sizes == (4,)
    (tmp_path / "ok" / "config.yaml").write_text(
        "max_batch_size: 4\nwarmup: {batch_sizes: &b [2, 4]}\ndynamic_batching: {preferred_batch_sizes: *b}\n"
    )
    assert load_model_config(tmp_path / "ok").dynamic_batching.preferred_batch_sizes == (2, 4)


def test_stored_reasons_are_capped_in_the_index_and_the_log(
    layout: Layout, server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(server.address) as channel:
        v2 = pb_grpc.GRPCInferenceServiceStub(channel)
        index = {m.name: m for m in v2.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models}
        for name in ("yaml_bomb", "long_reason"):
            assert index[name].state == "UNAVAILABLE"
            assert len(index[name].reason) <= MAX_REASON_CHARS, (name, len(index[name].reason))
        assert index["long_reason"].reason.endswith("…")
        assert "not_an_option_0" in index["long_reason"].reason  # the start of the reason is kept
        total = sum(len(m.reason) for m in index.values())
        assert total <= MAX_REASON_CHARS * len(index)
        with caplog.at_level(logging.ERROR, logger="taskserve.server.serving.manager"):
            for name in ("yaml_bomb", "long_reason"):
                with pytest.raises(grpc.RpcError):
                    v2.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
    lines = [r.getMessage() for r in caplog.records if "failed to load" in r.getMessage()]
    assert {n for n in ("yaml_bomb", "long_reason") if any(f"model {n} " in line for line in lines)} == {
        "yaml_bomb",
        "long_reason",
    }
    for line in lines:
        assert len(line) <= MAX_REASON_CHARS + 100, len(line)


def test_a_config_yaml_that_is_not_a_regular_file_is_refused_without_reading(tmp_path: Path) -> None:
    """A FIFO would block its load thread forever; a directory used to quote the OSError's path."""
    import os
    import threading

    (tmp_path / "fifo").mkdir()
    os.mkfifo(tmp_path / "fifo" / "config.yaml")
    (tmp_path / "dir" / "config.yaml").mkdir(parents=True)
    for name in ("fifo", "dir"):
        outcome: list[BaseException] = []

        def load(model_dir: Path = tmp_path / name, outcome: list[BaseException] = outcome) -> None:
            try:
                load_model_config(model_dir)
            except BaseException as err:  # noqa: BLE001 - handed to the test thread
                outcome.append(err)

        worker = threading.Thread(target=load, daemon=True)  # daemon: a blocked read must not hang the run
        worker.start()
        worker.join(timeout=30)
        assert not worker.is_alive(), f"{name}: reading config.yaml blocked"
        assert len(outcome) == 1 and isinstance(outcome[0], ConfigError), outcome
        assert outcome[0].message == f"{name}/config.yaml: is not a regular file; make it one"


def test_a_refused_config_value_is_quoted_short(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump({"labels": ["x" * 10_000]}))
    with pytest.raises(ConfigError) as err:
        load_model_config(tmp_path / "m")
    assert "labels: Input should be a valid string (got ['xxx" in err.value.message
    assert len(err.value.message) < 300, len(err.value.message)
