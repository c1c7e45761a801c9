"""--format torch for transformers heads: the entry the exporter writes loads in the server's
TorchRuntime and matches the ONNX entry of the same model; unsupported sources are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from taskserve.exporters import cli
from taskserve.exporters.api import export_hf
from taskserve.exporters.pipeline import ExportResult
from taskserve.server.repository.config import load_model_config
from taskserve.server.runtimes import create_runtime


def _runtime(entry: Path) -> object:
    config = load_model_config(entry)
    runtime = create_runtime(entry / "1" / config.default_model_filename, config)
    runtime.load()
    return runtime


@pytest.mark.parametrize("name", ["ner", "qa"])  # not the int8-quantized textcls entry
def test_torch_head_matches_the_onnx_entry(
    name: str, tiny_dirs: dict[str, Path], tiny_exports: dict[str, ExportResult], tmp_path: Path
) -> None:
    task = {"ner": "token-classification", "qa": "question-answering"}[name]
    result = export_hf(tiny_dirs[name], task, tmp_path, f"{name}-torch", format="torch", progress=False)
    config = load_model_config(result.entry)
    assert config.platform == "torch" and (result.entry / "1" / "model.safetensors").is_file()
    torch_rt, onnx_rt = _runtime(result.entry), _runtime(tiny_exports[name].entry)
    assert type(torch_rt).__name__ == "TorchRuntime" and type(onnx_rt).__name__ == "OnnxRuntime"
    rng = np.random.default_rng(0)
    ids = rng.integers(5, 90, size=(3, 7), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[2, 5:] = 0
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in {t.name for t in config.inputs or ()}:
        feed["token_type_ids"] = np.zeros_like(ids)
    got = torch_rt.infer(feed)  # type: ignore[attr-defined]
    want = onnx_rt.infer(feed)  # type: ignore[attr-defined]
    assert sorted(got) == sorted(want)
    for key in want:
        np.testing.assert_allclose(got[key], want[key], atol=1e-4)


def test_torch_format_refuses_what_it_cannot_serve(tiny_dirs: dict[str, Path], tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    argv = ["hf", str(tiny_dirs["textcls"]), "--task", "text-classification", "--out", str(tmp_path)]
    assert cli.main([*argv, "--format", "torch", "--fp16"]) == 2
    assert "--format torch cannot be combined" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
