"""Model control mode and a confined model repository: names and config paths that would
leave the repository are refused, nothing is loaded, and callers never see server paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from onnx import TensorProto

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.server.errors import InvalidInput
from taskserve.server.repository.paths import OutsideModelDir, check_model_name, resolve_inside, shown
from taskserve.server.tasks.tokenization import TextTokenizer, TokenizerOptions
from tests.support.server import ServerThread, running_server
from tests.support.tiny_models import add_sub_graph, identity_graph, write_entry

SECRET = "top secret line"


def _stub(server: ServerThread) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
    channel = grpc.insecure_channel(server.address)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)


def _index(stub: pb_grpc.GRPCInferenceServiceStub) -> dict[str, pb.RepositoryIndexResponse.ModelIndex]:
    return {m.name: m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}


# -- model control mode ------------------------------------------------------------------


def test_model_control_none_refuses_load_and_unload(small_repository: Path) -> None:
    with running_server(small_repository) as server:  # the default mode
        channel, stub = _stub(server)
        with channel:
            for call, request in (
                (stub.RepositoryModelUnload, pb.RepositoryModelUnloadRequest(model_name="simple")),
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="simple")),
                (stub.RepositoryModelLoad, pb.RepositoryModelLoadRequest(model_name="../outside/other")),
            ):
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=10)
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert "--model-control-mode explicit" in (err.value.details() or "")
            assert stub.ModelReady(pb.ModelReadyRequest(name="simple"), timeout=10).ready  # still serving


def test_model_control_explicit_unloads_and_loads(small_repository: Path) -> None:
    with running_server(small_repository, model_control_mode="explicit") as server:
        channel, stub = _stub(server)
        with channel:
            stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="labelled"), timeout=30)
            assert not stub.ModelReady(pb.ModelReadyRequest(name="labelled"), timeout=10).ready
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="labelled"), timeout=60)
            assert stub.ModelReady(pb.ModelReadyRequest(name="labelled"), timeout=10).ready


# -- names and directories that leave the repository -------------------------------------


@pytest.fixture(scope="module")
def hostile_layout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """repo/ with good models, symlinks out, a labels path out; a model and a secret beside it."""
    root = tmp_path_factory.mktemp("hostile")
    repo = root / "repo"
    write_entry(repo, "simple", add_sub_graph(), {"max_batch_size": 8})
    write_entry(root / "outside", "other", add_sub_graph(), {"max_batch_size": 8})
    (root / "secret.txt").write_text(SECRET + "\n")
    # A whole model directory that is a symlink out of the repository.
    (repo / "escape").symlink_to(root / "outside" / "other", target_is_directory=True)
    # A labels path with '..' and one that is a symlink out.
    graph = identity_graph(TensorProto.FLOAT, ["batch", 2])
    write_entry(repo, "dotdot_labels", graph, {"max_batch_size": 4, "labels": "../../secret.txt"})
    linked = write_entry(repo, "linked_labels", graph, {"max_batch_size": 4, "labels": "labels.txt"})
    (linked / "labels.txt").symlink_to(root / "secret.txt")
    write_entry(repo, "absolute_labels", graph, {"max_batch_size": 4, "labels": str(root / "secret.txt")})
    write_entry(repo, "model_file_out", graph, {"max_batch_size": 4, "default_model_filename": "../../outside.onnx"})
    # A config error: its message must name the file relative to the repository.
    write_entry(repo, "bad_config", graph, {"max_batch_size": 4, "dynamic_batching": {"preferred_batch_sizes": [9]}})
    return repo


@pytest.fixture(scope="module")
def hostile_server(hostile_layout: Path) -> Iterator[ServerThread]:
    with running_server(hostile_layout, model_control_mode="explicit") as server:
        yield server


@pytest.mark.parametrize(
    "name, code",
    [
        ("../outside/other", grpc.StatusCode.INVALID_ARGUMENT),
        ("..", grpc.StatusCode.INVALID_ARGUMENT),
        (".", grpc.StatusCode.INVALID_ARGUMENT),
        ("simple/../simple", grpc.StatusCode.INVALID_ARGUMENT),
        ("/etc", grpc.StatusCode.INVALID_ARGUMENT),
        ("ABSOLUTE", grpc.StatusCode.INVALID_ARGUMENT),  # replaced by the absolute path of 'other'
        (".hidden", grpc.StatusCode.INVALID_ARGUMENT),
        ("escape", grpc.StatusCode.INVALID_ARGUMENT),  # a symlink out of the repository
        ("does-not-exist", grpc.StatusCode.NOT_FOUND),
    ],
)
def test_names_leaving_the_repository_are_refused_and_nothing_loads(
    hostile_server: ServerThread, hostile_layout: Path, name: str, code: grpc.StatusCode
) -> None:
    if name == "ABSOLUTE":
        name = str(hostile_layout.parent / "outside" / "other")
    channel, stub = _stub(hostile_server)
    with channel:
        before = _index(stub)
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=name), timeout=30)
        assert err.value.code() == code, err.value.details()
        # The caller's own name may be echoed back; nothing else of the server's paths.
        assert str(hostile_layout.parent) not in (err.value.details() or "").replace(name, "")
        after = _index(stub)
    assert set(after) == set(before)  # no junk entry for the refused name
    assert "escape" not in after and "other" not in after
    assert hostile_server.app is not None
    assert {m.name for m in hostile_server.app.models.loaded_models()} <= set(before)


@pytest.mark.parametrize("model", ["dotdot_labels", "linked_labels", "absolute_labels", "model_file_out"])
def test_config_paths_out_of_the_model_directory_are_refused_at_load(
    hostile_server: ServerThread, hostile_layout: Path, model: str
) -> None:
    channel, stub = _stub(hostile_server)
    with channel:
        entry = _index(stub)[model]
        assert entry.state == "UNAVAILABLE"
        assert "model directory" in entry.reason
        with pytest.raises(grpc.RpcError) as err:
            stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name=model), timeout=30)
    message = err.value.details() or ""
    for text in (entry.reason, message):
        assert model in text and str(hostile_layout.parent) not in text and SECRET not in text
    assert not hostile_server.app.models.is_ready(model)  # type: ignore[union-attr]


def test_reasons_name_files_relative_to_the_repository(hostile_server: ServerThread, hostile_layout: Path) -> None:
    channel, stub = _stub(hostile_server)
    with channel:
        index = _index(stub)
        reason = index["bad_config"].reason
        assert reason.startswith("bad_config/config.yaml: invalid model configuration")
        for entry in index.values():
            assert str(hostile_layout.parent) not in entry.reason, entry
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(pb.ModelInferRequest(model_name="bad_config"), timeout=10)
        assert str(hostile_layout.parent) not in (err.value.details() or "")
        assert "bad_config/config.yaml" in (err.value.details() or "")


# -- the path helper itself, and a task that opens a file named by its options ------------


def test_resolve_inside(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "labels.txt").write_text("a\n")
    (model / "inner").symlink_to(model / "sub" / "labels.txt")
    (model / "out").symlink_to(tmp_path)
    assert resolve_inside(model, "sub/labels.txt") == (model / "sub" / "labels.txt").resolve()
    assert resolve_inside(model, "inner") == (model / "sub" / "labels.txt").resolve()
    assert resolve_inside(model, "sub/../missing.txt") == (model / "missing.txt").resolve()  # may not exist
    for bad in ("../x", "/etc/passwd", "sub/../../x", "out/elsewhere.txt", ""):
        with pytest.raises(OutsideModelDir) as err:
            resolve_inside(model, bad, "labels")
        assert str(tmp_path) not in err.value.message and err.value.message.startswith("m: labels")
    assert resolve_inside(model, "out/m/sub/labels.txt") == (model / "sub" / "labels.txt").resolve()  # out and back
    assert shown(model / "sub" / "labels.txt", model) == "m/sub/labels.txt"
    for bad in ("..", ".", "../x", "a/b", "", "-x", ".x", "a\x00b", "a b"):
        with pytest.raises(InvalidInput):
            check_model_name(bad)
    assert check_model_name("all-MiniLM-L6-v2.onnx_1") == "all-MiniLM-L6-v2.onnx_1"


def test_a_tokenizer_option_outside_the_model_directory_is_never_read(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "tokenizer.json").write_text("{}")  # would fail to parse if it were read
    with pytest.raises(OutsideModelDir) as err:
        TextTokenizer(tmp_path / "m", TokenizerOptions(tokenizer="../tokenizer.json"), "m")
    assert "task_options.tokenizer" in err.value.message and str(tmp_path) not in err.value.message


def test_startup_lists_no_symlink_out_and_no_odd_names(hostile_server: ServerThread) -> None:
    channel, stub = _stub(hostile_server)
    with channel:
        names = set(_index(stub))
    assert "escape" not in names
    assert {"simple", "bad_config", "dotdot_labels"} <= names
