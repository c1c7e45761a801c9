"""The text-generation task and its per-token parts without a model: a scripted
scheduler plays the decoder, so end-of-sequence, cancellation, held text and
limits are checked exactly."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from taskserve.server.errors import InvalidInput, Overloaded
from taskserve.server.repository.config import ModelConfig
from taskserve.server.scheduling.base import InferRequest, InferResult
from taskserve.server.tasks.base import CallOptions, TaskConfigError, TaskContext
from taskserve.server.tasks.chat_template import ChatMessage
from taskserve.server.tasks.decoding import IncrementalDecoder, Sampling, TextStream, TokenPicker
from taskserve.server.tasks.text_generation import FinishReason, GenerateParams, GenerationChunk, TextGenerator
from tests.support.waiting import other_tasks_done
from tests.tasks.fakes import FakeModel, FakeScheduler

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


class ScriptedDecoder:
    """Outputs of a decoder that 'generates' a fixed token script, checking its inputs
    the way an exported graph would (cache length, mask, positions)."""

    def __init__(self, script: Sequence[int], heads: int = 2, size: int = 4) -> None:
        self.script = list(script)
        self.heads, self.size = heads, size
        self.steps = 0

    def __call__(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, past = inputs["input_ids"], inputs["past_key_values.0.key"]
        start, new = past.shape[2], ids.shape[1]
        assert inputs["attention_mask"].shape == (1, start + new)
        np.testing.assert_array_equal(inputs["position_ids"], [np.arange(start, start + new)])
        token = self.script[min(self.steps, len(self.script) - 1)]
        self.steps += 1
        logits = np.zeros((1, new, VOCAB), np.float32)
        logits[0, -1, token] = 10.0
        present = np.zeros((1, self.heads, start + new, self.size), np.float32)
        return {"logits": logits, "present.0.key": present, "present.0.value": present}


def decoder_model(tmp_path: Path, script: Sequence[int], max_length: int = 64, **options: Any) -> FakeModel:
    model_dir = tmp_path / "decoder"
    model_dir.mkdir(parents=True, exist_ok=True)
    byte_tokenizer().save(str(model_dir / "tokenizer.json"))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": EOS}))
    config = ModelConfig.model_validate(
        {
            "name": "decoder",
            "task": "text-generation",
            "max_batch_size": 8,
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "dims": [-1], "padding": "none"},
                {"name": "attention_mask", "datatype": "INT64", "dims": [-1], "padding": "left"},
                {"name": "position_ids", "datatype": "INT64", "dims": [-1], "padding": "none"},
                {"name": "past_key_values.0.key", "datatype": "FP32", "dims": [2, -1, 4], "padding": "left"},
                {"name": "past_key_values.0.value", "datatype": "FP32", "dims": [2, -1, 4], "padding": "left"},
            ],
            "outputs": [
                {"name": "logits", "datatype": "FP32", "dims": [-1, VOCAB]},
                {"name": "present.0.key", "datatype": "FP32", "dims": [2, -1, 4]},
                {"name": "present.0.value", "datatype": "FP32", "dims": [2, -1, 4]},
            ],
            "task_options": {"max_length": max_length, **options},
        }
    )
    return FakeModel("decoder", config, model_dir, FakeScheduler(ScriptedDecoder(script)))


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
    assert model.scheduler.fn.steps == 4  # type: ignore[attr-defined]  # no step after the EOS token


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
    release, hanging = asyncio.Event(), asyncio.Event()
    ended: list[str] = []  # how the hanging step's call ended
    inner = model.scheduler.submit

    async def gated(request: InferRequest) -> InferResult:
        if len(model.scheduler.requests) >= 3:
            hanging.set()
            try:
                await release.wait()  # the fourth step hangs until the consumer goes away
            except asyncio.CancelledError:
                ended.append("cancelled")
                raise
            ended.append("released")
        return await inner(request)

    model.scheduler.submit = gated  # type: ignore[method-assign]
    task = TextGenerator.load(model, context)

    async def consume() -> None:
        async for _ in task.generate("Hi", [], GenerateParams(max_new_tokens=50), CallOptions()):
            pass

    consumer = asyncio.ensure_future(consume())
    await asyncio.wait_for(hanging.wait(), 30)  # three steps ran, the fourth awaits its answer
    assert len(model.scheduler.requests) == 3
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    # The step the consumer was awaiting was cancelled with it, not left running...
    assert ended == ["cancelled"]
    # ...and once everything the generation started has finished, no step ran after it.
    release.set()
    await other_tasks_done("the cancelled generation's tasks to end")
    assert ended == ["cancelled"] and len(model.scheduler.requests) == 3


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
    assert model.scheduler.requests == []
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
    [request] = model.scheduler.requests
    sent = bytes(int(i) for i in request.inputs["input_ids"][0] if i < 256).decode()
    assert sent == "[user]hi[assistant]"
    assert int(request.inputs["input_ids"][0, -1]) == EOS  # special tokens in the template are tokens
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == len(sent) + 1


def test_a_decoder_without_cache_inputs_is_refused(tmp_path: Path, context: TaskContext) -> None:
    model = decoder_model(tmp_path, [EOS])
    model.config = model.config.model_copy(update={"inputs": model.config.inputs[:3]})  # type: ignore[index]
    with pytest.raises(TaskConfigError, match="no past_key_values inputs"):
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
