"""Fixed bucket shapes for CUDA graphs: a captured graph replays only the shapes it was
captured with, so a batch is padded up to the next graph batch size (rows) and the
next length bucket edge (right-padded variable dims), and the outputs are cut back.

Pure numpy, shared by the onnxruntime and the PyTorch runtimes and tested on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from taskserve.server.repository.config import ModelConfig

# Most distinct shapes captured per instance; further shapes run without a graph.
MAX_GRAPHS = 32


def graph_batch_sizes(max_batch_size: int, preferred: Sequence[int] = ()) -> tuple[int, ...]:
    """Powers of two up to max_batch_size, plus max_batch_size and the preferred sizes."""
    sizes = {max_batch_size, *preferred}
    size = 1
    while size < max_batch_size:
        sizes.add(size)
        size *= 2
    return tuple(sorted(s for s in sizes if 0 < s <= max_batch_size))


def _round_up(value: int, edges: Sequence[int]) -> int | None:
    return next((e for e in edges if e >= value), None)


@dataclass(frozen=True)
class Bucketed:
    """A batch padded to a graph shape, and how to cut its outputs back."""

    feed: dict[str, np.ndarray]
    key: tuple[tuple[str, tuple[int, ...], str], ...]
    rows: int
    # Padded length -> the batch's own length, for right-padded variable dims.
    lengths: dict[int, int]

    def cut(self, outputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        result = {}
        for name, array in outputs.items():
            index: list[slice] = [slice(0, self.rows)]
            for size in array.shape[1:]:
                own = self.lengths.get(size)
                index.append(slice(0, own) if own is not None else slice(None))
            result[name] = array[tuple(index)]
        return result


def bucket(feed: Mapping[str, np.ndarray], config: ModelConfig, batch_sizes: Sequence[int]) -> Bucketed | None:
    """``feed`` padded to a graph shape, or None when it cannot be (no batch dim, left
    padding, longer than the last bucket, or two lengths padded to the same edge)."""
    if config.max_batch_size <= 0 or not feed:
        return None
    specs = {t.name: t for t in config.inputs or ()}
    rows = int(next(iter(feed.values())).shape[0])
    padded_rows = _round_up(rows, batch_sizes)
    if padded_rows is None:
        return None
    edges = config.dynamic_batching.length_buckets
    lengths: dict[int, int] = {}
    out: dict[str, np.ndarray] = {}
    for name, array in feed.items():
        spec = specs.get(name)
        if spec is None or array.ndim != len(spec.dims) + 1 or array.dtype == np.object_:
            return None
        target = [padded_rows]
        for dim, size in zip(spec.dims, array.shape[1:], strict=True):
            if dim != -1:
                target.append(size)
                continue
            if spec.padding != "right" or not edges:
                return None
            edge = _round_up(size, edges)
            if edge is None or lengths.get(edge, size) != size:
                return None
            if edge != size:
                lengths[edge] = size
            target.append(edge)
        if tuple(target) == array.shape:
            out[name] = array
        else:
            grown = np.full(target, spec.pad_value, dtype=array.dtype)
            grown[tuple(slice(0, s) for s in array.shape)] = array
            out[name] = grown
    key = tuple((n, tuple(a.shape), a.dtype.str) for n, a in sorted(out.items()))
    return Bucketed(out, key, rows, lengths)
