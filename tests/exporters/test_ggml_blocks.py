"""``--weights int4`` uses ggml's Q4_1 scheme (asymmetric blocks of 32 along K): weights already
on a Q4_1 grid (``d * q + m``, as a model dequantized from a Q4_1 GGUF has them) come back
exactly, through the quantizer and through ONNX Runtime's MatMulNBits (integer zero points and
a float residual term), where the symmetric int4 scheme cannot follow them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from taskserve.exporters.ggml_blocks import dequantize_q4, quantize_q4, quantize_q8
from taskserve.exporters.weight_quantize import BLOCK_SIZE, _symmetric, quantize_weights

K, N = 128, 256  # 32K weights: large enough for the quantizer to take the MatMul


def _q4_1_grid(rng: np.random.Generator, k: int, n: int) -> np.ndarray:
    """A (K, N) matrix whose every block of 32 along K is ``d * q + m`` with fp16 ``d`` and
    ``m`` (as a GGUF stores them) and ``q`` in 0..15, 0 and 15 both present."""
    blocks = k // BLOCK_SIZE
    d = rng.uniform(1e-3, 5e-2, (n, blocks)).astype(np.float16).astype(np.float32)
    m = rng.uniform(-0.5, 0.1, (n, blocks)).astype(np.float16).astype(np.float32)
    q = rng.integers(0, 16, (n, blocks, BLOCK_SIZE)).astype(np.float32)
    q[..., 3], q[..., 9] = 0, 15  # both in a block's first 16 rows
    return np.ascontiguousarray((d[..., None] * q + m[..., None]).reshape(n, k).T)


def _one_matmul(weight: np.ndarray, path: Path) -> Path:
    """``y = Identity(x @ weight)``: one constant-weight MatMul that is not an LM head (its
    output is not the graph's)."""
    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["xw"], name="mm"), helper.make_node("Identity", ["xw"], ["y"])],
        "one-matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        initializer=[numpy_helper.from_array(weight.astype(np.float32), "w")],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _run(model: onnx.ModelProto | Path, x: np.ndarray) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"x": x})[0])


def test_a_q4_1_block_round_trips_through_the_quantizer() -> None:
    weight = _q4_1_grid(np.random.default_rng(1), K, N)
    packed, scale, zero_point = quantize_q4(weight, BLOCK_SIZE)
    assert packed.shape == (N, K // BLOCK_SIZE, BLOCK_SIZE // 2) and packed.dtype == np.uint8
    assert zero_point.dtype == np.float32  # not rounded to an integer code
    np.testing.assert_allclose(dequantize_q4(packed, scale, zero_point, K), weight, rtol=0, atol=1e-6)


def test_a_q8_0_block_round_trips_through_the_quantizer() -> None:
    rng = np.random.default_rng(2)
    d = rng.uniform(1e-3, 1e-2, (N, K // BLOCK_SIZE)).astype(np.float16).astype(np.float32)
    q = rng.integers(-127, 128, (N, K // BLOCK_SIZE, BLOCK_SIZE)).astype(np.float32)
    q[..., 5] = 127
    weight = np.ascontiguousarray((d[..., None] * q).reshape(N, K).T)
    codes, scale = quantize_q8(weight, BLOCK_SIZE)
    back = (codes.astype(np.float32) - 128) * scale[..., None]
    np.testing.assert_allclose(back.reshape(N, K).T, weight, rtol=0, atol=1e-7)


def test_matmulnbits_computes_a_q4_1_matrix_exactly_and_symmetric_int4_does_not(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    weight = _q4_1_grid(rng, K, N)
    source = _one_matmul(weight, tmp_path / "fp32.onnx")
    assert quantize_weights(source, tmp_path / "int4.onnx", "int4") == 1
    quantized = onnx.load(str(tmp_path / "int4.onnx"))
    (node,) = [n for n in quantized.graph.node if n.op_type == "MatMulNBits"]
    attributes = {a.name: a.i for a in node.attribute}
    # int8 activations (the integer kernel), as llama.cpp's Q4_1 x Q8_1 dot product.
    assert attributes["bits"] == 4 and attributes["accuracy_level"] == 4
    # An integer (uint8) zero point keeps ONNX Runtime's packed 4-bit kernel: with a float one it
    # dequantizes the whole matrix on every call. What rounding it loses is a MatMul of its own.
    inits = {t.name: t for t in quantized.graph.initializer}
    assert inits[node.input[3]].data_type == onnx.TensorProto.UINT8
    assert [n.op_type for n in quantized.graph.node][:4] == ["MatMulNBits", "MatMul", "MatMul", "Add"]

    # The matrix the graph computes with is the Q4_1 matrix: rows of the identity (which int8
    # activations hold exactly) read it back up to float rounding.
    eye = np.eye(K, dtype=np.float32)
    np.testing.assert_allclose(_run(tmp_path / "int4.onnx", eye), weight, rtol=0, atol=1e-6)
    # The previous scheme (symmetric, integer zero point 8) cannot follow the same grid.
    symmetric = _run(_symmetric(onnx.load(str(source)), 4), eye)
    assert np.abs(symmetric - weight).max() > 100 * 1e-6

    # General activations: only their int8 rounding moves the result (a 128-term dot product of
    # errors of at most half a step of max|x|/127 per block).
    x = rng.standard_normal((8, K)).astype(np.float32)
    expected = x @ weight
    error = np.abs(_run(tmp_path / "int4.onnx", x) - expected).max()
    assert error < 0.02 * np.abs(expected).max(), error
    assert error < np.abs(_run(_symmetric(onnx.load(str(source)), 4), x) - expected).max()


@pytest.mark.parametrize("k", [96, 80])
def test_a_last_partial_block_keeps_its_grid(k: int) -> None:
    weight = _q4_1_grid(np.random.default_rng(4), 96, 64)[:k]  # K = 80 cuts the last block at 16 rows
    packed, scale, zero_point = quantize_q4(weight, BLOCK_SIZE)
    np.testing.assert_allclose(dequantize_q4(packed, scale, zero_point, k), weight, rtol=0, atol=1e-6)
