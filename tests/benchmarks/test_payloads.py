"""Benchmark payloads: tokenized sentences, images, random tensors and .npz files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from taskserve.benchmarks.payloads import build_payload, detect_kind, find_tokenizer
from taskserve.clients.metadata import TensorMetadata as T

TEXT_SPECS = [
    T("input_ids", "INT64", (-1, -1)),
    T("attention_mask", "INT64", (-1, -1)),
    T("token_type_ids", "INT64", (-1, -1)),
]


def test_sentences_span_the_token_range() -> None:
    payload = build_payload("auto", TEXT_SPECS, count=40, min_tokens=8, max_tokens=32, seed=3)
    assert payload.kind == "text" and len(payload.requests) == 40 and len(payload.texts) == 40
    lengths = [int(r["attention_mask"].sum()) for r in payload.requests]
    assert all(8 <= n <= 32 for n in lengths)
    assert max(lengths) - min(lengths) >= 10  # lengths vary
    for r in payload.requests:
        assert r["input_ids"].dtype == np.int64 and r["input_ids"].shape == r["attention_mask"].shape
        assert r["input_ids"][0, 0] == 101  # [CLS] of the MiniLM vocabulary


def test_text_batches_pad_to_the_longest_or_to_a_fixed_length() -> None:
    payload = build_payload("text", TEXT_SPECS[:2], count=5, batch_size=4, seed=1)
    r = payload.requests[0]
    assert set(r) == {"input_ids", "attention_mask"}
    assert r["input_ids"].shape[0] == 4
    assert r["attention_mask"].sum(axis=1).max() == r["input_ids"].shape[1]
    fixed = build_payload("text", TEXT_SPECS, count=5, max_tokens=30, fixed_length=True)
    assert {r["input_ids"].shape for r in fixed.requests} == {(1, 30)}
    assert "padded to 30" in fixed.description


def test_text_payload_refuses_non_text_models() -> None:
    with pytest.raises(ValueError, match="text payloads need"):
        build_payload("text", [T("pixel_values", "FP32", (-1, 3, 8, 8))], count=1)


def test_image_payload_layouts_and_scaling() -> None:
    nchw = build_payload("auto", [T("pixel_values", "FP32", (-1, 3, 64, 64))], count=3, batch_size=2)
    assert nchw.kind == "image"
    x = nchw.requests[0]["pixel_values"]
    assert x.shape == (2, 3, 64, 64) and x.dtype == np.float32
    assert -1.0 <= x.min() and x.max() <= 1.0
    assert len(nchw.images) == 6 and nchw.images[0].shape == (64, 64, 3)
    nhwc = build_payload("image", [T("image", "UINT8", (-1, 32, 32, 3))], count=2)
    assert nhwc.requests[0]["image"].shape == (1, 32, 32, 3) and nhwc.requests[0]["image"].dtype == np.uint8


def test_random_payload_matches_types_and_fills_variable_dims() -> None:
    specs = [
        T("a", "FP16", (-1, -1)),
        T("b", "BOOL", (-1, 2)),
        T("c", "BYTES", (-1, 1)),
        T("d", "INT32", (-1, 3)),
    ]
    payload = build_payload("auto", specs, count=2, batch_size=3, variable_dim=5)
    assert payload.kind == "random"
    r = payload.requests[1]
    assert r["a"].shape == (3, 5) and r["a"].dtype == np.float16
    assert r["b"].dtype == np.bool_ and r["d"].shape == (3, 3)
    assert isinstance(r["c"][0, 0], bytes)


def test_npz_payload_splits_rows(tmp_path: Path) -> None:
    path = tmp_path / "inputs.npz"
    np.savez(path, x=np.arange(10, dtype=np.float32).reshape(5, 2), words=np.array(["a", "b", "c", "d", "e"]))
    payload = build_payload(str(path), [], batch_size=2)
    assert len(payload.requests) == 2
    np.testing.assert_array_equal(payload.requests[1]["x"], [[4, 5], [6, 7]])
    assert payload.requests[0]["words"].dtype == np.object_
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((3, 1)), y=np.zeros((4, 1)))
    with pytest.raises(ValueError, match="same number of rows"):
        build_payload(str(bad), [])


def test_detect_kind_and_tokenizer_lookup(tmp_path: Path) -> None:
    assert detect_kind(TEXT_SPECS) == "text"
    assert detect_kind([T("x", "FP32", (-1, 3, 224, 224))]) == "image"
    assert detect_kind([T("x", "FP32", (-1, 4))]) == "random"
    own = tmp_path / "tokenizer.json"
    own.write_text("{}")
    assert find_tokenizer(None, tmp_path) == own
    assert find_tokenizer(None, tmp_path / "elsewhere").name == "tokenizer.json"  # the packaged one
    with pytest.raises(ValueError, match="unknown payload"):
        build_payload("video", TEXT_SPECS)
