"""ggml's block formats as ONNX Runtime ``MatMulNBits`` weights (``--weights int4``): blocks of
``block`` consecutive weights along a MatMul's input dimension K (one column of ``W`` in
``x @ W``), as ggml lays them out along a tensor's input dimension.

- **Q4_1-style int4** (``quantize_q4``): 4-bit codes ``q`` in 0..15, a float scale and a float
  zero point per block, ``w ≈ scale * (q - zero_point)``, scale ``(max - min) / 15`` and zero
  point ``-min / scale``: a block's smallest weight gets code 0, its largest code 15. That is
  ggml's Q4_1 (``d * q + m``), so a matrix already on such a grid (a model dequantized from a
  Q4_1 GGUF) comes back exactly, up to float rounding; a symmetric scale (``max|w| / 8``,
  integer zero point 8) cannot follow a block that is not centred on 0. For other weights it
  is the usual min/max asymmetric int4. The zero point is a float: rounded to an integer it
  would move every weight of the block by up to half a step, which is why ``matmul_nbits``
  writes the rounded one together with a residual term that gives that half step back.
- **Q8_0-style int8** (``quantize_q8``): codes ``q`` in -127..127 stored with MatMulNBits'
  default zero point 128, scale ``max|w| / 127``: ggml's Q8_0 (``d * q``), exact for a
  matrix on that grid (such as a Q4_1 GGUF's token embedding, which ggml keeps in Q8_0).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

Q4_LEVELS = 15  # codes 0..15
Q8_LEVELS = 127  # codes -127..127, stored + 128


def _columns(weight: np.ndarray, block: int) -> np.ndarray:
    """``weight`` (K, N) as (N, blocks, block), each block contiguous along K (MatMulNBits'
    layout). A last partial block is padded with its own last row, which leaves its min, max
    and max|w| as they are."""
    k, n = weight.shape
    blocks = -(-k // block)
    padded = np.pad(weight.astype(np.float32), ((0, blocks * block - k), (0, 0)), mode="edge")
    return np.ascontiguousarray(padded.T).reshape(n, blocks, block)


def quantize_q4(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``weight`` (K, N) as MatMulNBits' inputs: packed codes (N, K/block, block/2) uint8, low
    nibble first; scales and float zero points (N, K/block) float32."""
    cols = _columns(weight, block)
    low, high = cols.min(axis=2), cols.max(axis=2)
    scale = (high - low) / np.float32(Q4_LEVELS)
    scale[scale == 0] = 1  # a constant block: code 0 and zero point -value give it back
    zero_point = (-low / scale).astype(np.float32)
    codes = np.clip(np.rint((cols - low[..., None]) / scale[..., None]), 0, Q4_LEVELS).astype(np.uint8)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed, scale.astype(np.float32), zero_point


def dequantize_q4(packed: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, k: int) -> np.ndarray:
    """The (K, N) float32 matrix MatMulNBits computes with (``quantize_q4``'s inverse)."""
    codes = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(*packed.shape[:2], -1).astype(np.float32)
    cols = (codes - zero_point[..., None]) * scale[..., None]
    return np.ascontiguousarray(cols.reshape(cols.shape[0], -1)[:, :k].T)


def quantize_q8(weight: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """``weight`` (K, N) as MatMulNBits' 8-bit codes (N, K/block, block) uint8 (code + 128)
    and scales (N, K/block) float32."""
    cols = _columns(weight, block)
    scale = np.abs(cols).max(axis=2) / np.float32(Q8_LEVELS)
    scale[scale == 0] = 1
    codes = np.clip(np.rint(cols / scale[..., None]), -Q8_LEVELS, Q8_LEVELS) + 128
    return codes.astype(np.uint8), scale.astype(np.float32)


def matmul_nbits(
    name: str, activations: str, output: str, weight: np.ndarray, bits: int, block: int, accuracy_level: int
) -> tuple[list[onnx.TensorProto], list[onnx.NodeProto]]:
    """The nodes computing ``activations @ weight`` with ``weight`` as Q4_1-style int4 (``bits``
    4) or Q8_0-style int8 (``bits`` 8), and their initializers.

    int4 is written as ONNX Runtime's packed 4-bit kernel can take it: its zero points must be
    integers (with float ones it dequantizes the whole matrix on every call). A Q4_1 block
    ``scale * (q - z)`` has a float ``z``; with ``zi`` the nearest integer code,
    ``x @ W = MatMulNBits(x; q, scale, zi) + (x summed per block) @ residual``, where
    ``residual = scale * (zi - z)`` (at most half a step per block and column) is a small
    float MatMul over the block sums. The same numbers as the Q4_1 matrix, exactly.

    ``accuracy_level`` 4 quantizes the activations to int8 per block inside MatMulNBits (integer
    dot products, VNNI where present), as llama.cpp's Q4_1 x Q8_1 dot product does; the residual
    term then sees the activations unquantized. (An integer zero point of 0, codes 0..15 and the
    block minimums as the float term instead, moves results several times further under int8
    activations: the whole minimum rides on the rounded activations' error.)"""
    k, n = weight.shape
    if bits != 4:
        codes, scale = quantize_q8(weight, block)
        inits = [numpy_helper.from_array(codes, f"{name}.q8"), numpy_helper.from_array(scale, f"{name}.scales")]
        node = helper.make_node(
            "MatMulNBits", [activations, *(t.name for t in inits)], [output], name=name, domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=block, accuracy_level=accuracy_level,
        )  # fmt: skip
        return inits, [node]
    packed, scale, zero_point = quantize_q4(weight, block)
    blocks = packed.shape[1]
    codes_zero = np.clip(np.rint(zero_point), 0, Q4_LEVELS).astype(np.uint8)
    residual = np.ascontiguousarray((scale * (codes_zero - zero_point)).T, np.float32)  # (blocks, N)
    pairs = np.pad(codes_zero, ((0, 0), (0, blocks % 2)))  # two 4-bit zero points a byte, low first
    selector = np.zeros((k, blocks), np.float32)  # sums each block of x's K entries
    selector[np.arange(k), np.arange(k) // block] = 1
    arrays = {
        "q4": packed, "scales": scale, "zero_points": (pairs[:, 0::2] | (pairs[:, 1::2] << 4)).astype(np.uint8),
        "block_sum": selector, "residual": residual,
    }  # fmt: skip
    inits = [numpy_helper.from_array(a, f"{name}.{suffix}") for suffix, a in arrays.items()]
    nodes = [
        helper.make_node(
            "MatMulNBits", [activations, f"{name}.q4", f"{name}.scales", f"{name}.zero_points"], [f"{name}.codes_out"],
            name=name, domain="com.microsoft", K=k, N=n, bits=4, block_size=block, accuracy_level=accuracy_level,
        ),
        helper.make_node("MatMul", [activations, f"{name}.block_sum"], [f"{name}.sums"], name=f"{name}_block_sum"),
        helper.make_node(
            "MatMul", [f"{name}.sums", f"{name}.residual"], [f"{name}.residual_out"], name=f"{name}_residual"
        ),
        helper.make_node("Add", [f"{name}.codes_out", f"{name}.residual_out"], [output], name=f"{name}_add"),
    ]  # fmt: skip
    return inits, nodes
