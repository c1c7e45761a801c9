"""``taskserve-export hf DIR --task text-generation``: every decoder family the exporter takes
(Llama with heads of 8, rotated by graph ops; Llama with heads of 16, rotated inside
GroupQueryAttention; Qwen2, whose query/key/value projections have biases; GPT-2, learned
positions) is written as the generation engine's entry,
loads on the engine's runner and gives transformers' logits there; a decoder the engine's
graph cannot express, or a text-generation graph from elsewhere, is refused at export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from taskserve.exporters.cli import main
from taskserve.server.repository.config import load_model_config
from taskserve.server.runtimes.generation import StepRow
from taskserve.server.runtimes.onnx_decoder import OnnxDecoderRunner
from tests.support.tiny_hf_models import tiny_causal_lm

# Entry name -> (architecture, hidden size): heads of 8, of 16 (Llama, Qwen2), and GPT-2's 16 without rotary.
FAMILIES = {
    "llama-h8": ("llama", 32), "llama-h16": ("llama", 64), "qwen2-h16": ("qwen2", 64), "gpt2": ("gpt2", 32)
}  # fmt: skip


@pytest.fixture(scope="module")
def decoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """Every tiny decoder exported through the CLI into one repository: name -> (source, entry)."""
    sources = tmp_path_factory.mktemp("decoder-sources")
    repo = tmp_path_factory.mktemp("decoder-repo")
    entries = {}
    for name, (arch, hidden) in FAMILIES.items():
        source = tiny_causal_lm(sources / name, arch, hidden_size=hidden)
        args = ["hf", str(source), "--task", "text-generation", "--out", str(repo), "--name", name, "--quiet"]
        assert main(args) == 0
        entries[name] = (source, repo / name)
    return entries


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_exported_decoder_is_an_engine_entry_that_loads(
    decoders: dict[str, tuple[Path, Path]], name: str
) -> None:
    _, entry = decoders[name]
    config = load_model_config(entry)
    assert config.task == "text-generation" and config.generation is not None
    assert config.platform == "onnxruntime" and config.max_batch_size == 0
    assert config.generation.max_model_len == 128  # the tiny models' positions
    assert config.task_options["eos_token_ids"] == [2] and config.task_options["max_length"] == 128
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (entry / file).is_file(), file
    runner = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
    runner.load()
    try:
        inputs = {i.name for i in runner.runtime.session.get_inputs()}
        assert {"input_ids", "seqlens_k", "total_sequence_length", "logits_index", "past_key.1"} <= inputs
        assert not any(n.startswith("past_key_values.") for n in inputs)
    finally:
        runner.close()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_engine_steps_give_transformers_logits(decoders: dict[str, tuple[Path, Path]], name: str) -> None:
    """Two prompts' first chunks in one padded call, a continuing chunk, then decode rows:
    each row's logits are transformers' at that position of one full forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    source, entry = decoders[name]
    config = load_model_config(entry)
    runner = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
    runner.load()
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, runner.vocab_size, 10), rng.integers(0, runner.vocab_size, 6)
    with torch.inference_mode():
        ref_a = model(torch.from_numpy(a[None])).logits[0].numpy()
        ref_b = model(torch.from_numpy(b[None])).logits[0].numpy()
    try:
        got = runner.step([StepRow(0, a[:5], 0), StepRow(1, b[:3], 0)])
        np.testing.assert_allclose(got, [ref_a[4], ref_b[2]], atol=1e-4)
        got = runner.step([StepRow(0, a[5:8], 5), StepRow(1, b[3:4], 3)])
        np.testing.assert_allclose(got, [ref_a[7], ref_b[3]], atol=1e-4)
        got = runner.step([StepRow(0, a[8:9], 8), StepRow(1, b[4:5], 4)])
        np.testing.assert_allclose(got, [ref_a[8], ref_b[4]], atol=1e-4)
    finally:
        runner.close()


def test_a_decoder_the_engine_graph_cannot_express_is_refused_at_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    # Heads of 12: GroupQueryAttention takes multiples of 8 only.
    config = transformers.GPT2Config(vocab_size=64, n_embd=24, n_head=2, n_layer=1, n_positions=32)
    transformers.GPT2LMHeadModel(config).save_pretrained(tmp_path / "source")
    args = ["hf", str(tmp_path / "source"), "--task", "text-generation", "--out", str(tmp_path / "repo"), "--name", "x"]
    assert main([*args, "--quiet"]) == 1
    assert "attention heads of 12" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "x").exists()


def test_a_text_generation_graph_from_elsewhere_is_refused_at_export(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An ONNX file with optimum-style step tensors would be an entry the server refuses: the
    export stops and says which command writes one it serves."""
    kv = ["batch", 2, "past", 4]
    graph = helper.make_graph(
        [helper.make_node("Identity", ["input_ids"], ["logits"]),
         helper.make_node("Identity", ["past_key_values.0.key"], ["present.0.key"])],
        "decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv)],
        [helper.make_tensor_value_info("logits", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, kv)],
    )  # fmt: skip
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path))
    args = ["onnx", str(path), "--task", "text-generation", "--out", str(tmp_path / "repo"), "--name", "x", "--quiet"]
    assert main(args) == 2
    assert "taskserve-export hf MODEL_DIR --task text-generation" in capsys.readouterr().err
    assert not (tmp_path / "repo" / "x").exists()
