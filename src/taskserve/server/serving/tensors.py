"""Reconcile a model's configured inputs/outputs with what its graph declares.

Unset inputs/outputs default to the graph's; configured ones must exist in the
graph with the same datatype, and their dims must fit the graph's shape.
"""

from __future__ import annotations

from taskserve.server.errors import ConfigError
from taskserve.server.repository.config import ModelConfig, TensorConfig
from taskserve.server.runtimes.base import TensorInfo


def _from_graph(info: TensorInfo, batched: bool) -> TensorConfig:
    dims = info.shape[1:] if batched else info.shape
    return TensorConfig(name=info.name, datatype=info.datatype, dims=tuple(dims))  # type: ignore[arg-type]


def _check(kind: str, configured: TensorConfig, info: TensorInfo, batched: bool, model: str) -> TensorConfig:
    """``configured`` checked against the graph, with -1 dims the graph fixes filled in."""
    if configured.datatype != info.datatype:
        raise ConfigError(
            f"model {model!r}: {kind} {configured.name!r} is configured as {configured.datatype} but the graph "
            f"declares {info.datatype}; set datatype: {info.datatype}"
        )
    graph_dims = info.shape[1:] if batched else info.shape
    if len(graph_dims) != len(configured.dims) or any(
        g != -1 and c not in (-1, g) for g, c in zip(graph_dims, configured.dims, strict=False)
    ):
        raise ConfigError(
            f"model {model!r}: {kind} {configured.name!r} has dims {list(configured.dims)} but the graph declares "
            f"{list(graph_dims)} (without the batch dimension: {batched}); make dims match the graph"
        )
    merged = tuple(g if c == -1 else c for g, c in zip(graph_dims, configured.dims, strict=True))
    return configured.model_copy(update={"dims": merged})


def resolve_tensors(
    config: ModelConfig, graph_inputs: list[TensorInfo], graph_outputs: list[TensorInfo]
) -> ModelConfig:
    """A copy of ``config`` whose inputs and outputs are complete and checked against the graph."""
    batched = config.max_batch_size > 0
    resolved: dict[str, tuple[TensorConfig, ...]] = {}
    for kind, configured, graph in (("input", config.inputs, graph_inputs), ("output", config.outputs, graph_outputs)):
        by_name = {t.name: t for t in graph}
        for info in graph:
            if batched and (not info.shape or info.shape[0] != -1):
                raise ConfigError(
                    f"model {config.name!r}: max_batch_size > 0 needs a variable first dimension on {kind} "
                    f"{info.name!r}, but the graph declares {list(info.shape)}; set max_batch_size: 0 or re-export "
                    "with a dynamic batch axis"
                )
        if configured is None:
            resolved[kind] = tuple(_from_graph(t, batched) for t in graph)
            continue
        checked = []
        for tensor in configured:
            if tensor.name not in by_name:
                raise ConfigError(
                    f"model {config.name!r}: {kind} {tensor.name!r} is not in the graph; it has {sorted(by_name)}"
                )
            checked.append(_check(kind, tensor, by_name[tensor.name], batched, config.name))
        if kind == "input":
            missing = [t.name for t in graph if t.name not in {c.name for c in configured}]
            if missing:
                raise ConfigError(
                    f"model {config.name!r}: the graph needs inputs {missing} that config.yaml leaves out"
                )
        resolved[kind] = tuple(checked)
    return config.model_copy(update={"inputs": resolved["input"], "outputs": resolved["output"]})
