"""Failure paths: a corrupted graph fails validation with a table and writes nothing; bad
arguments end with a clear message and a non-zero exit; --tensorrt writes an entry the server serves."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import numpy_helper

from taskserve.exporters import cli
from taskserve.exporters.errors import ValidationFailed
from taskserve.exporters.sources import hf


def _corrupting_export(real: object) -> object:
    """Wrap the HF source: after export, flip the sign of the classifier weights."""

    def export(*args: object, **kwargs: object) -> object:
        exported = real(*args, **kwargs)  # type: ignore[operator]
        path = exported.work_dir / exported.onnx_files[0]
        model = onnx.load(str(path))
        init = max(model.graph.initializer, key=lambda t: "classifier" in t.name)
        assert "classifier" in init.name
        init.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(init) * 3 + 0.5, init.name))
        onnx.save(model, str(path))
        return exported

    return export


def _no_leftovers(repo: Path) -> None:
    assert not repo.exists() or list(repo.iterdir()) == []


def test_corrupted_graph_fails_with_table_and_writes_nothing(
    tiny_dirs: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(hf, "export_hf", _corrupting_export(hf.export_hf))
    repo = tmp_path / "repo"
    argv = [
        "hf",
        str(tiny_dirs["textcls"]),
        "--task",
        "text-classification",
        "--out",
        str(repo),
        "--name",
        "bad",
    ]
    assert cli.main(argv) == ValidationFailed.exit_code == 3
    err = capsys.readouterr().err
    assert "does not match the source model" in err
    assert "logits" in err and "MISMATCH" in err and "max abs diff" in err
    assert "validate  failed" in err  # the summary table marks the failed step
    assert "Traceback" not in err
    _no_leftovers(repo)


def test_failed_reexport_keeps_the_previous_entry(
    tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = tmp_path / "repo"
    assert (
        cli.main(
            [
                "hf",
                str(tiny_dirs["textcls"]),
                "--task",
                "text-classification",
                "--out",
                str(repo),
                "--name",
                "cls",
                "--quiet",
                "--no-optimize",
            ]
        )
        == 0
    )
    before = (repo / "cls" / "1" / "model.onnx").read_bytes()
    monkeypatch.setattr(hf, "export_hf", _corrupting_export(hf.export_hf))
    with pytest.raises(ValidationFailed):
        from taskserve.exporters.api import export_hf

        export_hf(tiny_dirs["textcls"], "text-classification", repo, "cls", progress=False, optimize=False)
    assert (repo / "cls" / "1" / "model.onnx").read_bytes() == before
    assert sorted(p.name for p in repo.iterdir()) == ["cls"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["hf", "{model}", "--task", "summarize-everything"], "unknown task 'summarize-everything'"),
        (["hf", "{missing}", "--task", "text-classification"], "does not exist"),
        (["hf", "{tmp}", "--task", "text-classification"], "not a Hugging Face model directory"),
        (["sentence-transformers", "{missing}"], "does not exist"),
        (["sentence-transformers", "{model}"], "no modules.json"),
        (["onnx", "{missing}.onnx", "--name", "m"], "does not exist"),
        (
            ["hf", "{model}", "--task", "text-classification", "--quantize", "int4"],
            "unknown quantization 'int4'",
        ),
        (
            ["hf", "{model}", "--task", "text-classification", "--quantize", "int8", "--fp16"],
            "cannot be combined",
        ),
        (["hf", "{model}", "--task", "text-classification", "--name", "bad/name"], "invalid model name"),
        (["demo", "--model", "resnet"], "unknown demo model"),
    ],
)
def test_bad_arguments_exit_2_with_a_clear_message(
    argv: list[str],
    message: str,
    tiny_dirs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    values = {"model": str(tiny_dirs["textcls"]), "missing": str(tmp_path / "nowhere"), "tmp": str(tmp_path)}
    args = [a.format(**values) for a in argv] + ["--out", str(tmp_path / "repo")]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    _no_leftovers(tmp_path / "repo")


@pytest.mark.parametrize("where", ["is_file", "under_file"])
def test_unwritable_output_exits_2(
    where: str, tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "occupied"
    blocker.write_text("a file, not a directory")
    out = blocker if where == "is_file" else blocker / "repo"
    argv = ["hf", str(tiny_dirs["textcls"]), "--task", "text-classification", "--out", str(out)]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert str(out if where == "is_file" else blocker / "repo") in err
    assert "not a directory" in err.lower()


def test_missing_required_argument_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["hf", "some/model"])
    assert exc.value.code == 2
    assert "--task" in capsys.readouterr().err


def test_tensorrt_writes_an_entry_the_server_serves(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Until the native TensorRT runtime has run on a GPU, --tensorrt writes an onnxruntime
    entry with the TensorRT provider first (never ``platform: tensorrt``), on the plain graph;
    it needs no TensorRT to export, and loads here on the CPU fallback."""
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.onnx import OnnxRuntime
    from taskserve.server.runtimes.tensorrt import NATIVE_RUNTIME_VERIFIED

    if NATIVE_RUNTIME_VERIFIED:
        pytest.skip("native TensorRT entries are enabled")
    repo = tmp_path / "repo"
    argv = ["hf", str(tiny_dirs["textcls"]), "--task", "text-classification", "--out", str(repo), "--name", "trt"]
    assert cli.main([*argv, "--tensorrt", "--fp16", "--quiet"]) == 0
    config = load_model_config(repo / "trt")
    assert config.platform == "onnxruntime" and config.default_model_filename == "model.onnx"
    assert config.runtime.execution_providers == ("tensorrt", "cuda", "cpu")
    assert config.runtime.tensorrt.fp16 is True
    assert sorted(p.name for p in (repo / "trt" / "1").iterdir()) == ["model.onnx"]
    ops = {n.op_type for n in onnx.load(str(repo / "trt" / "1" / "model.onnx")).graph.node}
    assert not ops & {"Attention", "SkipLayerNormalization"}  # TensorRT parses the plain graph
    runtime = OnnxRuntime(repo / "trt" / "1" / "model.onnx", config)
    runtime.load()
    assert runtime.providers[-1] == "CPUExecutionProvider"


def test_hub_id_without_network_fails_with_a_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argv = [
        "hf",
        "sentence-transformers/all-MiniLM-L6-v2",
        "--task",
        "feature-extraction",
        "--out",
        str(tmp_path),
    ]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "cannot load 'sentence-transformers/all-MiniLM-L6-v2'" in err and "pass a local directory" in err
    assert list(tmp_path.iterdir()) == []


def test_unknown_task_for_onnx_file_fails_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "onnx",
        str(tmp_path / "m.onnx"),
        "--name",
        "m",
        "--task",
        "regression",
        "--out",
        str(tmp_path / "r"),
    ]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "unknown task 'regression'" in err and "step" not in err  # refused before the steps started
