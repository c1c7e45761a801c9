"""The text-generation task and its per-token parts without a model: a scripted
generation engine plays the decoder, so end-of-sequence, cancellation, held text and
limits are checked exactly; and an entry the engine cannot run is refused at load."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from taskserve.server.errors import ConfigError, InvalidInput, Overloaded
from taskserve.server.metrics import ServerMetrics
from taskserve.server.repository.config import ModelConfig, load_model_config
from taskserve.server.scheduling.engine_api import GenerationEngine, SequenceRequest, TokenStream
from taskserve.server.serving.manager import ModelManager
from taskserve.server.tasks.base import CallOptions, TaskConfigError, TaskContext
from taskserve.server.tasks.chat_template import ChatMessage
from taskserve.server.tasks.decoding import IncrementalDecoder, Sampling, TextStream, TokenPicker
from taskserve.server.tasks.text_generation import FinishReason, GenerateParams, GenerationChunk, TextGenerator

VOCAB = 300  # 256 byte tokens, then <eos> (256)
EOS = 256


def byte_tokenizer() -> Tokenizer:
    """One token per byte (ids 0-255 in byte order) plus <eos>: every multi-byte character splits."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=lambda c: _byte_of(c))
    vocab = {c: i for i, c in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<eos>"])
    return tok


def _byte_of(char: str) -> int:
    from transformers.models.gpt2.tokenization_gpt2 import bytes_to_unicode

    return {v: k for k, v in bytes_to_unicode().items()}[char]


class ScriptedStream:
    """A sequence that 'generates' the engine's script, one token per step, up to its
    ``max_new_tokens``; ``gate`` (set by a test) holds a step until it is set."""

    def __init__(self, engine: ScriptedEngine, request: SequenceRequest) -> None:
        self.engine, self.request = engine, request
        self.cancelled = False

    async def _tokens(self) -> AsyncIterator[int]:
        engine = self.engine
        for _ in range(self.request.max_new_tokens):
            if engine.gate_after is not None and engine.steps >= engine.gate_after:
                await engine.gate.wait()
            if self.cancelled:
                return
            token = engine.script[min(engine.steps, len(engine.script) - 1)]
            engine.steps += 1
            yield token
            if token in self.request.stop_token_ids:
                return

    def __aiter__(self) -> AsyncIterator[int]:
        return self._tokens()

    def cancel(self) -> None:
        self.cancelled = True


class ScriptedEngine(GenerationEngine):
    """Plays a decoder on the generation engine: every sequence gets the script's tokens."""

    def __init__(self, script: Sequence[int], max_model_len: int) -> None:
        self.script = list(script)
        self._max_model_len = max_model_len
        self.requests: list[SequenceRequest] = []
        self.streams: list[ScriptedStream] = []
        self.steps = 0
        self.gate = asyncio.Event()
        self.gate_after: int | None = None

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    def generate(self, request: SequenceRequest) -> TokenStream:
        self.requests.append(request)
        self.streams.append(ScriptedStream(self, request))
        return self.streams[-1]

    async def start(self) -> None:
        return None

    def inflight_count(self) -> int:
        return 0

    async def stop(self, drain: bool = True) -> None:
        return None


@dataclass
class EngineModel:
    name: str
    config: ModelConfig
    model_dir: Path
    engine: ScriptedEngine | None
    scheduler: None = None
    version: str = "1"
    stages: list[str] = field(default_factory=list)


def decoder_model(tmp_path: Path, script: Sequence[int], max_length: int = 64, **options: Any) -> EngineModel:
    model_dir = tmp_path / "decoder"
    model_dir.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save(str(model_dir / "tokenizer.json"))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    config = ModelConfig.model_validate(
        {
            "name": "decoder",
            "task": "text-generation",
            "inputs": [{"name": "input_ids", "datatype": "INT64", "dims": [-1, -1]}],
            "task_options": {"max_length": max_length, **options},
            "generation": {"max_model_len": max_length},
        }
    )
    return EngineModel("decoder", config, model_dir, ScriptedEngine(script, max_length))


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


async def run(task: TextGenerator, prompt: str = "Hi", **params: Any) -> list[GenerationChunk]:
    return [c async for c in task.generate(prompt, [], GenerateParams(**params), CallOptions())]


@pytest.fixture
def context() -> Any:
    ctx = TaskContext(workers=1)
    yield ctx
    ctx.close()


async def test_eos_ends_the_generation_without_its_text(tmp_path: Path, context: TaskContext) -> None:
    script = [*byte_ids("ok!"), EOS, *byte_ids("never")]
    model = decoder_model(tmp_path, script)
    chunks = await run(TextGenerator.load(model, context), max_new_tokens=20)
    assert "".join(c.text for c in chunks) == "ok!"
    last = chunks[-1]
    assert last.finish_reason is FinishReason.EOS and last.token_ids[-1] == EOS
    assert last.usage is not None and (last.usage.prompt_tokens, last.usage.generated_tokens) == (2, 4)
    assert model.engine is not None and model.engine.steps == 4  # no step after the EOS token


async def test_multi_byte_characters_are_held_until_complete(tmp_path: Path, context: TaskContext) -> None:
    text = "a\u00e9\u65e5\U0001f600b"
    chunks = await run(TextGenerator.load(decoder_model(tmp_path, [*byte_ids(text), EOS]), context))
    assert [c.text for c in chunks] == ["a", "\u00e9", "\u65e5", "\U0001f600", "b", ""]
    assert [len(c.token_ids) for c in chunks] == [1, 2, 3, 4, 1, 1]


async def test_stop_string_across_tokens_is_held_then_cut(tmp_path: Path, context: TaskContext) -> None:
    task = TextGenerator.load(decoder_model(tmp_path, byte_ids("one ENDtwo")), context)
    chunks = await run(task, stop=("END",), max_new_tokens=30)
    assert "".join(c.text for c in chunks) == "one "
    assert chunks[-1].finish_reason is FinishReason.STOP
    # "E" and "EN" could begin the stop string, so they were never sent.
    assert all("E" not in c.text for c in chunks)
    # A prefix that turns out not to be the stop string is released.
    task = TextGenerator.load(decoder_model(tmp_path / "2", byte_ids("ENTER")), context)
    chunks = await run(task, stop=("END",), max_new_tokens=5)
    assert "".join(c.text for c in chunks) == "ENTER" and chunks[-1].finish_reason is FinishReason.LENGTH


async def test_cancelling_the_consumer_stops_the_steps(tmp_path: Path, context: TaskContext) -> None:
    model = decoder_model(tmp_path, byte_ids("x" * 50))
    engine = model.engine
    assert engine is not None
    engine.gate_after = 3  # the fourth step hangs until the consumer goes away
    task = TextGenerator.load(model, context)
    got: list[GenerationChunk] = []

    async def consume() -> None:
        async for chunk in task.generate("Hi", [], GenerateParams(max_new_tokens=50), CallOptions()):
            got.append(chunk)

    consumer = asyncio.ensure_future(consume())
    async with asyncio.timeout(10):
        while len(got) < 3:
            await asyncio.sleep(0.01)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    # Leaving the stream cancels the sequence, which frees its engine slot.
    [stream] = engine.streams
    assert stream.cancelled
    engine.gate.set()
    assert engine.steps == 3


async def test_limits_are_checked_before_any_step(tmp_path: Path, context: TaskContext) -> None:
    model = decoder_model(tmp_path, [EOS], max_length=16, max_new_tokens_limit=10)
    task = TextGenerator.load(model, context)
    with pytest.raises(InvalidInput, match=r"is 20 tokens long; model 'decoder' handles 16 positions"):
        await run(task, prompt="x" * 20)
    with pytest.raises(InvalidInput, match="ask for at most 6 new tokens"):
        await run(task, prompt="x" * 10, max_new_tokens=8)
    with pytest.raises(InvalidInput, match="over the limit of 10"):
        await run(task, max_new_tokens=11)
    with pytest.raises(InvalidInput, match="no chat template"):
        [c async for c in task.generate("", [ChatMessage("user", "hi")], GenerateParams(), CallOptions())]
    with pytest.raises(InvalidInput, match="top_p"):
        await run(task, sampling=Sampling(temperature=1.0, top_p=1.5))
    assert model.engine is not None and model.engine.requests == []
    # The default shrinks to the room the prompt leaves instead of failing.
    chunks = await run(TextGenerator.load(decoder_model(tmp_path / "2", byte_ids("y" * 40), max_length=16), context),
                       prompt="x" * 10)  # fmt: skip
    assert chunks[-1].usage is not None and chunks[-1].usage.generated_tokens == 6


async def test_chat_template_from_tokenizer_config(tmp_path: Path, context: TaskContext) -> None:
    model = decoder_model(tmp_path, [EOS])
    (model.model_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "eos_token": "<eos>",
                "chat_template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}",
            }
        )
    )
    task = TextGenerator.load(model, context)
    chunks = [c async for c in task.generate("", [ChatMessage("user", "hi")], GenerateParams(), CallOptions())]
    assert model.engine is not None
    [request] = model.engine.requests
    sent = bytes(i for i in request.prompt if i < 256).decode()
    assert sent == "[user]hi[assistant]"
    assert request.prompt[-1] == EOS  # special tokens in the template are tokens
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(sent) + 1


# The config.yaml optimum-era exports wrote for a decoder: its step graph carries the whole
# past_key_values in and out on every token, through the request batcher; no generation: block.
OLD_STYLE_ENTRY = """\
name: old-gpt2
task: text-generation
max_batch_size: 32
inputs:
  - {name: input_ids, datatype: INT64, dims: [-1], padding: none}
  - {name: attention_mask, datatype: INT64, dims: [-1], padding: left}
  - {name: past_key_values.0.key, datatype: FP32, dims: [2, -1, 16], padding: left}
  - {name: past_key_values.0.value, datatype: FP32, dims: [2, -1, 16], padding: left}
outputs:
  - {name: logits, datatype: FP32, dims: [-1, 400]}
  - {name: present.0.key, datatype: FP32, dims: [2, -1, 16], unpad_like: past_key_values.0.key}
  - {name: present.0.value, datatype: FP32, dims: [2, -1, 16], unpad_like: past_key_values.0.value}
task_options: {tokenizer: tokenizer.json, max_length: 128}
"""
REEXPORT = "taskserve-export hf MODEL_DIR --task text-generation --out REPOSITORY --name old-gpt2"


async def test_an_old_style_decoder_entry_is_refused_at_load_with_how_to_export_one(tmp_path: Path) -> None:
    entry = tmp_path / "repo" / "old-gpt2"
    (entry / "1").mkdir(parents=True)
    (entry / "1" / "model.onnx").write_bytes(b"not read: the config is refused first")
    (entry / "config.yaml").write_text(OLD_STYLE_ENTRY)
    with pytest.raises(ConfigError, match="no generation: block") as refused:
        load_model_config(entry)
    assert REEXPORT in refused.value.message
    manager = ModelManager(tmp_path / "repo", ServerMetrics())
    try:
        await manager.load("old-gpt2")
        [index] = manager.index()
        assert index.state.name == "UNAVAILABLE" and REEXPORT in index.reason
        assert str(tmp_path) not in index.reason
    finally:
        await manager.stop()


def test_a_text_generation_task_without_an_engine_is_refused(tmp_path: Path, context: TaskContext) -> None:
    model = decoder_model(tmp_path, [EOS])
    model.engine = None
    with pytest.raises(TaskConfigError, match="not served by the generation engine"):
        TextGenerator.load(model, context)


# -- the per-token parts ----------------------------------------------------------------


def test_incremental_decoder_never_releases_half_a_character() -> None:
    tok = byte_tokenizer()
    text = "Caf\u00e9 \u65e5\u672c \U0001f680!"
    decoder = IncrementalDecoder(lambda ids: tok.decode(list(ids)), byte_ids("Say:"))
    deltas = [decoder.add(i) for i in byte_ids(text)]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) + decoder.flush() == text


def test_text_stream_flushes_an_unfinished_character_at_the_end() -> None:
    tok = byte_tokenizer()
    stream = TextStream(lambda ids: tok.decode(list(ids)), [])
    assert stream.push(0xE6) == "" and stream.push(0x97) == ""  # two of the three bytes of a CJK character
    assert stream.finish() == "\ufffd"


def test_token_picker_greedy_and_seeded_sampling() -> None:
    logits = np.array([0.1, 3.0, 2.9, -1.0, 3.0], np.float32)
    assert TokenPicker(Sampling()).pick(logits) == 1  # the first of equal maxima
    draws = [TokenPicker(Sampling(temperature=1.0, seed=4)).pick(logits) for _ in range(3)]
    assert len(set(draws)) == 1
    picker = TokenPicker(Sampling(temperature=1.0, top_k=2, seed=0))
    assert {picker.pick(logits) for _ in range(200)} == {1, 4}
    picker = TokenPicker(Sampling(temperature=1.0, top_p=0.01, seed=0))
    assert {picker.pick(logits) for _ in range(50)} == {1}
    hot = TokenPicker(Sampling(temperature=100.0, seed=0))
    assert {hot.pick(logits) for _ in range(500)} == {0, 1, 2, 3, 4}


def test_token_picker_penalties_follow_vllm_and_transformers() -> None:
    """Repetition over the prompt and the picked tokens (divide positive logits, multiply
    negative ones), then presence (once per picked token) and frequency (per time picked)."""
    logits = np.array([2.0, 1.9, -1.0, 1.0, 0.5], np.float32)
    repeat = TokenPicker(Sampling(repetition_penalty=2.0), prompt_ids=[0, 2])
    assert repeat.pick(logits) == 1  # token 0 (in the prompt) drops to 1.0, below 1.9
    np.testing.assert_allclose(repeat._penalize(logits), [1.0, 0.95, -2.0, 1.0, 0.5])
    presence = TokenPicker(Sampling(presence_penalty=0.5))
    assert [presence.pick(logits) for _ in range(3)] == [0, 1, 0]  # 2.0 -> 1.5 < 1.9; then 1.9 -> 1.4 < 1.5
    frequency = TokenPicker(Sampling(frequency_penalty=0.3))
    assert [frequency.pick(logits) for _ in range(4)] == [0, 1, 0, 1]  # 2.0, 1.9, 1.7, 1.6 ...
    np.testing.assert_allclose(frequency._penalize(logits), [1.4, 1.3, -1.0, 1.0, 0.5])
    assert TokenPicker(Sampling()).pick(logits) == 0 and not Sampling().penalized  # defaults: none
    # The picker's logits row is the engine's: penalties never write into it.
    assert logits[0] == 2.0


@pytest.mark.parametrize("scale", [2.0, 1.0])  # the best 1024 tokens hold the mass / they do not
def test_nucleus_over_a_large_vocabulary_matches_the_full_sort(scale: float) -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(50_000) * scale).astype(np.float32)
    fast = TokenPicker(Sampling(temperature=1.0, top_p=0.3, seed=9))
    picks = [fast.pick(logits) for _ in range(50)]
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    nucleus = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.3)) + 1].tolist())
    assert set(picks) <= nucleus and len(set(picks)) > 10


async def test_concurrent_generations_beyond_the_limit_are_refused_at_once(
    tmp_path: Path, context: TaskContext
) -> None:
    task = TextGenerator.load(decoder_model(tmp_path, byte_ids("abc"), max_concurrent_generations=1), context)
    first = task.generate("Hi", [], GenerateParams(max_new_tokens=3), CallOptions())
    assert (await first.__anext__()).text == "a"  # running, holding its slot
    with pytest.raises(Overloaded, match="max_concurrent_generations"):
        await run(task)
    assert [c.text async for c in first] == ["b", "c"]
    assert task.active == 0
    again = await run(task, max_new_tokens=2)  # the slot is free again
    assert again[-1].usage is not None and again[-1].usage.generated_tokens == 2
