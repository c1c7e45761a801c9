"""Graph optimizations: onnxruntime's transformer fusions for BERT-like encoders,
its portable basic graph passes for everything else."""

from __future__ import annotations

import logging
from pathlib import Path

import onnx
import onnxruntime as ort

from taskserve.exporters.spec import TransformerShape

# Hugging Face model types whose attention onnxruntime's "bert" optimizer fuses.
BERT_LIKE = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "camembert", "mpnet", "albert"}
)
_TWO_GB = 2**31


def transformer_shape(model_type: str, num_heads: int, hidden_size: int) -> TransformerShape | None:
    """The optimizer setting for a Hugging Face model type, or None when fusions don't apply."""
    if model_type in BERT_LIKE:
        return TransformerShape("bert", num_heads, hidden_size)
    return None


def _node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def optimize_file(src: Path, dst: Path, transformer: TransformerShape | None) -> str:
    """Write the optimized graph of ``src`` to ``dst``; return what was done, for the summary."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    before = _node_count(src)
    if transformer is not None:
        from onnxruntime.transformers.optimizer import optimize_model

        # The fusion passes log each pattern they try; keep the CLI output to the summary.
        logging.getLogger("onnxruntime.transformers").setLevel(logging.ERROR)
        model = optimize_model(
            str(src),
            model_type=transformer.model_type,
            num_heads=transformer.num_heads,
            hidden_size=transformer.hidden_size,
        )
        fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        model.save_model_to_file(str(dst), use_external_data_format=src.stat().st_size >= _TWO_GB)
        ops = ", ".join(f"{k}x{v}" for k, v in fused.items()) or "none"
        return f"{transformer.model_type} fusions: {ops}; nodes {before} -> {_node_count(dst)}"
    # Basic passes (constant folding, redundant nodes, Conv+BN/Relu fusions) keep standard
    # ops only, so the saved graph still runs on every execution provider.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(dst)
    options.log_severity_level = 3
    ort.InferenceSession(str(src), options, providers=["CPUExecutionProvider"])
    return f"onnxruntime basic graph passes; nodes {before} -> {_node_count(dst)}"
