"""How a model's tensors are batched: which axes vary, what pads them, which
outputs follow which input, and which requests may share a batch.

Pure functions over numpy shapes; no asyncio, no threads.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from taskserve.server.errors import InvalidInput, LimitExceeded
from taskserve.server.repository.config import ModelConfig, Padding
from taskserve.server.runtimes.base import TensorInfo


@dataclass(frozen=True)
class InputSpec:
    """One input as the batcher sees it. ``dims`` exclude the batch dimension; -1 is variable."""

    name: str
    dims: tuple[int, ...]
    pad_value: float = 0.0
    optional: bool = False
    # right: pad at the end; left: pad at the start; none: never pad (sizes join the batching key).
    padding: Padding = "right"

    @functools.cached_property
    def variable_axes(self) -> tuple[int, ...]:
        """Indices (into ``dims``) of the axes padded when requests differ."""
        return tuple(i for i, d in enumerate(self.dims) if d == -1) if self.padding != "none" else ()


@dataclass(frozen=True)
class RequestSignature:
    """What the queue needs to know about one request."""

    rows: int
    # Requests share a batch only when their keys are equal: same inputs, dtypes,
    # fixed dims and length bucket.
    key: Hashable
    # Longest variable axis over all inputs (0 when nothing varies).
    length: int


_SEEN_LIMIT = 4096


def _shape(shape: Sequence[int]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


@dataclass(frozen=True)
class TensorLayout:
    """The batching-relevant view of a model's inputs and outputs."""

    model: str
    # False: the model has no batch dimension (max_batch_size 0); requests run alone, as-is.
    batched: bool
    # None: the model declares no inputs; requests then share a batch only when
    # their shapes match exactly (nothing is padded).
    inputs: Mapping[str, InputSpec] | None
    # Output names the model produces (None: unknown, not checked).
    output_names: frozenset[str] | None = None
    # Output name -> input whose padded axes it shares (sliced back per request).
    unpad_like: Mapping[str, str] | None = None
    length_buckets: tuple[int, ...] = ()
    # Variable axes that several inputs share (the graph names them alike, e.g.
    # input_ids and attention_mask on "sequence_length"): (axis name, ((input, axis), ...)).
    # A request whose inputs disagree there breaks the model, and a batch with it.
    shared_axes: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    # Largest size a variable dim may have (None: no limit); ModelConfig.limits.max_variable_dim.
    max_variable_dim: int | None = None
    # Signatures of requests already checked, by (names, dtypes, shapes, outputs, max_rows):
    # a request is a pure function of those, and most traffic repeats a few shapes.
    _seen: dict[Hashable, RequestSignature] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        runtime_inputs: Sequence[TensorInfo] | None = None,
        runtime_outputs: Sequence[TensorInfo] | None = None,
    ) -> TensorLayout:
        """Prefer the config's tensor declarations; fall back to what the runtime reports."""
        batched = config.max_batch_size > 0
        inputs: dict[str, InputSpec] | None = None
        if config.inputs is not None:
            inputs = {
                t.name: InputSpec(t.name, t.dims, t.pad_value, t.optional, t.padding) for t in config.inputs
            }
        elif runtime_inputs:
            # Runtime shapes include the batch dimension when the model batches.
            inputs = {t.name: InputSpec(t.name, t.shape[1:] if batched else t.shape) for t in runtime_inputs}
        output_names: frozenset[str] | None = None
        if config.outputs is not None:
            output_names = frozenset(t.name for t in config.outputs)
        elif runtime_outputs:
            output_names = frozenset(t.name for t in runtime_outputs)
        unpad = {t.name: t.unpad_like for t in config.outputs or () if t.unpad_like is not None}
        shared: dict[str, list[tuple[str, int]]] = {}
        for info in runtime_inputs or ():
            spec = inputs.get(info.name) if inputs is not None else None
            names = info.axis_names[1:] if batched else info.axis_names
            for axis, axis_name in enumerate(names):
                if axis_name and spec is not None and axis < len(spec.dims) and spec.dims[axis] == -1:
                    shared.setdefault(axis_name, []).append((info.name, axis))
        return cls(
            model=config.name,
            batched=batched,
            inputs=inputs,
            output_names=output_names,
            unpad_like=unpad,
            length_buckets=config.dynamic_batching.length_buckets,
            shared_axes=tuple((n, tuple(members)) for n, members in shared.items() if len(members) > 1),
            max_variable_dim=config.limits.max_variable_dim,
        )

    def input_spec(self, name: str) -> InputSpec | None:
        """The declared input ``name``; None when it is undeclared or nothing is declared."""
        return self.inputs.get(name) if self.inputs is not None else None

    def pads_left(self, name: str) -> bool:
        """Whether input ``name`` is padded at the start of its variable axes."""
        spec = self.input_spec(name)
        return spec is not None and spec.padding == "left"

    def bucket(self, length: int) -> int:
        """Index of the first bucket edge >= length; len(edges) for longer ones."""
        return bisect.bisect_left(self.length_buckets, length)

    def describe(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None, max_rows: int
    ) -> RequestSignature:
        """Check a request against the model and compute its batching signature.

        Raises InvalidInput naming the tensor and the fix. Runs for every request:
        a shape seen before is answered from ``_seen``; otherwise each check is a
        cheap test first, and the message is only built on failure.
        """
        try:
            seen_key: Hashable = (
                tuple([(n, a.dtype, a.shape) for n, a in inputs.items()]),
                output_names,
                max_rows,
            )
            signature = self._seen.get(seen_key)
        except (AttributeError, TypeError):  # not arrays, or unhashable names: the full check explains
            seen_key, signature = None, None
        if signature is not None:
            return signature
        signature = self._check(inputs, output_names, max_rows)
        if seen_key is not None:
            if len(self._seen) >= _SEEN_LIMIT:
                self._seen.clear()  # unusual traffic (many shapes): start over rather than grow
            self._seen[seen_key] = signature
        return signature

    def _check(
        self, inputs: Mapping[str, np.ndarray], output_names: Sequence[str] | None, max_rows: int
    ) -> RequestSignature:
        model = self.model
        if not inputs:
            raise InvalidInput(f"request to model {model!r} has no inputs")
        if not all(isinstance(a, np.ndarray) for a in inputs.values()):
            not_arrays = sorted(n for n, a in inputs.items() if not isinstance(a, np.ndarray))
            raise InvalidInput(f"input(s) {not_arrays} of model {model!r} are not numpy arrays")
        declared = self.inputs
        if declared is not None:
            if not all(n in declared for n in inputs):
                unknown = sorted(set(inputs) - set(declared))
                raise InvalidInput(f"model {model!r} has no input(s) {unknown}; its inputs are {sorted(declared)}")
            if not all(s.optional or n in inputs for n, s in declared.items()):
                missing = sorted(n for n, s in declared.items() if not s.optional and n not in inputs)
                raise InvalidInput(f"request to model {model!r} lacks required input(s) {missing}")
        if (
            output_names is not None
            and self.output_names is not None
            and not self.output_names.issuperset(output_names)
        ):
            unknown = sorted(set(output_names) - self.output_names)
            raise InvalidInput(
                f"model {model!r} has no output(s) {unknown}; its outputs are {sorted(self.output_names)}"
            )

        rows = 1
        if self.batched:
            first = next(iter(inputs.values()))
            rows = first.shape[0] if first.ndim else -1
            if any((a.shape[0] if a.ndim else -1) != rows for a in inputs.values()) or rows == -1:
                self._raise_bad_rows(inputs)
            if rows < 1:
                raise InvalidInput(f"request to model {model!r} has 0 rows; send at least one")
            if rows > max_rows:
                raise InvalidInput(
                    f"request to model {model!r} has {rows} rows but max_batch_size is {max_rows}; "
                    "split it into smaller requests"
                )

        key: list[Hashable] = []
        length = 0
        for name in sorted(inputs):
            array = inputs[name]
            dims = array.shape[1:] if self.batched else array.shape
            spec = self.input_spec(name)
            if spec is None:
                # Undeclared: never padded, so only identical shapes share a batch.
                key.append((name, array.dtype.str, tuple(dims)))
                continue
            if len(dims) != len(spec.dims) or any(d != -1 and d != n for d, n in zip(spec.dims, dims, strict=False)):
                expected = ([-1] if self.batched else []) + list(spec.dims)
                raise InvalidInput(
                    f"input {name!r} of model {model!r} has shape {_shape(array.shape)}, "
                    f"expected {_shape(expected)} (-1: any size)"
                )
            variable = spec.variable_axes
            fixed = tuple(None if i in variable else n for i, n in enumerate(dims))
            key.append((name, array.dtype.str, fixed))
            length = max([length, *(dims[i] for i in variable)])
            if self.max_variable_dim is not None:
                for axis, size in enumerate(dims):
                    if spec.dims[axis] == -1 and size > self.max_variable_dim:
                        raise LimitExceeded(
                            f"input {name!r} of model {model!r} has size {size} on variable axis {axis}, over the "
                            f"limit of {self.max_variable_dim}; send less, or raise limits.max_variable_dim in "
                            "the model's config.yaml (server default: --max-variable-dim)"
                        )
        for axis_name, members in self.shared_axes:
            # A size of 0 is a placeholder, not a length (a merged decoder's empty
            # past key/values on its first step): only real lengths must agree.
            sizes = {(n, a): inputs[n].shape[a + self.batched] for n, a in members if n in inputs}
            if len({size for size in sizes.values() if size}) > 1:
                detail = ", ".join(f"{n} has {size}" for (n, _), size in sizes.items() if size)
                raise InvalidInput(
                    f"inputs of model {model!r} share the axis {axis_name!r} but disagree on its size: {detail}; "
                    "send them with equal lengths"
                )
        if self.batched and self.length_buckets:
            key.append(("bucket", self.bucket(length)))
        return RequestSignature(rows=rows, key=tuple(key), length=length)

    def _raise_bad_rows(self, inputs: Mapping[str, np.ndarray]) -> None:
        model = self.model
        scalars = sorted(n for n, a in inputs.items() if not a.ndim)
        if scalars:
            raise InvalidInput(
                f"input(s) {scalars} of model {model!r} are scalars; a batching model needs a leading batch dimension"
            )
        detail = ", ".join(f"{n} has {a.shape[0]}" for n, a in sorted(inputs.items()))
        raise InvalidInput(f"inputs of model {model!r} disagree on the batch size (rows): {detail}")
