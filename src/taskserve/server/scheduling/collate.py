"""Stack requests into one batch (padding variable axes) and split the batch's
outputs back per request (rows, then padded axes for ``unpad_like`` outputs).

Padding goes at the end of an axis, or at its start for inputs configured with
``padding: left`` (a decoder's attention mask and past key/values: the newest
positions then line up across rows, and the mask hides the padding).

Runs on an instance's executor thread: pure numpy, no asyncio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from taskserve.server.errors import RuntimeFailure
from taskserve.server.scheduling.layout import TensorLayout


@dataclass(frozen=True)
class Collated:
    """A stacked batch and what is needed to take it apart again."""

    inputs: dict[str, np.ndarray]
    # Rows each request contributed, in batch order.
    rows: tuple[int, ...]
    # Each request's own shape (without the batch dim) per input.
    shapes: tuple[dict[str, tuple[int, ...]], ...]
    # The batch's shape (without the batch dim) per input, after padding.
    padded: dict[str, tuple[int, ...]]

    @property
    def total_rows(self) -> int:
        return sum(self.rows)


def _pad_scalar(value: float, dtype: np.dtype) -> object:
    # BYTES tensors hold Python bytes objects; a numeric pad makes no sense there.
    return b"" if dtype == np.dtype(object) else value


def _stack(
    name: str, arrays: Sequence[np.ndarray], pad_value: float, left: bool = False
) -> tuple[np.ndarray, tuple[int, ...]]:
    target = tuple(max(a.shape[i] for a in arrays) for i in range(1, arrays[0].ndim))
    if all(a.shape[1:] == target for a in arrays):
        if len(arrays) == 1:
            return arrays[0], target  # a lone request passes through without a copy
        return np.concatenate(arrays, axis=0), target
    total = sum(a.shape[0] for a in arrays)
    dtype = arrays[0].dtype
    out = np.full((total, *target), _pad_scalar(pad_value, dtype), dtype=dtype)
    offset = 0
    for a in arrays:
        region = (
            slice(offset, offset + a.shape[0]),
            *(slice(t - n, t) if left else slice(0, n) for n, t in zip(a.shape[1:], target, strict=True)),
        )
        out[region] = a
        offset += a.shape[0]
    return out, target


def collate(requests: Sequence[Mapping[str, np.ndarray]], layout: TensorLayout) -> Collated:
    """Stack ``requests`` (already checked to share a batching key) into one batch."""
    if not layout.batched:
        if len(requests) != 1:
            raise ValueError("a model without a batch dimension runs one request at a time")
        only = dict(requests[0])
        shape = {n: tuple(a.shape) for n, a in only.items()}
        return Collated(inputs=only, rows=(1,), shapes=(shape,), padded=shape)
    names = sorted(requests[0])
    inputs: dict[str, np.ndarray] = {}
    padded: dict[str, tuple[int, ...]] = {}
    for name in names:
        spec = layout.input_spec(name)
        inputs[name], padded[name] = _stack(
            name, [r[name] for r in requests], spec.pad_value if spec else 0.0, left=layout.pads_left(name)
        )
    return Collated(
        inputs=inputs,
        rows=tuple(int(r[names[0]].shape[0]) for r in requests),
        shapes=tuple({n: tuple(r[n].shape[1:]) for n in names} for r in requests),
        padded=padded,
    )


def _unpad(output: np.ndarray, own: tuple[int, ...], padded: tuple[int, ...], left: bool = False) -> np.ndarray:
    """Slice the axes that were padded back to the request's own sizes.

    Output axis j (after the batch axis) follows input axis j. Padded at the end, it
    is sliced only when its size equals the padded size, so unrelated axes are left
    alone. Padded at the start (``left``), its leading padding is dropped whenever the
    axis is at least the padded size: such an output may extend its input (a decoder's
    present key/values are the past ones plus the new positions).
    """
    index: list[slice] = [slice(None)]
    changed = False
    for j in range(min(output.ndim - 1, len(own))):
        size = output.shape[j + 1]
        if own[j] != padded[j] and (size >= padded[j] if left else size == padded[j]):
            index.append(slice(padded[j] - own[j], None) if left else slice(0, own[j]))
            changed = True
        else:
            index.append(slice(None))
    return output[tuple(index)] if changed else output


def own_outputs(
    outputs: Mapping[str, np.ndarray], layout: TensorLayout, rows: int, wanted: Sequence[str] | None
) -> dict[str, np.ndarray]:
    """A lone request's outputs: the ones it asked for (all when None), checked
    like ``split`` checks a batch's, without slicing (nothing was padded)."""
    if wanted is None:
        own = outputs if isinstance(outputs, dict) else dict(outputs)  # the runtime's fresh dict is already ours
    else:
        missing = [n for n in wanted if n not in outputs]
        if missing:
            raise RuntimeFailure(f"model {layout.model!r} did not produce output(s) {missing}")
        own = {n: outputs[n] for n in wanted}
    if layout.batched:
        _check_batch_rows(own, rows, layout)
    return own


def _check_batch_rows(outputs: Mapping[str, np.ndarray], rows: int, layout: TensorLayout) -> None:
    """Every output of a batching model has the batch's rows first."""
    for name, array in outputs.items():
        if array.ndim == 0 or array.shape[0] != rows:
            raise RuntimeFailure(
                f"output {name!r} of model {layout.model!r} has shape {list(array.shape)} but the batch has "
                f"{rows} rows; a batching model's outputs need a leading batch dimension"
            )


def split(
    outputs: Mapping[str, np.ndarray],
    collated: Collated,
    layout: TensorLayout,
    wanted: Sequence[tuple[str, ...] | None],
) -> list[dict[str, np.ndarray]]:
    """Per request: its rows of each output it asked for (all when None), unpadded."""
    results: list[dict[str, np.ndarray]] = []
    if not layout.batched:
        return [own_outputs(outputs, layout, 1, wanted[0])]  # one request, nothing padded
    _check_batch_rows(outputs, collated.total_rows, layout)
    unpad_like = layout.unpad_like or {}
    offset = 0
    for rows, shape, names_wanted in zip(collated.rows, collated.shapes, wanted, strict=False):
        names = names_wanted if names_wanted is not None else tuple(outputs)
        result: dict[str, np.ndarray] = {}
        for name in names:
            if name not in outputs:
                raise RuntimeFailure(f"model {layout.model!r} did not produce output {name!r}")
            part = outputs[name][offset : offset + rows]
            follows = unpad_like.get(name)
            if follows is not None and follows in shape:
                part = _unpad(part, shape[follows], collated.padded[follows], layout.pads_left(follows))
            result[name] = part
        results.append(result)
        offset += rows
    return results
