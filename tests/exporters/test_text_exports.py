"""Tiny BERT exports for the five text tasks: the written entry is complete and the served
graph, fed by the entry's own tokenizer.json, reproduces the PyTorch model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from tokenizers import Tokenizer

from taskserve.exporters.pipeline import ExportResult
from taskserve.server.repository.config import load_model_config
from taskserve.server.tasks.readiness import check_options
from tests.exporters.conftest import QUANTIZED, TINY_TEXT
from tests.support.tiny_hf_models import TEXT_LABELS

HEADS = {
    "text-classification": transformers.AutoModelForSequenceClassification,
    "token-classification": transformers.AutoModelForTokenClassification,
    "question-answering": transformers.AutoModelForQuestionAnswering,
    "fill-mask": transformers.AutoModelForMaskedLM,
    "feature-extraction": transformers.AutoModel,
}
SERVED_TASK = {
    "text-classification": "text-classification",
    "token-classification": "token-classification",
    "question-answering": "question-answering",
    "fill-mask": "fill-mask",
    "feature-extraction": "sentence-embedding",
}
# Not among the sentences the tokenizer was trained on or the exporter validated with.
TEXTS = ["The dog barked at the mail carrier.", "Cats sleep a lot!", "Where is the train station in Paris?"]


def _encode(entry: Path, texts: list[str]) -> dict[str, np.ndarray]:
    """Tokenize as the server does: tokenizers' Rust tokenizer, padded with the config's pad value."""
    config = load_model_config(entry)
    tokenizer = Tokenizer.from_file(str(entry / config.task_options["tokenizer"]))
    pad_id = int(next(t.pad_value for t in config.inputs or () if t.name == "input_ids"))
    tokenizer.enable_padding(pad_id=pad_id)
    encodings = tokenizer.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }


def _run(entry: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds), strict=True))


@pytest.mark.parametrize("name", sorted(TINY_TEXT))
def test_entry_is_complete_and_valid(name: str, tiny_exports: dict[str, ExportResult]) -> None:
    entry = tiny_exports[name].entry
    config = load_model_config(entry)
    task = TINY_TEXT[name]
    assert config.task == SERVED_TASK[task]
    assert config.max_batch_size == 32 and config.dynamic_batching.max_queue_delay_us > 0
    assert (entry / "1" / "model.onnx").is_file()
    assert (entry / config.task_options["tokenizer"]).is_file()
    assert config.task_options["max_length"] == 64
    assert [t.name for t in config.inputs or ()] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(t.dims == (-1,) and t.datatype == "INT64" for t in config.inputs or ())
    info = json.loads((entry / "export-info.json").read_text())
    assert info["validation"]["max_abs_diff"] <= info["validation"]["tolerance"]
    if task in ("text-classification", "token-classification"):
        labels = (entry / "labels.txt").read_text().splitlines()
        assert labels == TEXT_LABELS[task]
        assert config.labels == "labels.txt" and len(labels) == config.outputs[0].dims[-1]  # type: ignore[index]


@pytest.mark.parametrize("name", sorted(set(TINY_TEXT) - QUANTIZED))
def test_served_graph_matches_pytorch(
    name: str, tiny_exports: dict[str, ExportResult], tiny_dirs: dict[str, Path]
) -> None:
    entry = tiny_exports[name].entry
    feeds = _encode(entry, TEXTS)
    got = _run(entry, feeds)
    model = HEADS[TINY_TEXT[name]].from_pretrained(tiny_dirs[name]).eval()
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    for output, value in got.items():
        reference = want[output].numpy()
        assert value.shape == reference.shape
        np.testing.assert_allclose(value, reference, atol=1e-4, err_msg=output)


def test_sequence_outputs_unpad_like_input_ids(tiny_exports: dict[str, ExportResult]) -> None:
    for name in ("ner", "qa", "mlm", "embed"):
        config = load_model_config(tiny_exports[name].entry)
        assert all(o.unpad_like == "input_ids" for o in config.outputs or ()), name
    config = load_model_config(tiny_exports["textcls"].entry)
    assert [o.unpad_like for o in config.outputs or ()] == [None]


def test_task_options_per_task(tiny_exports: dict[str, ExportResult]) -> None:
    mlm = load_model_config(tiny_exports["mlm"].entry).task_options
    tokenizer = Tokenizer.from_file(str(tiny_exports["mlm"].entry / "tokenizer.json"))
    assert mlm["mask_token"] == "[MASK]" and mlm["mask_token_id"] == tokenizer.token_to_id("[MASK]")
    embed = load_model_config(tiny_exports["embed"].entry).task_options
    assert embed["pooling"] == "mean" and embed["embedding_output"] == "last_hidden_state"
    assert load_model_config(tiny_exports["textcls"].entry).task_options["activation"] == "softmax"
    for result in tiny_exports.values():  # every entry passes the server's load check on task_options
        check_options(result.entry, load_model_config(result.entry))


def test_optimizer_fused_attention(tiny_exports: dict[str, ExportResult]) -> None:
    graph = onnx.load(str(tiny_exports["ner"].entry / "1" / "model.onnx")).graph
    ops = {n.op_type for n in graph.node}
    assert "Attention" in ops and "SkipLayerNormalization" in ops


def test_int8_entry_reports_accuracy_and_runs_on_cpu(
    tiny_exports: dict[str, ExportResult], tiny_dirs: dict[str, Path]
) -> None:
    result = tiny_exports["textcls"]
    config = load_model_config(result.entry)
    assert config.runtime.execution_providers == ("cpu",)
    ops = {n.op_type for n in onnx.load(str(result.entry / "1" / "model.onnx")).graph.node}
    assert ops & {"QAttention", "MatMulInteger", "DynamicQuantizeMatMul"}
    assert [(a.output, a.metric) for a in result.accuracy] == [("logits", "top-1 agreement")]
    assert 0.0 <= result.accuracy[0].value <= 1.0
    info = json.loads((result.entry / "export-info.json").read_text())
    assert info["options"]["quantize"] == "int8" and info["accuracy"][0]["metric"] == "top-1 agreement"
    # Still close to the float model: quantization noise, not a broken graph.
    feeds = _encode(result.entry, TEXTS)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tiny_dirs["textcls"]).eval()
    with torch.inference_mode():
        want = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits.numpy()
    got = _run(result.entry, feeds)["logits"]
    assert np.abs(got - want).max() < 0.05 * max(1.0, float(np.abs(want).max()))
