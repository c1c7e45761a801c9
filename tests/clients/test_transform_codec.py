"""Client-side checks and decoding of the transform services' messages (no server)."""

from __future__ import annotations

import pytest

from taskserve.clients import transform_codec as tx
from taskserve.protocol.generated.taskserve.v1 import common_pb2, text_generation_pb2, text_transform_pb2


def test_decoding_options_are_checked_before_sending() -> None:
    options = tx.decoding(16, 0.7, 5, 0.9, 3, ["\n\n"])
    assert (options.max_new_tokens, options.top_k, options.seed, list(options.stop)) == (16, 5, 3, ["\n\n"])
    assert options.HasField("seed") and not tx.decoding(0, 0.0, 0, 1.0, None, ()).HasField("seed")
    with pytest.raises(TypeError, match="list of strings"):
        tx.decoding(0, 0.0, 0, 1.0, None, "stop")
    with pytest.raises(ValueError, match="top_p"):
        tx.decoding(0, 0.0, 0, 0.0, None, ())
    with pytest.raises(ValueError, match=">= 0"):
        tx.decoding(-1, 0.0, 0, 1.0, None, ())


def test_a_unary_response_becomes_a_generation() -> None:
    response = text_transform_pb2.TransformResponse(
        model=common_pb2.ServedBy(name="m", version="1"), text="Bonjour.", token_ids=[5, 6, 2],
        finish_reason=text_generation_pb2.FINISH_REASON_EOS,
        usage=text_generation_pb2.GenerationUsage(prompt_tokens=9, generated_tokens=3),
    )  # fmt: skip
    result = tx.transform_result(response)
    assert (result.text, result.token_ids, result.finish_reason) == ("Bonjour.", (5, 6, 2), "eos")
    assert (result.usage.prompt_tokens, result.usage.generated_tokens, result.served_by.name) == (9, 3, "m")
    with pytest.raises(RuntimeError, match="finish reason"):
        tx.transform_result(text_transform_pb2.TransformResponse(text="x"))
