"""Request checks, batching keys, padding and unpadding: pure functions, no event loop."""

from __future__ import annotations

import numpy as np
import pytest

from taskserve.server.errors import InvalidInput, RuntimeFailure
from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.base import TensorInfo
from taskserve.server.scheduling.collate import collate, split
from taskserve.server.scheduling.layout import TensorLayout

from .harness import token_config


def layout(**overrides: object) -> TensorLayout:
    return TensorLayout.from_config(token_config(**overrides))


def ids_mask(*rows: list[int]) -> dict[str, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.array([r + [0] * (width - len(r)) for r in rows], np.int64)
    mask = np.array([[1] * len(r) + [0] * (width - len(r)) for r in rows], np.int64)
    return {"ids": ids, "mask": mask}


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({}, "has no inputs"),
        ({"ids": [[1, 2]], "mask": np.ones((1, 2), np.int64)}, "not numpy arrays"),
        ({"ids": np.zeros((1, 2), np.int64)}, r"lacks required input\(s\) \['mask'\]"),
        ({**ids_mask([1, 2]), "extra": np.zeros((1, 2))}, r"no input\(s\) \['extra'\]"),
        (
            {"ids": np.zeros((1, 2), np.int64), "mask": np.zeros((2, 2), np.int64)},
            "disagree on the batch size",
        ),
        ({"ids": np.zeros((1, 2, 3), np.int64), "mask": np.zeros((1, 2), np.int64)}, r"expected \[-1, -1\]"),
        ({"ids": np.array(3, np.int64), "mask": np.zeros((1, 2), np.int64)}, "scalars"),
        ({"ids": np.zeros((0, 2), np.int64), "mask": np.zeros((0, 2), np.int64)}, "has 0 rows"),
        ({"ids": np.zeros((9, 2), np.int64), "mask": np.zeros((9, 2), np.int64)}, "max_batch_size is 8"),
    ],
)
def test_describe_refuses_requests_it_cannot_batch(inputs: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        layout().describe(inputs, None, 8)


def test_seen_shapes_are_answered_from_memory_and_still_checked_per_outputs_and_rows() -> None:
    tokens = layout()
    first = tokens.describe(ids_mask([1, 2, 3]), None, 8)
    assert tokens.describe(ids_mask([4, 5, 6]), None, 8) is first  # same shapes: remembered
    with pytest.raises(InvalidInput, match=r"no output\(s\) \['nope'\]"):
        tokens.describe(ids_mask([4, 5, 6]), ("nope",), 8)
    with pytest.raises(InvalidInput, match="max_batch_size is 1"):
        tokens.describe(ids_mask([1, 2, 3], [4, 5, 6]), None, 1)
    floats = {"ids": np.zeros((1, 3), np.float32), "mask": np.ones((1, 3), np.int64)}
    assert tokens.describe(floats, None, 8).key != first.key  # another dtype is another entry


def test_fixed_dims_must_match_the_config() -> None:
    config = token_config(inputs=[{"name": "pixels", "datatype": "FP32", "dims": [3, -1]}], outputs=None)
    spec = TensorLayout.from_config(config)
    spec.describe({"pixels": np.zeros((2, 3, 5), np.float32)}, None, 8)
    with pytest.raises(
        InvalidInput, match=r"input 'pixels' .* has shape \[2, 4, 5\], expected \[-1, 3, -1\]"
    ):
        spec.describe({"pixels": np.zeros((2, 4, 5), np.float32)}, None, 8)


def test_keys_ignore_variable_lengths_but_not_dtypes() -> None:
    spec = layout()
    short = spec.describe(ids_mask([1, 2]), None, 8)
    long = spec.describe(ids_mask([1, 2, 3, 4, 5], [1]), None, 8)
    narrow = spec.describe({k: v.astype(np.int32) for k, v in ids_mask([1, 2]).items()}, None, 8)
    assert short.key == long.key
    assert short.key != narrow.key
    assert (short.rows, long.rows, long.length) == (1, 2, 5)


def test_length_buckets_split_keys_at_the_edges() -> None:
    spec = layout(dynamic_batching={"length_buckets": [4, 8]})
    keys = {n: spec.describe(ids_mask(list(range(n))), None, 8).key for n in (1, 4, 5, 8, 9, 30)}
    assert keys[1] == keys[4] != keys[5]
    assert keys[5] == keys[8] != keys[9]
    assert keys[9] == keys[30]


def test_undeclared_inputs_share_batches_only_with_identical_shapes() -> None:
    config = ModelConfig.model_validate({"name": "m", "max_batch_size": 4})
    spec = TensorLayout.from_config(config)  # no config tensors, no runtime declarations
    a = spec.describe({"x": np.zeros((1, 3), np.float32)}, None, 4)
    b = spec.describe({"x": np.zeros((2, 3), np.float32)}, None, 4)
    c = spec.describe({"x": np.zeros((1, 4), np.float32)}, None, 4)
    assert a.key == b.key != c.key


def test_runtime_declarations_are_used_when_the_config_has_none() -> None:
    config = ModelConfig.model_validate({"name": "m", "max_batch_size": 4})
    spec = TensorLayout.from_config(
        config, [TensorInfo("x", "FP32", (-1, 3, -1))], [TensorInfo("y", "FP32", (-1, 2))]
    )
    assert spec.inputs is not None and spec.inputs["x"].dims == (3, -1)
    with pytest.raises(InvalidInput, match="no output"):
        spec.describe({"x": np.zeros((1, 3, 2), np.float32)}, ("z",), 4)


def test_collate_pads_each_input_with_its_pad_value() -> None:
    spec = layout()
    batch = collate([ids_mask([1, 2]), ids_mask([3, 4, 5, 6], [7])], spec)
    np.testing.assert_array_equal(batch.inputs["ids"], [[1, 2, 7, 7], [3, 4, 5, 6], [7, 0, 0, 0]])
    np.testing.assert_array_equal(batch.inputs["mask"], [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert batch.rows == (1, 2)
    assert batch.padded == {"ids": (4,), "mask": (4,)}


def test_collate_passes_a_lone_request_through_without_copying() -> None:
    request = ids_mask([1, 2, 3])
    batch = collate([request], layout())
    assert batch.inputs["ids"] is request["ids"]


def test_split_slices_rows_and_unpads_following_outputs_only() -> None:
    spec = layout()
    batch = collate([ids_mask([1, 2]), ids_mask([3, 4, 5])], spec)
    hidden = np.arange(2 * 3 * 2, dtype=np.float32).reshape(2, 3, 2)
    # "pooled" has no unpad_like, so a length-3 axis there is left alone.
    pooled = np.arange(2 * 3, dtype=np.float32).reshape(2, 3)
    first, second = split({"hidden": hidden, "pooled": pooled}, batch, spec, [None, ("hidden",)])
    np.testing.assert_array_equal(first["hidden"], hidden[:1, :2])
    np.testing.assert_array_equal(first["pooled"], pooled[:1])
    np.testing.assert_array_equal(second["hidden"], hidden[1:])
    assert set(second) == {"hidden"}


def test_split_refuses_outputs_without_the_batch_rows() -> None:
    spec = layout()
    batch = collate([ids_mask([1]), ids_mask([2])], spec)
    with pytest.raises(RuntimeFailure, match="leading batch dimension"):
        split({"pooled": np.zeros((3,), np.float32)}, batch, spec, [None, None])


def test_bytes_inputs_pad_with_empty_bytes() -> None:
    config = token_config(inputs=[{"name": "text", "datatype": "BYTES", "dims": [-1]}], outputs=None)
    spec = TensorLayout.from_config(config)
    a = np.array([[b"a"]], dtype=object)
    b = np.array([[b"b", b"c"]], dtype=object)
    batch = collate([{"text": a}, {"text": b}], spec)
    assert batch.inputs["text"].tolist() == [[b"a", b""], [b"b", b"c"]]


def decoder_layout() -> TensorLayout:
    """A KV-cache decoder step: ids never padded, mask and past padded at the start."""
    config = ModelConfig.model_validate(
        {
            "name": "decoder",
            "max_batch_size": 8,
            "inputs": [
                {"name": "ids", "datatype": "INT64", "dims": [-1], "padding": "none"},
                {"name": "mask", "datatype": "INT64", "dims": [-1], "padding": "left"},
                {"name": "past", "datatype": "FP32", "dims": [2, -1, 3], "padding": "left"},
            ],
            "outputs": [
                {"name": "logits", "datatype": "FP32", "dims": [-1, 5]},
                {"name": "present", "datatype": "FP32", "dims": [2, -1, 3], "unpad_like": "past"},
            ],
        }
    )
    return TensorLayout.from_config(config)


def step(new: int, past: int, fill: float) -> dict[str, np.ndarray]:
    return {
        "ids": np.full((1, new), 9, np.int64),
        "mask": np.ones((1, past + new), np.int64),
        "past": np.full((1, 2, past, 3), fill, np.float32),
    }


def test_padding_none_puts_sizes_in_the_key_and_left_ignores_them() -> None:
    spec = decoder_layout()
    one_short, one_long, two = (spec.describe(step(n, p, 1.0), None, 8) for n, p in ((1, 3), (1, 7), (2, 3)))
    assert one_short.key == one_long.key  # different past lengths still share a batch
    assert one_short.key != two.key  # a different number of new positions never does


def test_left_padding_aligns_the_newest_positions_and_unpads_extended_outputs() -> None:
    spec = decoder_layout()
    batch = collate([step(1, 2, 1.0), step(1, 4, 2.0)], spec)
    np.testing.assert_array_equal(batch.inputs["mask"], [[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    past = batch.inputs["past"]
    assert past.shape == (2, 2, 4, 3)
    np.testing.assert_array_equal(past[0, :, :2], 0.0)  # the padding comes first
    np.testing.assert_array_equal(past[0, :, 2:], 1.0)
    np.testing.assert_array_equal(past[1], 2.0)
    # A decoder appends the new position: present is past (padded) + 1 long.
    present = np.concatenate([past, np.full((2, 2, 1, 3), 5.0, np.float32)], axis=2)
    logits = np.zeros((2, 1, 5), np.float32)
    first, second = split({"logits": logits, "present": present}, batch, spec, [None, None])
    assert first["present"].shape == (1, 2, 3, 3)
    np.testing.assert_array_equal(first["present"][0, :, :2], 1.0)
    np.testing.assert_array_equal(first["present"][0, :, 2], 5.0)
    assert second["present"].shape == (1, 2, 5, 3)
    assert first["logits"].shape == second["logits"].shape == (1, 1, 5)


def test_padding_must_be_a_known_side() -> None:
    with pytest.raises(ValueError, match="padding"):
        ModelConfig.model_validate(
            {"name": "m", "inputs": [{"name": "x", "datatype": "FP32", "dims": [-1], "padding": "middle"}]}
        )
