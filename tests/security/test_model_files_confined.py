"""Every file the server reads for a model stays inside the model's directory: config.yaml
itself, and every task option that names a file (typed ``ModelFile``, tasks/options.py), for
every task of the registry (tasks/registry.py). The walk below covers each such option
automatically, so a file option added later is tested without touching this file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import yaml
from onnx import TensorProto

from taskserve.protocol.generated.inference import grpc_service_pb2 as pb
from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from taskserve.server.tasks.options import file_options
from taskserve.server.tasks.registry import ROWS
from tests.support.server import running_server
from tests.support.tiny_models import identity_graph, write_entry

SECRET = "top-secret-value-4711"
# Values that name a file outside the model directory, each its own way.
KINDS = ("absolute", "dotdot", "symlink", "default-symlink")


@dataclass(frozen=True)
class Case:
    task: str
    option: str
    kind: str
    value: str | None  # None: the option is unset and its default file is a symlink out


@dataclass(frozen=True)
class Layout:
    root: Path
    repo: Path
    cases: dict[str, Case]


def _cases(root: Path) -> list[Case]:
    cases = []
    for row in sorted(ROWS, key=lambda r: r.task):
        task = row.task
        for option, default in file_options(row.options).items():
            for kind in KINDS:
                if kind == "default-symlink" and default is None:
                    continue
                value = {
                    "absolute": str(root / "secret.json"),
                    "dotdot": "../../secret.json",
                    "symlink": "linked.json",
                    "default-symlink": None,
                }[kind]
                cases.append(Case(task, option, kind, value))
    return cases


def _file_options(task: str) -> dict[str, str | None]:
    return file_options(next(row.options for row in ROWS if row.task == task))


@pytest.fixture(scope="module")
def layout(tmp_path_factory: pytest.TempPathFactory) -> Layout:
    root = tmp_path_factory.mktemp("files-out")
    repo = root / "repo"
    (root / "secret.json").write_text(json.dumps({SECRET: SECRET, "num_train_timesteps": 10}))
    graph = identity_graph(TensorProto.FLOAT, ["batch", 2])
    cases: dict[str, Case] = {}
    for i, case in enumerate(_cases(root)):
        name = f"walk{i}"
        options = {} if case.value is None else {case.option: case.value}
        config = {"max_batch_size": 4, "task": case.task, "task_options": options}
        if case.task == "text-generation":
            config["generation"] = {}  # every text-generation entry is an engine entry
        model_dir = write_entry(repo, name, graph, config)
        if case.value is None:  # the file the task reads when the option is unset
            (model_dir / str(_file_options(case.task)[case.option])).symlink_to(root / "secret.json")
        else:
            (model_dir / "linked.json").symlink_to(root / "secret.json")
        cases[name] = case
    # config.yaml itself a symlink out: a valid config (today it comes up READY) and one
    # whose values would be echoed in the load error.
    (root / "outside-valid.yaml").write_text(yaml.safe_dump({"max_batch_size": 4}))
    (root / "outside-secret.yaml").write_text(yaml.safe_dump({"max_batch_size": 4, "instance_count": SECRET}))
    for name, target in (("config_link_valid", "outside-valid.yaml"), ("config_link_secret", "outside-secret.yaml")):
        model_dir = write_entry(repo, name, graph, {})
        (model_dir / "config.yaml").unlink()
        (model_dir / "config.yaml").symlink_to(root / target)
    # A config.yaml symlinked inside its model directory is fine.
    inside = write_entry(repo, "config_link_inside", graph, {})
    (inside / "config.yaml").unlink()
    (inside / "real-config.yaml").write_text(yaml.safe_dump({"max_batch_size": 4}))
    (inside / "config.yaml").symlink_to("real-config.yaml")
    return Layout(root, repo, cases)


@pytest.fixture(scope="module")
def index(layout: Layout) -> Iterator[dict[str, pb.RepositoryIndexResponse.ModelIndex]]:
    with running_server(layout.repo, model_control_mode="explicit") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            models = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=30).models
            yield {m.name: m for m in models}


def _assert_says_nothing_of_the_target(layout: Layout, text: str) -> None:
    assert SECRET not in text, text
    assert str(layout.root) not in text and str(layout.root.resolve()) not in text, text
    assert "secret.json" not in text and "outside-" not in text, text


def test_a_config_yaml_symlinked_out_of_the_model_directory_is_refused(
    layout: Layout, index: dict[str, pb.RepositoryIndexResponse.ModelIndex]
) -> None:
    for name in ("config_link_valid", "config_link_secret"):
        entry = index[name]
        assert entry.state == "UNAVAILABLE", (name, entry)
        assert "config.yaml" in entry.reason and "outside the model directory" in entry.reason, entry.reason
        _assert_says_nothing_of_the_target(layout, entry.reason)
    assert index["config_link_inside"].state == "READY", index["config_link_inside"].reason


def test_every_file_option_of_every_task_is_confined_at_load(
    layout: Layout, index: dict[str, pb.RepositoryIndexResponse.ModelIndex]
) -> None:
    walked = {(c.task, c.option) for c in layout.cases.values()}
    # The walk reaches the known file options (image generation's scheduler_config included).
    assert {
        ("image-generation", "scheduler_config"),
        ("image-generation", "tokenizer"),
        ("text-generation", "chat_template"),
        ("text-generation", "generation_config"),
        ("text2text-generation", "generation_config"),
        ("image-classification", "preprocessor_config"),
        ("text-classification", "tokenizer"),
    } <= walked
    assert {c.kind for c in layout.cases.values()} == set(KINDS)
    for name, case in layout.cases.items():
        entry = index[name]
        assert entry.state == "UNAVAILABLE", (case, entry)
        assert f"task_options.{case.option}" in entry.reason, (case, entry.reason)
        assert "inside the model directory" in entry.reason, (case, entry.reason)
        if case.value is not None:
            assert case.value not in entry.reason, (case, entry.reason)  # names the option, not the path
        _assert_says_nothing_of_the_target(layout, entry.reason)


def test_options_that_look_like_files_are_declared_as_files() -> None:
    """A new option named like a file but typed ``str`` would escape the walk above."""
    suffixes = ("_config", "_file", "_path", "_dir", "_template", "tokenizer")
    for row in ROWS:
        for key in row.options.model_fields:
            if key.endswith(suffixes):
                assert key in file_options(row.options), (
                    f"{row.task}: task_options.{key} names a file; type it ModelFile"
                )
