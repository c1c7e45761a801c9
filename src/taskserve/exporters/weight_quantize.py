"""Weight-only quantization (``taskserve-export --weights int4|int8``): every constant-weight
MatMul becomes ONNX Runtime's blockwise ``MatMulNBits`` (weights in 4 or 8 bits with one fp32
scale per block of ``BLOCK_SIZE`` input rows; the kernel quantizes the activations to int8 per
block and runs integer dot products, as llama.cpp's quantized matrices do). int8 is symmetric
(ONNX Runtime's quantizer); ``--weights int4`` is ggml's Q4_1 scheme (asymmetric, ``ggml_blocks``),
which gives back weights already on a Q4_1 grid exactly, with the LM head (the MatMul that
writes a graph output) in Q8_0-style int8, as ggml's Q4_1 files keep it.

Decoding reads every weight once per step, so a step costs roughly the bytes of the weights:
int4 reads about an eighth of fp32. A constant-weight ``Gemm(x, W, transB=1)`` (the engine
graph's LM head, tied to the token embedding) is first rewritten as ``MatMul(x, W^T)`` so
the largest matrix is quantized too; the embedding ``Gather`` keeps its float table.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from taskserve.exporters.errors import ExportError
from taskserve.exporters.ggml_blocks import matmul_nbits
from taskserve.exporters.quiet import quiet

BITS = {"int4": 4, "int8": 8}
# 32 rows per scale: the finest block MatMulNBits takes; coarser blocks lose more accuracy on
# small models for little speed.
BLOCK_SIZE = 32
# accuracy_level 4: the CPU kernel quantizes activations to int8 per block and runs integer
# dot products (VNNI where present); lower levels compute in fp32 after dequantizing.
ACCURACY_LEVEL = 4
# int4 and int8 alike: the Q4_1-style blocks run on the same int8 kernel (ggml_blocks.matmul_nbits
# keeps their grid exact with a small float residual term).
# Too small to pay for the block bookkeeping (and MatMulNBits needs K and N of at least a block).
_MIN_ELEMENTS = 16 * 1024


def _untie_gemms(model: onnx.ModelProto) -> int:
    """Rewrite ``Gemm(x, W, transB=1)`` over a constant 2-D ``W`` without bias or scaling as
    ``MatMul(x, W^T)`` (a new initializer, so a tied embedding keeps its table); returns how many."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    count = 0
    for index, node in enumerate(list(graph.node)):
        if node.op_type != "Gemm" or len(node.input) != 2 or node.input[1] not in inits:
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        if weight.ndim != 2:
            continue
        if attrs.get("transB", 0):
            weight = weight.T
        name = f"{node.input[1]}.matmul_t"
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight, np.float32), name))
        graph.node.remove(node)
        graph.node.insert(index, helper.make_node("MatMul", [node.input[0], name], list(node.output), name=node.name))
        count += 1
    return count


def _small_matmuls(model: onnx.ModelProto) -> list[str]:
    """MatMul nodes whose constant weight is too small to quantize (kept in float)."""
    inits = {t.name: t for t in model.graph.initializer}
    small = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) == 2 and node.input[1] in inits:
            dims = inits[node.input[1]].dims
            if len(dims) != 2 or int(np.prod(dims)) < _MIN_ELEMENTS or min(dims) < BLOCK_SIZE:
                small.append(node.name)
    return small


def _symmetric(model: onnx.ModelProto, bits: int) -> onnx.ModelProto:
    """ONNX Runtime's quantizer: symmetric blocks (scale max|w| / 2^(bits-1), integer zero point)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(
        model,
        bits=bits,
        block_size=BLOCK_SIZE,
        is_symmetric=True,
        accuracy_level=ACCURACY_LEVEL,
        nodes_to_exclude=_small_matmuls(model),
    )
    with quiet():  # it logs every node it quantizes
        quantizer.process()
    quantized: onnx.ModelProto = quantizer.model.model
    return quantized


def _ggml_int4(model: onnx.ModelProto, head_bits: int = 8) -> onnx.ModelProto:
    """Every large constant-weight MatMul as a Q4_1-style int4 MatMulNBits, the head (whose
    output is a graph output: the logits) as ``head_bits``."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    inits = {t.name: t for t in graph.initializer}
    small = set(_small_matmuls(model))
    replaced: set[str] = set()
    for node in list(graph.node):
        if node.op_type != "MatMul" or node.input[1] not in inits or node.name in small:
            continue
        weight = numpy_helper.to_array(inits[node.input[1]])
        bits = head_bits if node.output[0] in outputs else 4
        tensors, quantized = matmul_nbits(
            f"{node.name}_Q{bits}", node.input[0], node.output[0], weight, bits, BLOCK_SIZE, ACCURACY_LEVEL
        )
        graph.initializer.extend(tensors)
        at = list(graph.node).index(node)
        graph.node.remove(node)
        for offset, new_node in enumerate(quantized):
            graph.node.insert(at + offset, new_node)
        replaced.add(node.input[1])
    used = {name for n in graph.node for name in n.input}
    for name in replaced - used:  # a weight shared with another node keeps its float copy
        graph.initializer.remove(inits[name])
    if replaced and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return model


def quantize_weights(src: Path, dst: Path, mode: str) -> int:
    """Write ``src`` with its constant-weight MatMuls as ``mode`` (int4 or int8) MatMulNBits;
    return how many nodes were quantized."""
    if mode not in BITS:
        raise ExportError(f"unknown --weights {mode!r}; use one of {sorted(BITS)}")
    model = onnx.load(str(src))
    for i, node in enumerate(model.graph.node):
        if not node.name:  # the quantizer addresses nodes by name
            node.name = f"{node.op_type}_{i}"
    _untie_gemms(model)
    quantized = _ggml_int4(model) if mode == "int4" else _symmetric(model, BITS[mode])
    count = int(sum(n.op_type == "MatMulNBits" for n in quantized.graph.node))
    if count == 0:
        raise ExportError(
            f"--weights {mode}: {src.name} has no constant-weight MatMul large enough to quantize; "
            "weight-only quantization pays on transformer models. Export without --weights."
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    large = sum(t.ByteSize() for t in quantized.graph.initializer) > 1_800_000_000
    onnx.save_model(quantized, str(dst), save_as_external_data=large, location=dst.name + ".data")
    return count
