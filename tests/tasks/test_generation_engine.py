"""The generation engine on the tiny Llama entry: the runner's resident cache (chunked
prefill, batched decode over slots of different lengths, dummy rows in gaps) gives the
logits of one full forward pass, and the server reports the engine's metrics."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest

from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc
from taskserve.server.repository.config import load_model_config
from taskserve.server.runtimes.generation import StepRow
from taskserve.server.runtimes.onnx_decoder import OnnxDecoderRunner
from taskserve.server.runtimes.sampling import Sampling, TokenSampler, sample_rows
from tests.support.server import ServerThread

MODEL = "tiny-llama"


def _full_logits(source: Path, ids: list[int]) -> np.ndarray:
    """transformers' logits at every position of ``ids`` in one forward pass."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.inference_mode():
        out: np.ndarray = model(torch.tensor([ids])).logits[0].numpy()
    return out


@pytest.fixture(scope="module")
def runner(task_repository: Path) -> OnnxDecoderRunner:
    entry = task_repository / MODEL
    config = load_model_config(entry)
    assert config.generation is not None
    loaded = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
    loaded.load()
    return loaded


def test_resident_cache_steps_equal_one_forward_pass(runner: OnnxDecoderRunner, tiny_sources: dict[str, Path]) -> None:
    source = tiny_sources[MODEL]
    a = [5, 9, 23, 44, 12, 7, 3, 61, 8]
    b = [17, 2, 90, 33, 41]
    ref_a, ref_b = _full_logits(source, a), _full_logits(source, b)
    tokens = np.asarray
    # Sequence a in slot 2 (slots 0 and 1 stay free), its prompt in two chunks; b in slot 4.
    first = runner.step([StepRow(2, tokens(a[:4]), 0), StepRow(4, tokens(b[:2]), 0)])
    np.testing.assert_allclose(first, [ref_a[3], ref_b[1]], atol=1e-4)
    second = runner.step([StepRow(2, tokens(a[4:7]), 4), StepRow(4, tokens(b[2:3]), 2)])  # b: a one-token row
    np.testing.assert_allclose(second, [ref_a[6], ref_b[2]], atol=1e-4)
    # Decode rows of different lengths (7 and 3 cached) in one call over slots 2..4; slot 3 rides as a dummy row.
    for offset in (0, 1):
        step = runner.step([StepRow(2, tokens(a[7 + offset : 8 + offset]), 7 + offset),
                            StepRow(4, tokens(b[3 + offset : 4 + offset]), 3 + offset)])  # fmt: skip
        np.testing.assert_allclose(step, [ref_a[7 + offset], ref_b[3 + offset]], atol=1e-4)
    runner.release(2)
    runner.release(4)
    # A released slot starts over.
    again = runner.step([StepRow(2, tokens(b[:3]), 0)])
    np.testing.assert_allclose(again[0], ref_b[2], atol=1e-4)
    runner.release(2)


def test_steps_over_the_same_slots_reuse_one_cache_binding_and_old_ranges_are_dropped(
    task_repository: Path, tiny_sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Binding every layer's cache buffers is the costly part of a call: a slot range keeps its
    binding across steps (results unchanged), and only the most recent ranges are kept."""
    import taskserve.server.runtimes.onnx_decoder as onnx_decoder

    monkeypatch.setattr(onnx_decoder, "BINDINGS_KEPT", 2)
    entry = task_repository / MODEL
    config = load_model_config(entry)
    runner = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
    runner.load()
    made: list[int] = []
    session = runner.runtime.session
    new_binding = session.io_binding

    def counted() -> object:
        made.append(1)
        return new_binding()

    monkeypatch.setattr(session, "io_binding", counted)
    ids = [5, 9, 23, 44, 12, 7, 3, 61, 8]
    reference = _full_logits(tiny_sources[MODEL], ids)
    try:
        np.testing.assert_allclose(runner.step([StepRow(0, np.asarray(ids[:4]), 0)])[0], reference[3], atol=1e-4)
        for position in range(4, len(ids)):  # decode steps over slot 0: the prefill's binding again
            got = runner.step([StepRow(0, np.asarray(ids[position : position + 1]), position)])
            np.testing.assert_allclose(got[0], reference[position], atol=1e-4)
        assert len(made) == 1
        for slot in (1, 2):  # two more ranges: the first one's binding is dropped
            runner.step([StepRow(slot, np.asarray(ids[:2]), 0)])
        assert len(made) == 3 and list(runner._bindings) == [(1, 2), (2, 3)]
        runner.release(0)
        np.testing.assert_allclose(runner.step([StepRow(0, np.asarray(ids[:4]), 0)])[0], reference[3], atol=1e-4)
        assert len(made) == 4
    finally:
        runner.close()


def test_first_chunks_of_several_sequences_run_as_one_call_and_equal_one_row_at_a_time(
    runner: OnnxDecoderRunner, task_repository: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Batched prefill (first chunks of different lengths padded into one call, beside a decode
    call and a continuing chunk) gives the logits and greedy tokens of running every row alone,
    in fewer session runs than rows."""
    entry = task_repository / MODEL
    config = load_model_config(entry)
    alone = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
    alone.load()
    calls: list[tuple[int, int, tuple[int, ...]]] = []
    run = runner._run

    def recorded(lo: int, hi: int, tokens: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        calls.append((lo, hi, tokens.shape))
        return run(lo, hi, tokens, *rest)

    monkeypatch.setattr(runner, "_run", recorded)
    rng = np.random.default_rng(3)
    p, q, r, t = (rng.integers(0, alone.vocab_size, n) for n in (9, 5, 3, 6))
    sampler = TokenSampler(Sampling())
    steps = [
        # Two sequences' first chunks (4 and 5 tokens).
        [StepRow(0, p[:4], 0), StepRow(1, q, 0)],
        # A continuing chunk, a decode row, and two first chunks (3 and 6 tokens) with free slot 3 between.
        [StepRow(0, p[4:7], 4), StepRow(1, p[:1], 5), StepRow(2, r, 0), StepRow(4, t, 0)],
        # Decode rows only, and one first chunk beside them.
        [StepRow(0, p[7:8], 7), StepRow(1, q[:1], 6), StepRow(2, t[:1], 3), StepRow(4, r[:1], 6),
         StepRow(5, q[:4], 0)],
    ]  # fmt: skip
    try:
        for rows in steps:
            calls.clear()
            together = runner.step(rows)
            one_by_one = np.stack([alone.step([row])[0] for row in rows])
            np.testing.assert_allclose(together, one_by_one, atol=1e-5)
            # The greedy tokens the engine would sample from each.
            assert sample_rows(together, [sampler] * len(rows)) == sample_rows(one_by_one, [sampler] * len(rows))
            firsts = [row for row in rows if row.start == 0 and len(row.tokens) > 1]
            continuing = [row for row in rows if row.start > 0 and len(row.tokens) > 1]
            decodes = [row for row in rows if len(row.tokens) == 1]
            # One call for the decode rows, one for every first chunk, one per continuing chunk.
            assert len(calls) == bool(decodes) + 1 + len(continuing), calls
            assert len(calls) < len(rows)
            prefill_call = next(c for c in calls if c[2][1] > 1 and c[0] == min(r.slot for r in firsts))
            width = max(len(r.tokens) for r in firsts)
            assert prefill_call[2] == (max(r.slot for r in firsts) + 1 - prefill_call[0], width)
    finally:
        alone.close()
        for slot in (0, 1, 2, 4, 5):
            runner.release(slot)


def _without_logits_index(graph_path: Path, out: Path) -> None:
    """The graph as exported before ``logits_index``: the last position of every row."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(graph_path))
    graph = model.graph
    reshape = next(n for n in graph.node if n.output[0] == "x_flat")
    gather = next(n for n in graph.node if n.output[0] == "x_last")
    index = list(graph.node).index(reshape)
    graph.node.remove(reshape)
    graph.node.remove(gather)
    for name, value in (("old_start", -1), ("old_end", np.iinfo(np.int64).max), ("old_axis", 1)):
        graph.initializer.append(numpy_helper.from_array(np.asarray([value], np.int64), name))
    graph.node.insert(index, helper.make_node("Slice", [reshape.input[0], "old_start", "old_end", "old_axis"], ["x3"]))
    graph.node.insert(index + 1, helper.make_node("Squeeze", ["x3", "old_axis"], ["x_last"]))
    graph.input.remove(next(i for i in graph.input if i.name == "logits_index"))
    onnx.save(model, str(out))


def test_a_graph_exported_before_logits_index_still_runs_each_chunk_alone(
    runner: OnnxDecoderRunner, task_repository: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    entry = task_repository / MODEL
    config = load_model_config(entry)
    _without_logits_index(entry / "1" / config.default_model_filename, tmp_path / "old.onnx")
    old = OnnxDecoderRunner(tmp_path / "old.onnx", config)
    old.load()
    calls: list[tuple[int, ...]] = []
    run = old._run

    def recorded(lo: int, hi: int, tokens: np.ndarray, *rest: np.ndarray) -> np.ndarray:
        calls.append(tokens.shape)
        return run(lo, hi, tokens, *rest)

    monkeypatch.setattr(old, "_run", recorded)
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, old.vocab_size, 6), rng.integers(0, old.vocab_size, 3)
    steps = [[StepRow(0, a[:4], 0), StepRow(1, b, 0)], [StepRow(0, a[4:], 4), StepRow(1, a[:1], 3)]]
    try:
        for rows in steps:
            calls.clear()
            np.testing.assert_allclose(old.step(rows), runner.step(rows), atol=1e-5)
            assert sorted(calls) == sorted((1, len(r.tokens)) for r in rows)  # one call per row
    finally:
        old.close()
        runner.release(0)
        runner.release(1)


def test_the_graph_returns_last_position_logits_and_binds_the_cache(runner: OnnxDecoderRunner) -> None:
    session = runner.runtime.session
    outputs = {o.name: o.shape for o in session.get_outputs()}
    assert len(outputs["logits"]) == 2  # (batch, vocab): the last position only
    inputs = {i.name for i in session.get_inputs()}
    assert {"past_key.0", "past_value.1", "seqlens_k", "total_sequence_length"} <= inputs
    assert "present_key.0" in outputs
    assert runner.cache_bytes > 0 and runner.max_slots == 16


def test_engine_metrics_are_exported(task_server: ServerThread, channel: grpc.Channel) -> None:
    assert task_server.app is not None
    registry = task_server.app.metrics.registry
    labels = {"model": MODEL, "version": "1"}
    before = registry.get_sample_value("taskserve_generated_tokens_total", labels) or 0.0
    ttft_before = registry.get_sample_value("taskserve_time_to_first_token_seconds_count", labels) or 0.0
    stub = tg_grpc.TextGenerationStub(channel)
    messages = list(
        stub.Generate(tg.GenerateRequest(model=common.ModelRef(name=MODEL), prompt="The cat", max_new_tokens=10))
    )
    generated = sum(len(m.token_ids) for m in messages)
    assert registry.get_sample_value("taskserve_generated_tokens_total", labels) == before + generated
    assert registry.get_sample_value("taskserve_time_to_first_token_seconds_count", labels) == ttft_before + 1
    assert (registry.get_sample_value("taskserve_inter_token_latency_seconds_count", labels) or 0) >= generated - 1
    assert registry.get_sample_value("taskserve_running_sequences", labels) is not None
    assert registry.get_sample_value("taskserve_waiting_sequences", labels) == 0
    occupancy = registry.get_sample_value("taskserve_kv_cache_occupancy", labels)
    assert occupancy is not None and 0 <= occupancy <= 1


def test_engine_exports_refuse_quantize_rather_than_write_an_unservable_entry(
    tiny_sources: dict[str, Path], tmp_path: Path
) -> None:
    from taskserve.exporters.api import export_hf
    from taskserve.exporters.errors import UsageError

    with pytest.raises(UsageError, match=r"float32 or --weights int4\|int8 only"):
        export_hf(tiny_sources[MODEL], "text-generation", tmp_path, "q", quantize="int8", progress=False)
    assert not (tmp_path / "q").exists()


def test_an_engine_graph_under_cuda_warns_that_its_attention_stays_on_the_cpu(
    task_repository: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The fp32 graph's GroupQueryAttention has no CUDA kernel: the operator learns to export
    for torch instead (the session's providers are faked; no GPU here)."""
    from taskserve.server.runtimes import onnx_providers

    entry = task_repository / MODEL
    config = load_model_config(entry)
    quiet = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
    faked = OnnxDecoderRunner(entry / "1" / config.default_model_filename, config)
    with caplog.at_level("WARNING"):
        quiet.load()  # the CPU provider: nothing to say
        assert not [r for r in caplog.records if r.levelname == "WARNING"]
        monkeypatch.setattr(onnx_providers, "uses_cuda", lambda active: True)
        faked.load()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "--format torch" in warnings[0] and "GroupQueryAttention" in warnings[0]
    quiet.close()
    faked.close()


def test_the_engine_session_spins_unless_the_config_says_otherwise(tmp_path: Path) -> None:
    """The engine's session is the one model computing while it steps: its threads spin-wait
    between operators by default; an explicit runtime.allow_spinning in config.yaml still decides."""
    from taskserve.server.repository.config import ModelConfig
    from taskserve.server.runtimes.onnx_decoder import OnnxDecoderRunner

    base = {"name": "m", "task": "text-generation", "max_batch_size": 0, "generation": {}}
    unset = OnnxDecoderRunner(tmp_path / "model.onnx", ModelConfig.model_validate(base))
    assert unset.config.runtime.allow_spinning is True
    off = ModelConfig.model_validate({**base, "runtime": {"allow_spinning": False}})
    assert OnnxDecoderRunner(tmp_path / "model.onnx", off).config.runtime.allow_spinning is False
