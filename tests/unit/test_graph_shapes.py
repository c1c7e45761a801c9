"""Bucket shapes for CUDA graphs: padding up, and cutting outputs back."""

from __future__ import annotations

import numpy as np

from taskserve.server.repository.config import ModelConfig
from taskserve.server.runtimes.graph_shapes import bucket, graph_batch_sizes


def _config(padding: str = "right", buckets: list[int] | None = None) -> ModelConfig:
    return ModelConfig.model_validate(
        {
            "name": "m",
            "max_batch_size": 12,
            "inputs": [
                {"name": "ids", "datatype": "INT64", "dims": [-1], "pad_value": 7, "padding": padding},
                {"name": "scale", "datatype": "FP32", "dims": [2]},
            ],
            "dynamic_batching": {"length_buckets": buckets if buckets is not None else [4, 16]},
        }
    )


def test_graph_batch_sizes() -> None:
    assert graph_batch_sizes(12) == (1, 2, 4, 8, 12)
    assert graph_batch_sizes(8, (6,)) == (1, 2, 4, 6, 8)
    assert graph_batch_sizes(1) == (1,)


def test_bucket_pads_rows_and_lengths_and_cut_undoes_it() -> None:
    ids = np.arange(15, dtype=np.int64).reshape(3, 5)
    scale = np.ones((3, 2), dtype=np.float32)
    got = bucket({"ids": ids, "scale": scale}, _config(), graph_batch_sizes(12))
    assert got is not None
    assert got.feed["ids"].shape == (4, 16) and got.feed["scale"].shape == (4, 2)
    np.testing.assert_array_equal(got.feed["ids"][:3, :5], ids)
    assert (got.feed["ids"][3] == 7).all() and (got.feed["ids"][:, 5:] == 7).all()
    assert got.rows == 3 and got.lengths == {16: 5}
    outputs = {"states": np.zeros((4, 16, 8)), "pooled": np.zeros((4, 8))}
    cut = got.cut(outputs)
    assert cut["states"].shape == (3, 5, 8) and cut["pooled"].shape == (3, 8)
    # Same bucket, other lengths: same key (one graph serves both).
    other = bucket({"ids": ids[:, :3], "scale": scale}, _config(), graph_batch_sizes(12))
    assert other is not None and other.feed["ids"].shape == (4, 4)
    again = bucket({"ids": ids[:, :4], "scale": scale}, _config(), graph_batch_sizes(12))
    assert again is not None and again.key == other.key and again.lengths == {}


def test_unbucketable_batches() -> None:
    ids = np.zeros((2, 5), dtype=np.int64)
    scale = np.ones((2, 2), dtype=np.float32)
    sizes = graph_batch_sizes(12)
    assert bucket({"ids": ids, "scale": scale}, _config(padding="left"), sizes) is None
    assert bucket({"ids": ids, "scale": scale}, _config(buckets=[]), sizes) is None
    assert bucket({"ids": np.zeros((2, 17), np.int64), "scale": scale}, _config(), sizes) is None
    assert bucket({"ids": np.zeros((13, 3), np.int64), "scale": np.ones((13, 2), np.float32)}, _config(), sizes) is None
    assert bucket({"unknown": ids}, _config(), sizes) is None
