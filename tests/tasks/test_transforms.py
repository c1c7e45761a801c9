"""Translation, Summarization and Text2Text end to end through the typed client:
- encoder-decoder models (tiny random-weight T5 and BART built from configs, exported as
  an encoder entry plus a merged-decoder entry) checked token for token against
  transformers' greedy ``generate``;
- a tiny decoder with ``prompt_templates`` (the prompt-backed path), checked against the
  TextGeneration service given the same rendered message."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from taskserve.clients import (
    AsyncTaskServeClient,
    ClientOptions,
    FailedPrecondition,
    InvalidArgument,
    TaskServeClient,
)
from tests.support.server import ServerThread, running_server

SEQ2SEQ = ["tiny-t5", "tiny-bart", "tiny-marian"]
TEXTS = [
    "The cat sat on the mat.",
    "Paris is the capital and most populous city of France.",
    "Stock markets fell sharply on Monday after the report.",
]
T5_TRANSLATION = "translate {source} to {target}: {text}"
PROMPTS = {
    "translation": "Translate from {source} to {target}: {text}",
    "summarization": "Summarize in one sentence: {text}",
    "text2text": "{text}",
}


def _set_options(entry: Path, **options: Any) -> None:
    path = entry / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config.setdefault("task_options", {}).update(options)
    path.write_text(yaml.safe_dump(config, sort_keys=False))


@pytest.fixture(scope="session")
def transform_sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.support import tiny_hf_models as tiny_models

    root = tmp_path_factory.mktemp("transform-sources")
    return {
        "tiny-t5": tiny_models.tiny_seq2seq(root / "t5", "t5"),
        "tiny-bart": tiny_models.tiny_seq2seq(root / "bart", "bart"),
        "tiny-marian": tiny_models.tiny_seq2seq(root / "marian", "marian"),
        "tiny-prompted": tiny_models.tiny_causal_lm(root / "llama", "llama"),
    }


@pytest.fixture(scope="session")
def transform_server(
    tmp_path_factory: pytest.TempPathFactory, transform_sources: dict[str, Path]
) -> Iterator[ServerThread]:
    from taskserve.exporters.api import export_hf

    repo = tmp_path_factory.mktemp("transform-repo")
    for name in SEQ2SEQ:
        export_hf(transform_sources[name], "text2text-generation", repo, name, progress=False)
    _set_options(
        repo / "tiny-t5", prompt_templates={"translation": T5_TRANSLATION}, languages=["English", "German", "French"]
    )
    # An entry exported before encoder-decoders wrote a generation: block: served on the engine's defaults.
    shutil.copytree(repo / "tiny-bart", repo / "tiny-bart-noblock")
    config = yaml.safe_load((repo / "tiny-bart-noblock" / "config.yaml").read_text())
    del config["generation"]
    config["name"] = "tiny-bart-noblock"
    (repo / "tiny-bart-noblock" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # A Marian model translates one language pair: the text as it is, languages checked.
    _set_options(repo / "tiny-marian", languages=["en", "de"])
    export_hf(transform_sources["tiny-prompted"], "text-generation", repo, "tiny-prompted", progress=False)
    _set_options(repo / "tiny-prompted", prompt_templates=PROMPTS, languages=["English", "French"])
    export_hf(transform_sources["tiny-prompted"], "text-generation", repo, "tiny-plain", progress=False)
    with running_server(repo) as server:
        yield server


@pytest.fixture(scope="session")
def client(transform_server: ServerThread) -> Iterator[TaskServeClient]:
    with TaskServeClient(transform_server.address, ClientOptions(timeout_s=60)) as c:
        yield c


def _reference(source: Path, text: str, max_new_tokens: int) -> list[int]:
    """transformers' greedy generate on the PyTorch model, without the decoder start token."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    ids = AutoTokenizer.from_pretrained(source)(text)["input_ids"]
    model = AutoModelForSeq2SeqLM.from_pretrained(source).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, 1:].tolist()  # type: ignore[no-any-return]


def test_transform_services_are_registered(transform_server: ServerThread) -> None:
    assert transform_server.app is not None
    names = set(transform_server.app.service_names)
    assert {"taskserve.v1.Translation", "taskserve.v1.Summarization", "taskserve.v1.Text2Text"} <= names


@pytest.mark.parametrize("name", SEQ2SEQ)
def test_encoder_decoder_greedy_equals_transformers_generate(
    client: TaskServeClient, transform_sources: dict[str, Path], name: str
) -> None:
    for text in TEXTS:
        whole = client.text.text2text(text, model=name, max_new_tokens=24)
        assert list(whole.token_ids) == _reference(transform_sources[name], text, 24), text
        assert whole.finish_reason in ("length", "eos") and whole.usage.generated_tokens == len(whole.token_ids)
        streamed = list(client.text.text2text_stream(text, model=name, max_new_tokens=24))
        assert streamed[-1].finish_reason == whole.finish_reason
        assert "".join(c.text for c in streamed) == whole.text
        assert [i for c in streamed for i in c.token_ids] == list(whole.token_ids)
        summary = client.text.summarize(text, model=name, max_new_tokens=24)
        assert summary.token_ids == whole.token_ids  # no summarization template: the text as it is


def test_t5_translation_writes_the_request_into_its_template(
    client: TaskServeClient, transform_sources: dict[str, Path]
) -> None:
    text = TEXTS[1]
    result = client.text.translate(text, model="tiny-t5", source_language="English", target_language="German",
                                   max_new_tokens=16)  # fmt: skip
    rendered = T5_TRANSLATION.format(source="English", target="German", text=text)
    assert list(result.token_ids) == _reference(transform_sources["tiny-t5"], rendered, 16)
    assert result.served_by.name == "tiny-t5"


def test_marian_translates_its_language_pair_only(client: TaskServeClient, transform_sources: dict[str, Path]) -> None:
    result = client.text.translate(TEXTS[0], model="tiny-marian", source_language="en", target_language="de",
                                   max_new_tokens=16)  # fmt: skip
    assert list(result.token_ids) == _reference(transform_sources["tiny-marian"], TEXTS[0], 16)
    with pytest.raises(InvalidArgument, match="'fr' is not one model 'tiny-marian' knows"):
        client.text.translate(TEXTS[0], model="tiny-marian", source_language="en", target_language="fr")


def test_concurrent_encoder_decoder_requests_equal_one_by_one(
    client: TaskServeClient, transform_server: ServerThread
) -> None:
    alone = [client.text.text2text(t, model="tiny-bart", max_new_tokens=20).token_ids for t in TEXTS]

    async def together(address: str) -> list[tuple[int, ...]]:
        async with AsyncTaskServeClient(address) as aclient:
            results = await asyncio.gather(
                *(aclient.text.text2text(t, model="tiny-bart", max_new_tokens=20) for t in TEXTS)
            )
        return [r.token_ids for r in results]

    assert asyncio.run(together(transform_server.address)) == alone


def test_bad_requests_are_invalid_argument(client: TaskServeClient) -> None:
    with pytest.raises(InvalidArgument, match="text is empty"):
        client.text.text2text("  ", model="tiny-bart")
    with pytest.raises(InvalidArgument, match="Klingon"):
        client.text.translate("Hello.", model="tiny-t5", source_language="English", target_language="Klingon")
    with pytest.raises(InvalidArgument, match="source_language"):
        client.text.translate("Hello.", model="tiny-t5", target_language="German")
    with pytest.raises(InvalidArgument, match="Klingon"):
        client.text.translate("Hello.", model="tiny-prompted", source_language="Klingon", target_language="French")
    with pytest.raises(InvalidArgument, match="empty"):
        client.text.summarize("", model="tiny-prompted")
    with pytest.raises(InvalidArgument, match="max_new_tokens"):
        client.text.text2text("Hello.", model="tiny-bart", max_new_tokens=10_000)
    with pytest.raises(InvalidArgument, match="too long|tokens|characters"):
        client.text.text2text("word " * 400, model="tiny-t5")


def test_models_without_the_ability_are_failed_precondition(client: TaskServeClient) -> None:
    with pytest.raises(FailedPrecondition, match="prompt_templates"):
        client.text.summarize("Some text.", model="tiny-plain")
    with pytest.raises(FailedPrecondition, match="tensor"):
        client.text.summarize("Some text.", model="tiny-t5-encoder")


@pytest.mark.parametrize("kind", ["translation", "summarization", "text2text"])
def test_prompt_backed_transforms_equal_text_generation_of_the_rendered_message(
    client: TaskServeClient, kind: str
) -> None:
    text = TEXTS[0]
    rendered = PROMPTS[kind].format(source="English", target="French", text=text)
    expected = client.text.generate_text(
        model="tiny-prompted", messages=[{"role": "user", "content": rendered}], max_new_tokens=12
    )
    if kind == "translation":
        whole = client.text.translate(text, model="tiny-prompted", source_language="English",
                                      target_language="French", max_new_tokens=12)  # fmt: skip
        streamed = list(client.text.translate_stream(text, model="tiny-prompted", source_language="English",
                                                     target_language="French", max_new_tokens=12))  # fmt: skip
    elif kind == "summarization":
        whole = client.text.summarize(text, model="tiny-prompted", max_new_tokens=12)
        streamed = list(client.text.summarize_stream(text, model="tiny-prompted", max_new_tokens=12))
    else:
        whole = client.text.text2text(text, model="tiny-prompted", max_new_tokens=12)
        streamed = list(client.text.text2text_stream(text, model="tiny-prompted", max_new_tokens=12))
    assert (whole.text, whole.token_ids, whole.usage) == (expected.text, expected.token_ids, expected.usage)
    assert [i for c in streamed for i in c.token_ids] == list(expected.token_ids)
    assert streamed[-1].finish_reason == expected.finish_reason


def test_async_client_transforms(transform_server: ServerThread) -> None:
    async def run() -> tuple[Any, list[Any]]:
        async with AsyncTaskServeClient(transform_server.address) as aclient:
            whole = await aclient.text.summarize(TEXTS[2], model="tiny-t5", max_new_tokens=10)
            chunks = [c async for c in aclient.text.summarize_stream(TEXTS[2], model="tiny-t5", max_new_tokens=10)]
        return whole, chunks

    whole, chunks = asyncio.run(run())
    assert [i for c in chunks for i in c.token_ids] == list(whole.token_ids)
    assert whole.usage.generated_tokens == len(whole.token_ids) > 0


def _encoder_states(repo: Path, name: str, ids: np.ndarray) -> np.ndarray:
    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.onnx import OnnxRuntime

    entry = repo / f"{name}-encoder"
    encoder = OnnxRuntime(entry / "1" / load_model_config(entry).default_model_filename, load_model_config(entry))
    encoder.load()
    states = encoder.infer({"input_ids": ids[None], "attention_mask": np.ones_like(ids)[None]})["last_hidden_state"]
    encoder.close()
    return np.asarray(states[0])


def test_seq2seq_runner_interleaves_slots_like_generate(
    transform_server: ServerThread, transform_sources: dict[str, Path]
) -> None:
    """The engine's encoder-decoder runner: three sequences stepping in one ``step`` call each
    iteration, each equal to transformers' greedy generate. Slots 0 and 1 (sources of different
    lengths, started together) share one decoder call per step; slot 2, started three steps
    later, holds a different cache length and gets its own."""
    from transformers import AutoTokenizer

    from taskserve.server.repository.config import load_model_config
    from taskserve.server.runtimes.generation import StepRow
    from taskserve.server.runtimes.onnx import OnnxRuntime
    from taskserve.server.runtimes.seq2seq_runner import Seq2SeqRunner

    assert transform_server.app is not None
    repo = transform_server.app.models.repository
    config = load_model_config(repo / "tiny-t5")
    decoder = OnnxRuntime(repo / "tiny-t5" / "1" / config.default_model_filename, config)
    decoder.load()
    calls: list[int] = []
    infer = decoder.infer

    def counted(inputs: dict[str, np.ndarray], output_names: list[str] | None = None) -> dict[str, np.ndarray]:
        calls.append(len(inputs["input_ids"]))
        return infer(inputs, output_names)

    decoder.infer = counted  # type: ignore[method-assign]
    runner = Seq2SeqRunner(decoder, max_slots=4, max_model_len=64)
    tokenizer = AutoTokenizer.from_pretrained(transform_sources["tiny-t5"])
    sources = {slot: np.asarray(tokenizer(TEXTS[slot])["input_ids"], np.int64) for slot in (0, 1, 2)}
    assert len({len(ids) for ids in sources.values()}) == 3
    states = {slot: _encoder_states(repo, "tiny-t5", ids) for slot, ids in sources.items()}
    generated: dict[int, list[int]] = {0: [], 1: [], 2: []}
    for step in range(15):
        rows = []
        for slot in (0, 1, 2) if step >= 3 else (0, 1):
            last = generated[slot][-1] if generated[slot] else 0  # 0: T5's decoder start
            rows.append(
                StepRow(slot, np.asarray([last]), len(generated[slot]), None if generated[slot] else states[slot])
            )
        logits = runner.step(rows)
        assert logits.shape == (len(rows), runner.vocab_size)
        for i, row in enumerate(rows):
            generated[row.slot].append(int(logits[i].argmax()))
    assert calls == [2] * 3 + [2, 1] * 12
    assert runner.cache_bytes > 0
    for slot in (0, 1, 2):
        reference = _reference(transform_sources["tiny-t5"], TEXTS[slot], 12)
        assert generated[slot][: len(reference)] == reference
    runner.release(0)
    with pytest.raises(Exception, match="encoder_states"):
        runner.step([StepRow(0, np.asarray([0]), 0)])
    runner.close()


def test_encoder_decoder_runs_on_the_generation_engine_sharing_iterations(
    client: TaskServeClient, transform_server: ServerThread
) -> None:
    """Concurrent requests' decoder steps share engine iterations: fewer iterations than
    tokens generated (one by one, every token would take an iteration of its own)."""
    from taskserve.server.scheduling.generation_scheduler import GenerationScheduler

    assert transform_server.app is not None
    engine = transform_server.app.models.get("tiny-bart").engine
    assert isinstance(engine, GenerationScheduler)
    texts = TEXTS * 2
    before = engine.iterations

    async def together(address: str) -> list[Any]:
        async with AsyncTaskServeClient(address) as aclient:
            return await asyncio.gather(
                *(aclient.text.text2text(t, model="tiny-bart", max_new_tokens=20) for t in texts)
            )

    results = asyncio.run(together(transform_server.address))
    tokens = sum(r.usage.generated_tokens for r in results)
    iterations = engine.iterations - before
    assert tokens >= len(texts) and iterations < tokens, (iterations, tokens)
    assert engine.running_count == engine.waiting_count == 0


def test_an_entry_without_a_generation_block_runs_on_the_engine_defaults(client: TaskServeClient) -> None:
    expected = client.text.text2text(TEXTS[0], model="tiny-bart", max_new_tokens=16)
    assert client.text.text2text(TEXTS[0], model="tiny-bart-noblock", max_new_tokens=16).token_ids == expected.token_ids


def test_encoder_decoder_export_writes_two_entries_the_server_serves(transform_server: ServerThread) -> None:
    from taskserve.exporters.repository_entry import entry_complete
    from taskserve.server.repository.config import load_model_config

    assert transform_server.app is not None
    repo = transform_server.app.models.repository
    encoder, decoder = load_model_config(repo / "tiny-bart-encoder"), load_model_config(repo / "tiny-bart")
    assert (encoder.task, encoder.max_batch_size) == ("tensor", 0)
    assert (decoder.task, decoder.default_model_filename) == ("text2text-generation", "decoder_model_merged.onnx")
    assert decoder.task_options["encoder_model"] == "tiny-bart-encoder"
    assert decoder.task_options["decoder_start_token_id"] == 1
    # The decoder steps on the generation engine; max_model_len from the model's positions (tiny: 128).
    assert decoder.generation is not None and decoder.generation.max_model_len == 128
    assert entry_complete(repo / "tiny-bart") and entry_complete(repo / "tiny-bart-encoder")
    assert not (repo / "tiny-bart" / "1" / "encoder_model.onnx").exists()
    models = transform_server.app.models
    assert models.is_ready("tiny-bart-encoder") and models.is_ready("tiny-bart")


def test_an_encoder_decoder_speaks_the_llm_convention_over_v2(
    client: TaskServeClient, transform_server: ServerThread
) -> None:
    """tritonclient.grpc: text_input -> text_output on the merged decoder entry is the
    Text2Text service's greedy text, whole (ModelInfer) and chunk by chunk (ModelStreamInfer)."""
    import json
    import queue

    import tritonclient.grpc as tc

    text = TEXTS[1]
    expected = client.text.text2text(text, model="tiny-bart", max_new_tokens=20)
    chunks = list(client.text.text2text_stream(text, model="tiny-bart", max_new_tokens=20))

    def inputs(stream: bool) -> list[Any]:
        names = (("text_input", "BYTES"), ("sampling_parameters", "BYTES"), ("stream", "BOOL"),
                 ("exclude_input_in_output", "BOOL"))  # fmt: skip
        tensors = [tc.InferInput(name, [1], datatype) for name, datatype in names]
        tensors[0].set_data_from_numpy(np.array([text.encode()], dtype=np.object_))
        tensors[1].set_data_from_numpy(np.array([json.dumps({"max_tokens": 20}).encode()], dtype=np.object_))
        tensors[2].set_data_from_numpy(np.array([stream]))
        tensors[3].set_data_from_numpy(np.array([True]))
        return tensors

    with tc.InferenceServerClient(transform_server.address) as triton:
        assert [t.name for t in triton.get_model_metadata("tiny-bart").inputs][0] == "text_input"
        whole = triton.infer("tiny-bart", inputs(stream=False))
        assert whole.as_numpy("text_output")[0].decode() == expected.text
        results: queue.Queue[tuple[Any, Any]] = queue.Queue()
        triton.start_stream(callback=lambda result, error: results.put((result, error)))
        try:
            triton.async_stream_infer("tiny-bart", inputs(stream=True))
            texts = []
            while True:
                result, error = results.get(timeout=60)
                assert error is None, error
                texts.append(result.as_numpy("text_output")[0].decode())
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
        finally:
            triton.stop_stream()
    assert texts == [c.text for c in chunks]
