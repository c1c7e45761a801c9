"""``taskserve-export hf DIR --task text-generation``: the entry the server serves (batching
declarations, end-of-sequence ids, chat template, tokenizer), and the claim those
declarations rest on: a left-padded, masked decode step gives what the step gives alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from taskserve.exporters.cli import main
from taskserve.exporters.sources.hf import decoder_specs
from taskserve.server.repository.config import load_model_config
from tests.support.tiny_hf_models import tiny_causal_lm


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both tiny decoders exported through the CLI into one repository."""
    sources = tmp_path_factory.mktemp("decoder-sources")
    repo = tmp_path_factory.mktemp("decoder-repo")
    entries = {}
    for arch in ("llama", "gpt2"):
        source = tiny_causal_lm(sources / arch, arch)
        args = ["hf", str(source), "--task", "text-generation", "--out", str(repo), "--name", arch, "--quiet"]
        assert main(args) == 0
        entries[arch] = repo / arch
    return entries


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_entry_declares_how_decode_steps_batch(decoders: dict[str, Path], arch: str) -> None:
    entry = decoders[arch]
    config = load_model_config(entry)
    assert config.task == "text-generation" and config.max_batch_size == 32
    assert not config.warmup.enabled
    padding = {t.name: t.padding for t in config.inputs or ()}
    assert padding.pop("input_ids") == "none" and padding.pop("position_ids") == "none"
    assert set(padding.values()) == {"left"} and "attention_mask" in padding  # and every past key/value
    follows = {t.name: t.unpad_like for t in config.outputs or ()}
    assert follows.pop("logits") is None
    assert follows == {name: name.replace("present.", "past_key_values.") for name in follows}
    assert config.task_options["eos_token_ids"] == [2] and config.task_options["max_length"] == 128
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (entry / name).is_file(), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padded_masked_steps_equal_steps_alone(decoders: dict[str, Path], arch: str) -> None:
    session = ort.InferenceSession(str(decoders[arch] / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    past_inputs = [i for i in session.get_inputs() if i.name.startswith("past_key_values.")]
    past_names = [i.name for i in past_inputs]
    heads, size = past_inputs[0].shape[1], past_inputs[0].shape[3]
    names = [o.name for o in session.get_outputs()]

    def run(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, past: dict[str, np.ndarray]) -> dict[str, Any]:
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": positions, **past}
        return dict(zip(names, session.run(names, feeds), strict=True))

    def alone(prompt: list[int], token: int) -> tuple[dict[str, Any], dict[str, Any]]:
        n = len(prompt)
        empty = {p: np.zeros((1, heads, 0, size), np.float32) for p in past_names}
        first = run(np.array([prompt]), np.ones((1, n), np.int64), np.arange(n)[None], empty)
        past = {p: first[p.replace("past_key_values.", "present.")] for p in past_names}
        return past, run(np.array([[token]]), np.ones((1, n + 1), np.int64), np.array([[n]]), past)

    short_past, short_step = alone([5, 17, 42], 7)
    long_past, long_step = alone([9, 3, 88, 120, 61, 14, 200], 11)
    pad = 4
    padded = {
        p: np.concatenate([np.pad(short_past[p], ((0, 0), (0, 0), (pad, 0), (0, 0))), long_past[p]]) for p in past_names
    }
    mask = np.array([[0] * pad + [1] * 4, [1] * 8])
    both = run(np.array([[7], [11]]), mask, np.array([[3], [7]]), padded)
    np.testing.assert_allclose(both["logits"][0], short_step["logits"][0], atol=1e-5)
    np.testing.assert_allclose(both["logits"][1], long_step["logits"][0], atol=1e-5)
    present = past_names[0].replace("past_key_values.", "present.")
    np.testing.assert_allclose(both[present][0, :, pad:], short_step[present][0], atol=1e-5)


def test_a_decoder_without_position_ids_is_never_padded(tmp_path: Path) -> None:
    """Without position_ids the graph derives positions from the padded length: only steps
    of equal shapes may then share a batch."""
    def info(name: str, elem: int, shape: list[object]) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, elem, shape)

    kv = ["batch", 2, "past", 4]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"]),
         helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])],
        "decoder",
        [info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         info("attention_mask", TensorProto.INT64, ["batch", "all"]),
         info("past_key_values.0.key", TensorProto.FLOAT, kv)],
        [info("logits", TensorProto.INT64, ["batch", "seq"]), info("present.0.key", TensorProto.FLOAT, kv)],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    inputs, outputs = decoder_specs(path)
    assert {t.padding for t in inputs} == {"none"}
    assert all(t.unpad_like is None for t in outputs)
