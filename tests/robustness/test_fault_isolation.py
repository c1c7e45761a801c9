"""Issue 11, item 1: one bad v2 request batched with good ones fails alone.

7 good requests + 1 poisoned one at concurrency 8, 15 rounds, through v2 ModelInfer
on a BERT graph (the shape of all-MiniLM-L6-v2): before fault isolation most good
requests got INTERNAL with the poisoned one; now none fails, and the poisoned one
gets INVALID_ARGUMENT."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import numpy as np
import pytest
from tokenizers import Tokenizer

from taskserve.protocol.generated.inference import grpc_service_pb2_grpc as pb_grpc
from tests.support.server import ServerThread

from .conftest import TEXTCLS
from .v2 import infer_request, output_array

ROUNDS = 15
GOOD_PER_ROUND = 7


def _text_request(ids: np.ndarray, mask_len: int | None = None) -> object:
    mask = np.ones((1, mask_len if mask_len is not None else ids.shape[1]), np.int64)
    return infer_request(
        TEXTCLS, input_ids=ids, attention_mask=mask, token_type_ids=np.zeros_like(ids)
    )


def _poisons(vocab: int) -> list[tuple[str, object]]:
    return [
        ("token id 1e9", _text_request(np.array([[2, 7, 1_000_000_000, 3]], np.int64))),
        ("token id = vocabulary size", _text_request(np.array([[2, vocab, 3]], np.int64))),
        ("200 tokens, over the 64 positions", _text_request(np.full((1, 200), 7, np.int64))),
        ("attention_mask longer than input_ids", _text_request(np.array([[2, 7, 8, 3]], np.int64), mask_len=6)),
    ]


async def _rounds(address: str, vocab: int) -> tuple[list[grpc.StatusCode], dict[str, list[grpc.StatusCode]]]:
    rng = np.random.default_rng(0)
    good_codes: list[grpc.StatusCode] = []
    bad_codes: dict[str, list[grpc.StatusCode]] = {}
    poisons = _poisons(vocab)
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)

        async def call(request: object) -> grpc.StatusCode:
            try:
                response = await stub.ModelInfer(request, timeout=60)
            except grpc.aio.AioRpcError as err:
                return err.code()
            assert output_array(response, "logits").shape[0] == 1
            return grpc.StatusCode.OK

        for r in range(ROUNDS):
            what, poison = poisons[r % len(poisons)]
            good = [
                _text_request(rng.integers(5, vocab, size=(1, int(rng.integers(3, 12))), dtype=np.int64))
                for _ in range(GOOD_PER_ROUND)
            ]
            batch = [*good[:3], poison, *good[3:]]
            codes = await asyncio.gather(*(call(request) for request in batch))
            good_codes += [c for i, c in enumerate(codes) if i != 3]
            bad_codes.setdefault(what, []).append(codes[3])
    return good_codes, bad_codes


@pytest.mark.timeout(300)
def test_one_poisoned_request_fails_alone(robust_server: ServerThread, robust_repository: Path) -> None:
    vocab = Tokenizer.from_file(str(robust_repository / TEXTCLS / "tokenizer.json")).get_vocab_size()
    good, bad = asyncio.run(_rounds(robust_server.address, vocab))
    failed = [c for c in good if c != grpc.StatusCode.OK]
    assert len(good) == ROUNDS * GOOD_PER_ROUND
    assert failed == [], f"{len(failed)} of {len(good)} good requests failed: {failed[:5]}"
    for what, codes in bad.items():
        assert set(codes) == {grpc.StatusCode.INVALID_ARGUMENT}, (what, codes)
