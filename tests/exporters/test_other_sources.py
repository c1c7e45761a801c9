"""Vision (YOLOS detector via optimum), a sentence-transformers folder with max pooling,
an arbitrary torch module and an existing ONNX file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from taskserve.exporters.api import (
    export_hf,
    export_onnx_file,
    export_sentence_transformer,
    export_torch_module,
)
from taskserve.exporters.image_options import preprocess
from taskserve.server.repository.config import load_model_config
from tests.support.tiny_hf_models import tiny_detr_like


def _run(entry: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_object_detection_export(tmp_path: Path) -> None:
    source = tiny_detr_like(tmp_path / "yolos")
    result = export_hf(source, "object-detection", tmp_path / "repo", "detector", progress=False)
    config = load_model_config(result.entry)
    assert config.task == "object-detection" and config.max_batch_size == 32
    assert config.inputs is not None and config.inputs[0].dims == (3, 64, 64)
    assert (result.entry / "labels.txt").read_text().split() == ["cat", "dog", "bird"]
    assert (result.entry / "preprocessor_config.json").is_file()
    image = config.task_options["image"]
    assert image["size"] == [64, 64] and image["rescale_factor"] == pytest.approx(1 / 255)
    pixels = np.stack([preprocess(Image.new("RGB", (80, 50), c), image) for c in ("red", "blue")])
    out = _run(result.entry, {"pixel_values": pixels})
    assert out["logits"].shape[0] == 2 and out["logits"].shape[-1] == 4  # 3 classes + no-object
    assert out["pred_boxes"].shape[-1] == 4 and ((out["pred_boxes"] >= 0) & (out["pred_boxes"] <= 1)).all()


def test_sentence_transformers_max_pooling_matches_library(
    tiny_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """A folder built around the tiny BERT; the reference is the sentence-transformers library."""
    folder = tmp_path / "st"
    shutil.copytree(tiny_dirs["embed"], folder)
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps(
            {"word_embedding_dimension": 32, "pooling_mode_max_tokens": True, "pooling_mode_cls_token": True}
        )
    )
    (folder / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            ]
        )
    )
    (folder / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": 48, "do_lower_case": False})
    )
    result = export_sentence_transformer(folder, tmp_path / "repo", "st-max", progress=False)
    config = load_model_config(result.entry)
    assert config.task_options["pooling"] == "cls+max" and config.task_options["normalize"] is False
    assert config.task_options["max_length"] == 48
    assert [(o.name, o.dims) for o in config.outputs or ()] == [("sentence_embedding", (64,))]
    info = json.loads((result.entry / "export-info.json").read_text())
    assert info["source"]["reference"] == "sentence-transformers"
    assert info["validation"]["max_abs_diff"] < 1e-4


class _Scorer(torch.nn.Module):
    """Token ids -> (per-sequence score, per-token states)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.head = torch.nn.Linear(8, 3)

    def forward(self, input_ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        states = self.embed(input_ids) * weights.unsqueeze(-1)
        return self.head(states.mean(1)), states


def test_torch_module_then_onnx_file(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = _Scorer().eval()
    example = {"input_ids": torch.randint(0, 50, (2, 7)), "weights": torch.rand(2, 7)}
    axes = {
        "input_ids": {0: "batch", 1: "sequence"},
        "weights": {0: "batch", 1: "sequence"},
        "scores": {0: "batch"},
        "states": {0: "batch", 1: "sequence"},
    }
    result = export_torch_module(
        module,
        example,
        tmp_path / "repo",
        "scorer",
        output_names=["scores", "states"],
        dynamic_axes=axes,
        labels=["a", "b", "c"],
        task="text-classification",
        max_batch_size=8,
        progress=False,
    )
    config = load_model_config(result.entry)
    assert config.max_batch_size == 8
    assert [(t.name, t.dims, t.unpad_like) for t in config.outputs or ()] == [
        ("scores", (3,), None),
        ("states", (-1, 8), "input_ids"),
    ]
    feeds = {
        "input_ids": np.random.default_rng(1).integers(0, 50, (5, 11)),
        "weights": np.ones((5, 11), np.float32),
    }
    with torch.inference_mode():
        want = module(torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["weights"]))
    got = _run(result.entry, feeds)
    np.testing.assert_allclose(got["scores"], want[0].numpy(), atol=1e-5)

    # The written ONNX file, served again as a plain "tensor" model, keeps its outputs.
    again = export_onnx_file(
        result.entry / "1" / "model.onnx", tmp_path / "repo", "scorer-copy", progress=False
    )
    assert load_model_config(again.entry).task == "tensor"
    np.testing.assert_allclose(_run(again.entry, feeds)["scores"], got["scores"], atol=1e-5)


def scorer_factory() -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[str]]:
    """Factory for ``taskserve-export torch tests.exporters.test_other_sources:scorer_factory``."""
    torch.manual_seed(0)
    return (
        _Scorer().eval(),
        {"input_ids": torch.randint(0, 50, (2, 5)), "weights": torch.rand(2, 5)},
        ["s", "t"],
    )


def test_cli_torch_factory(tmp_path: Path) -> None:
    from taskserve.exporters import cli

    factory = "tests.exporters.test_other_sources:scorer_factory"
    argv = ["torch", factory, "--out", str(tmp_path), "--name", "sc", "--max-batch-size", "4", "--instances", "2",
            "--wide-when-alone", "--quiet"]  # fmt: skip
    assert cli.main(argv) == 0
    config = load_model_config(tmp_path / "sc")
    assert config.max_batch_size == 4 and config.instance_count == 2 and config.runtime.wide_when_alone
    # Default axes: the 2-D integer input gets a sequence axis, the float one only a batch axis.
    assert [(t.name, t.dims) for t in config.inputs or ()] == [("input_ids", (-1,)), ("weights", (5,))]


def test_fp16_keeps_fp32_io(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    import onnx

    result = export_hf(
        tiny_dirs["textcls"], "text-classification", tmp_path, "half", fp16=True, progress=False
    )
    config = load_model_config(result.entry)
    assert config.runtime.tensorrt.fp16 is True
    model = onnx.load(str(result.entry / "1" / "model.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer)
    assert [o.type.tensor_type.elem_type for o in model.graph.output] == [onnx.TensorProto.FLOAT]
    assert result.accuracy and result.accuracy[0].metric == "top-1 agreement"
