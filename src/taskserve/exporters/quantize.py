"""Dynamic int8 quantization for CPU and how much it moves the outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from taskserve.exporters.errors import ExportError
from taskserve.exporters.quiet import quiet

# Per-channel weights keep MiniLM's embeddings within ~0.99 cosine of fp32; per-tensor
# scales lose several points. Convolutions are left in float: ConvInteger is slower
# than the float kernel on CPU.
QUANTIZED_OPS = ("MatMul", "Attention")
_INTEGER_OPS = {"MatMulInteger", "DynamicQuantizeMatMul", "QAttention"}


def quantize_int8(src: Path, dst: Path) -> int:
    """Write a dynamic int8 copy of ``src``; return how many nodes now run in int8."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst.parent.mkdir(parents=True, exist_ok=True)
    with quiet():  # it logs a pre-processing hint on every call
        quantize_dynamic(
            str(src),
            str(dst),
            weight_type=QuantType.QInt8,
            per_channel=True,
            op_types_to_quantize=list(QUANTIZED_OPS),
            # Fused contrib ops (Attention, SkipLayerNormalization) have no ONNX shape inference.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
    count = sum(n.op_type in _INTEGER_OPS for n in onnx.load(str(dst), load_external_data=False).graph.node)
    if count == 0:
        raise ExportError(
            f"--quantize int8: {src.name} has no MatMul/Attention nodes to quantize; dynamic int8 speeds up "
            "transformer models, not convolution networks. Export without --quantize."
        )
    return count


@dataclass(frozen=True)
class AccuracyChange:
    """How a lower-precision graph's output compares with the fp32 graph's on the same inputs."""

    output: str
    metric: str  # "top-1 agreement" | "mean cosine" | "max abs diff"
    value: float
    max_abs_diff: float


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a2 = a.reshape(-1, a.shape[-1]).astype(np.float64)
    b2 = b.reshape(-1, b.shape[-1]).astype(np.float64)
    norms = np.linalg.norm(a2, axis=1) * np.linalg.norm(b2, axis=1)
    keep = norms > 0
    return float(((a2 * b2).sum(axis=1)[keep] / norms[keep]).mean()) if keep.any() else 1.0


def accuracy_change(
    reference: Sequence[Mapping[str, np.ndarray]], candidate: Sequence[Mapping[str, np.ndarray]]
) -> list[AccuracyChange]:
    """Per output: top-1 agreement for logits, mean cosine for other float vectors."""
    names = [n for n in reference[0] if all(n in c for c in candidate)]
    changes = []
    for name in names:
        refs = [r[name] for r in reference]
        cands = [c[name] for c in candidate]
        diff = max(
            float(np.abs(r.astype(np.float64) - c.astype(np.float64)).max(initial=0.0))
            for r, c in zip(refs, cands, strict=True)
        )
        floats = all(np.issubdtype(r.dtype, np.floating) for r in refs)
        if floats and "logits" in name and refs[0].ndim >= 1 and refs[0].shape[-1] > 1:
            agree = np.concatenate(
                [(r.argmax(-1) == c.argmax(-1)).ravel() for r, c in zip(refs, cands, strict=True)]
            )
            changes.append(AccuracyChange(name, "top-1 agreement", float(agree.mean()), diff))
        elif floats and refs[0].ndim >= 1 and refs[0].shape[-1] > 1:
            cos = float(np.mean([_cosine(r, c) for r, c in zip(refs, cands, strict=True)]))
            changes.append(AccuracyChange(name, "mean cosine", cos, diff))
        else:
            changes.append(AccuracyChange(name, "max abs diff", diff, diff))
    return changes


def accuracy_summary(changes: Sequence[AccuracyChange]) -> str:
    return "; ".join(
        f"{c.output} {c.metric} {c.value:.4f}" for c in changes if c.metric != "max abs diff"
    ) or ("; ".join(f"{c.output} max abs diff {c.value:.3g}" for c in changes))
