"""TextGeneration end to end: tiny random-weight decoders (Llama with grouped-query
attention, GPT-2) exported for the generation engine -> server -> stubs and the typed client,
checked against transformers' own ``generate`` on the PyTorch models."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from taskserve.clients import (
    AsyncTaskServeClient,
    ClientOptions,
    DeadlineExceeded,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    TaskServeClient,
)
from taskserve.protocol.generated.taskserve.v1 import common_pb2 as common
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2 as tg
from taskserve.protocol.generated.taskserve.v1 import text_generation_pb2_grpc as tg_grpc
from tests.support.server import ServerThread

DECODERS = ["tiny-llama", "tiny-gpt2"]
PROMPTS = [
    "The cat",
    "Paris is the capital and most populous city of",
    "Stock markets fell sharply on Monday after",
    "A man is playing a guitar on a small stage in the park while the",
    "What is",
    "The quick brown fox jumps over the lazy dog and then",
]


def _stream(channel: grpc.Channel, model: str, timeout: float = 30, **fields: Any) -> list[tg.GenerateResponse]:
    stub = tg_grpc.TextGenerationStub(channel)
    return list(stub.Generate(tg.GenerateRequest(model=common.ModelRef(name=model), **fields), timeout=timeout))


def _ids(messages: list[tg.GenerateResponse]) -> list[int]:
    return [i for m in messages for i in m.token_ids]


def _text(messages: list[tg.GenerateResponse]) -> str:
    return "".join(m.text for m in messages)


def _reference(source: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' greedy generate on the PyTorch model, cut after an end-of-sequence token."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
        )
    generated: list[int] = out[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    return generated[: generated.index(eos) + 1] if eos in generated else generated


def _tokenizer(source: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source)


def _code(err: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return err.value.code()  # type: ignore[no-any-return]


@pytest.mark.parametrize("model", DECODERS)
def test_greedy_tokens_equal_transformers_generate(
    channel: grpc.Channel, tiny_sources: dict[str, Path], model: str
) -> None:
    tokenizer = _tokenizer(tiny_sources[model])
    for prompt in PROMPTS[:3]:
        messages = _stream(channel, model, prompt=prompt, max_new_tokens=24)
        prompt_ids = tokenizer(prompt)["input_ids"]
        expected = _reference(tiny_sources[model], prompt_ids, 24)
        assert _ids(messages) == expected
        # The streamed text is the decoded tokens, delivered in pieces that never split a character.
        assert _text(messages) == tokenizer.decode(expected, skip_special_tokens=True)
        assert len(messages) > 1 and all(m.model.name == model and m.model.version == "1" for m in messages)
        *body, last = messages
        assert all(m.finish_reason == tg.FINISH_REASON_UNSPECIFIED and not m.HasField("usage") for m in body)
        assert last.usage.prompt_tokens == len(prompt_ids)
        assert last.usage.generated_tokens == len(expected)
        assert last.finish_reason == (
            tg.FINISH_REASON_EOS if expected[-1] == tokenizer.eos_token_id else tg.FINISH_REASON_LENGTH
        )


def test_repetition_penalty_equals_transformers_generate(
    task_server: ServerThread, channel: grpc.Channel, tiny_sources: dict[str, Path]
) -> None:
    """Greedy with repetition_penalty gives transformers' tokens with the same penalty,
    through the sync and the async client alike; out-of-range penalties are refused."""
    import torch
    from transformers import AutoModelForCausalLM

    source = tiny_sources["tiny-llama"]
    prompt = PROMPTS[1]
    prompt_ids = _tokenizer(source)(prompt)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(source).eval()
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=24, do_sample=False, repetition_penalty=1.8,
        )  # fmt: skip
    expected: list[int] = out[0, len(prompt_ids) :].tolist()
    eos = model.generation_config.eos_token_id
    expected = expected[: expected.index(eos) + 1] if eos in expected else expected
    assert expected != _reference(source, prompt_ids, 24)  # the penalty changes this generation
    with TaskServeClient(task_server.address) as client:
        got = client.text.generate_text(prompt, model="tiny-llama", max_new_tokens=24, repetition_penalty=1.8)
        with pytest.raises(ValueError, match="frequency_penalty"):
            client.text.generate_text(prompt, model="tiny-llama", frequency_penalty=-5)
    assert list(got.token_ids) == expected

    async def in_async() -> list[int]:
        async with AsyncTaskServeClient(task_server.address) as aclient:
            generation = await aclient.text.generate_text(
                prompt, model="tiny-llama", max_new_tokens=24, repetition_penalty=1.8
            )
            return list(generation.token_ids)

    assert asyncio.run(in_async()) == expected
    for field, value in (("presence_penalty", 3.0), ("repetition_penalty", 11.0), ("frequency_penalty", -2.5)):
        with pytest.raises(grpc.RpcError) as err:
            _stream(channel, "tiny-llama", prompt=prompt, max_new_tokens=4, **{field: value})
        assert _code(err) == grpc.StatusCode.INVALID_ARGUMENT and field in str(err.value.details())


def test_chat_messages_use_the_chat_template(channel: grpc.Channel, tiny_sources: dict[str, Path]) -> None:
    tokenizer = _tokenizer(tiny_sources["tiny-llama"])
    conversation = [
        {"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    prompt_ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True)
    messages = _stream(
        channel, "tiny-llama", messages=[tg.ChatMessage(**m) for m in conversation], max_new_tokens=12
    )
    assert messages[-1].usage.prompt_tokens == len(prompt_ids)
    assert _ids(messages) == _reference(tiny_sources["tiny-llama"], prompt_ids, 12)


def test_concurrent_generations_equal_one_by_one(task_server: ServerThread, channel: grpc.Channel) -> None:
    """Prompts of six different lengths at once: their decode steps share batches (tiny-llama
    runs on the generation engine: every running sequence's token in one step over the resident
    cache) and give exactly the tokens they give alone."""
    assert task_server.app is not None
    registry = task_server.app.metrics.registry

    def batches() -> tuple[float, float]:
        labels = {"model": "tiny-llama", "version": "1"}
        count = registry.get_sample_value("taskserve_batch_size_count", labels) or 0.0
        rows = registry.get_sample_value("taskserve_batch_size_sum", labels) or 0.0
        return count, rows

    alone = [_ids(_stream(channel, "tiny-llama", prompt=p, max_new_tokens=40)) for p in PROMPTS]
    before = batches()
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        together = list(pool.map(lambda p: _ids(_stream(channel, "tiny-llama", prompt=p, max_new_tokens=40)), PROMPTS))
    after = batches()
    assert together == alone
    assert len({tuple(ids) for ids in alone}) == len(PROMPTS)  # the prompts really lead different ways
    executed, rows = after[0] - before[0], after[1] - before[1]
    # One step per token and prompt alone would be 6 x 40 batches of one row; sharing makes fewer, fuller ones.
    assert rows == sum(len(ids) for ids in together)
    assert executed < rows * 0.6, f"{executed} batches for {rows} rows: the steps did not share batches"


def test_stop_strings_end_the_text_before_them(channel: grpc.Channel) -> None:
    full = _stream(channel, "tiny-gpt2", prompt=PROMPTS[1], max_new_tokens=30)
    text = _text(full)
    stop = text[8:11]
    assert len(stop.strip()) == 3
    cut = text.index(stop)
    stopped = _stream(channel, "tiny-gpt2", prompt=PROMPTS[1], max_new_tokens=30, stop=["never appears", stop])
    assert _text(stopped) == text[:cut]
    assert stopped[-1].finish_reason == tg.FINISH_REASON_STOP
    # The stop string's tokens were generated (and counted); their text was not sent.
    ids = _ids(stopped)
    assert ids == _ids(full)[: len(ids)]
    assert stopped[-1].usage.generated_tokens == len(ids) < 30


def test_max_new_tokens_and_the_default(channel: grpc.Channel) -> None:
    three = _stream(channel, "tiny-llama", prompt="The cat", max_new_tokens=3)
    assert len(_ids(three)) == 3 and three[-1].finish_reason == tg.FINISH_REASON_LENGTH
    # Unset: the default (256) lowered to the 128 positions the model has.
    default = _stream(channel, "tiny-llama", prompt="The cat")
    assert default[-1].usage.prompt_tokens + default[-1].usage.generated_tokens <= 128


def test_sampling_is_reproducible_with_a_seed(channel: grpc.Channel) -> None:
    def sample(seed: int, **fields: Any) -> list[int]:
        return _ids(
            _stream(channel, "tiny-gpt2", prompt="The cat", max_new_tokens=20, temperature=1.5, seed=seed, **fields)
        )

    first, again, other = sample(1), sample(1), sample(2)
    assert first == again
    assert first != other
    greedy = _ids(_stream(channel, "tiny-gpt2", prompt="The cat", max_new_tokens=20))
    assert first != greedy
    assert sample(5, top_k=1) == greedy  # one candidate left: sampling is greedy
    nucleus = sample(3, top_p=0.5)
    assert nucleus == sample(3, top_p=0.5) and len(nucleus) == 20


def test_sampled_bytes_never_break_characters(channel: grpc.Channel, tiny_sources: dict[str, Path]) -> None:
    """Hot sampling from the byte-level model emits lone bytes of multi-byte characters;
    every chunk still decodes cleanly and the chunks join to the decoded tokens."""
    tokenizer = _tokenizer(tiny_sources["tiny-gpt2"])
    messages = _stream(
        channel, "tiny-gpt2", prompt="Caf\u00e9 \u65e5\u672c\u8a9e \U0001f600", max_new_tokens=60,
        temperature=3.0, seed=7,
    )  # fmt: skip
    ids = _ids(messages)
    assert _text(messages) == tokenizer.decode(ids, skip_special_tokens=True)
    assert any(len(m.token_ids) > 1 for m in messages)  # some tokens were held until their character completed


def test_errors_map_to_statuses(channel: grpc.Channel) -> None:
    cases: list[tuple[str, dict[str, Any], grpc.StatusCode, str]] = [
        ("nope", {"prompt": "hi"}, grpc.StatusCode.NOT_FOUND, "nope"),
        ("tiny-textcls", {"prompt": "hi"}, grpc.StatusCode.FAILED_PRECONDITION, "text-generation"),
        ("tiny-llama", {"prompt": "  "}, grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty"),
        ("tiny-llama", {"prompt": "word " * 200}, grpc.StatusCode.INVALID_ARGUMENT, "128 positions"),
        ("tiny-llama", {"prompt": "The cat", "max_new_tokens": 127}, grpc.StatusCode.INVALID_ARGUMENT,
         "ask for at most"),
        ("tiny-llama", {"prompt": "The cat", "max_new_tokens": 5000}, grpc.StatusCode.INVALID_ARGUMENT,
         "over the limit of 4096"),
        ("tiny-llama", {"prompt": "x", "messages": [tg.ChatMessage(role="user", content="y")]},
         grpc.StatusCode.INVALID_ARGUMENT, "either prompt or messages"),
        ("tiny-llama", {"prompt": "x", "temperature": -1}, grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        ("tiny-llama", {"prompt": "x", "stop": [""]}, grpc.StatusCode.INVALID_ARGUMENT, "stop[0] is empty"),
    ]  # fmt: skip
    for model, fields, code, message in cases:
        with pytest.raises(grpc.RpcError) as err:
            _stream(channel, model, **fields)
        assert _code(err) == code, (model, fields)
        assert message in err.value.details(), err.value.details()


def test_deadline_ends_the_generation(channel: grpc.Channel) -> None:
    with pytest.raises(grpc.RpcError) as err:
        _stream(channel, "tiny-llama", timeout=0.002, prompt="The cat", max_new_tokens=120)
    assert _code(err) == grpc.StatusCode.DEADLINE_EXCEEDED


# -- the typed client ---------------------------------------------------------------------


def test_sync_client_streams_and_collects(task_server: ServerThread) -> None:
    with TaskServeClient(task_server.address, ClientOptions(timeout_s=30)) as client:
        chunks = list(client.text.generate("The cat", model="tiny-llama", max_new_tokens=16))
        whole = client.text.generate_text("The cat", model="tiny-llama", max_new_tokens=16)
        assert whole.text == "".join(c.text for c in chunks)
        assert whole.token_ids == tuple(i for c in chunks for i in c.token_ids)
        assert whole.finish_reason == chunks[-1].finish_reason == "length"
        assert whole.usage.generated_tokens == 16 and whole.served_by.name == "tiny-llama"
        assert all(c.finish_reason is None and c.usage is None for c in chunks[:-1])
        chat = client.text.generate_text(
            model="tiny-llama", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_new_tokens=4,
        )  # fmt: skip
        assert chat.usage.prompt_tokens > 10
        # Stopping early cancels the call (no error, no further chunks).
        stream = client.text.generate("The cat", model="tiny-llama", max_new_tokens=100)
        first = next(iter(stream))
        assert first.token_ids
        stream.close()  # type: ignore[attr-defined]
        with pytest.raises(NotFound):
            client.text.generate_text("hi", model="nope")
        with pytest.raises(FailedPrecondition):
            client.text.generate_text("hi", model="tiny-textcls")
        with pytest.raises(InvalidArgument, match="prompt is empty"):
            client.text.generate_text(" ", model="tiny-llama")
        with pytest.raises(DeadlineExceeded):
            client.text.generate_text("The cat", model="tiny-llama", max_new_tokens=120, timeout=0.002)
        with pytest.raises(ValueError, match="either prompt or messages"):
            client.text.generate(model="tiny-llama")
        with pytest.raises(TypeError, match="list of strings"):
            client.text.generate("x", model="tiny-llama", stop="x")


def test_async_client_streams(task_server: ServerThread) -> None:
    async def main() -> tuple[list[str], list[tuple[int, ...]], str]:
        async with AsyncTaskServeClient(task_server.address, ClientOptions(timeout_s=30)) as client:
            texts: list[str] = []
            async for chunk in client.text.generate("The cat", model="tiny-llama", max_new_tokens=16):
                texts.append(chunk.text)
            together = await asyncio.gather(
                *(client.text.generate_text(p, model="tiny-llama", max_new_tokens=8) for p in PROMPTS)
            )
            with pytest.raises(InvalidArgument):
                await client.text.generate_text("  ", model="tiny-llama")
            return texts, [g.token_ids for g in together], together[0].finish_reason

    texts, together, finish = asyncio.run(main())
    with TaskServeClient(task_server.address) as client:
        assert "".join(texts) == client.text.generate_text("The cat", model="tiny-llama", max_new_tokens=16).text
        alone = [client.text.generate_text(p, model="tiny-llama", max_new_tokens=8).token_ids for p in PROMPTS]
    assert together == alone and finish == "length"
