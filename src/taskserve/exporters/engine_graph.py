"""The decoder graph the generation engine serves: a Llama-family causal LM written
directly as ONNX, with ONNX Runtime's ``GroupQueryAttention`` over a resident cache.

Why not optimum's graph: it takes the past keys/values as inputs and returns them
concatenated with the new ones, so every step copies the whole cache (twice: in
and out), and its prefill computes full-vocabulary logits at every prompt position.
This graph instead

- takes per-slot cache buffers of ``max_model_len`` positions (``past_key.N`` /
  ``past_value.N``, shape (batch, kv heads, max_model_len, head size)) that the runner
  binds as both input and output (``present_key.N`` / ``present_value.N``): the
  attention kernel writes only the new tokens' keys/values in place and reads only
  each row's own positions (``seqlens_k``: positions held after the step, minus one);
- applies rotary embeddings inside the attention kernel from cos/sin tables, so rows
  of different lengths share a decode batch without masks or position ids;
- returns ``logits`` of the last position only, shape (batch, vocab).

Supported: ``LlamaForCausalLM`` and the same-shaped ``MistralForCausalLM`` (without a
sliding window) and ``Qwen2ForCausalLM`` (query/key/value biases).
"""

# transformers and torch are untyped enough here.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.exporters.errors import ExportError

ARCHITECTURES = ("llama", "mistral", "qwen2")
# Read by the server's runner (runtimes/onnx_decoder.py); exporters never import server code.
MAX_POSITIONS_KEY = "taskserve.max_positions"


def supports(config: Any) -> bool:
    """Whether the engine's graph can express ``config``; other decoders export through optimum."""
    if getattr(config, "model_type", None) not in ARCHITECTURES or getattr(config, "hidden_act", "silu") != "silu":
        return False
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    # ONNX Runtime's GroupQueryAttention applies rotary embeddings to heads of multiples of 16 only.
    return head_dim % 16 == 0


def build_decoder_graph(model: Any, path: Path, max_positions: int) -> None:
    """Write ``model`` (a transformers Llama-family causal LM, float32) as the engine's graph,
    its rotary tables covering ``max_positions`` (the cache length is chosen when served)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    config = model.config
    if not supports(config):
        raise ExportError(
            f"the generation engine's graph supports {', '.join(ARCHITECTURES)} models, not "
            f"{getattr(config, 'model_type', '?')!r}"
        )
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ExportError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True) and (
        config.model_type == "mistral"
    ):
        raise ExportError("sliding-window attention is not supported by the engine's graph")
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    layers = int(config.num_hidden_layers)
    eps = float(config.rms_norm_eps)
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}

    inits: list[onnx.TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, array: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def linear(x: str, prefix: str, out: str) -> str:
        w = weight(f"{prefix}.weight_t", state[f"{prefix}.weight"].T)
        if f"{prefix}.bias" in state:
            nodes.append(helper.make_node("MatMul", [x, w], [out + "_mm"]))
            b = weight(f"{prefix}.bias", state[f"{prefix}.bias"])
            nodes.append(helper.make_node("Add", [out + "_mm", b], [out]))
        else:
            nodes.append(helper.make_node("MatMul", [x, w], [out]))
        return out

    def rms_norm(x: str, prefix: str, out: str) -> str:
        w = weight(f"{prefix}.weight", state[f"{prefix}.weight"])
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [x, w], [out], axis=-1, epsilon=eps))
        return out

    # Rotary tables from the model's own rotary module (covers rope scaling variants).
    rotary = model.model.rotary_emb
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, rotary.inv_freq.to(torch.float32))
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    cos = weight("rotary.cos", (freqs.cos() * scaling).numpy())
    sin = weight("rotary.sin", (freqs.sin() * scaling).numpy())

    embed = weight("embed_tokens", state["model.embed_tokens.weight"])
    nodes.append(helper.make_node("Gather", [embed, "input_ids"], ["x0"]))
    x = "x0"
    cache_shape: list[Any] = ["batch", kv_heads, "cache_length", head_dim]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
    ]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", int(config.vocab_size)])]
    for i in range(layers):
        p = f"model.layers.{i}"
        h = rms_norm(x, f"{p}.input_layernorm", f"l{i}_h")
        q = linear(h, f"{p}.self_attn.q_proj", f"l{i}_q")
        k = linear(h, f"{p}.self_attn.k_proj", f"l{i}_k")
        v = linear(h, f"{p}.self_attn.v_proj", f"l{i}_v")
        for kind in ("key", "value"):
            graph_inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, cache_shape))
            graph_outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, cache_shape))
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                [q, k, v, f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length", cos, sin],
                [f"l{i}_attn", f"present_key.{i}", f"present_value.{i}"],
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                scale=1.0 / math.sqrt(head_dim),
                do_rotary=1,
                rotary_interleaved=0,
            )
        )
        o = linear(f"l{i}_attn", f"{p}.self_attn.o_proj", f"l{i}_o")
        nodes.append(helper.make_node("Add", [x, o], [f"l{i}_r1"]))
        h2 = rms_norm(f"l{i}_r1", f"{p}.post_attention_layernorm", f"l{i}_h2")
        g = linear(h2, f"{p}.mlp.gate_proj", f"l{i}_g")
        u = linear(h2, f"{p}.mlp.up_proj", f"l{i}_u")
        nodes.append(helper.make_node("Sigmoid", [g], [f"l{i}_gs"]))
        nodes.append(helper.make_node("Mul", [g, f"l{i}_gs"], [f"l{i}_silu"]))
        nodes.append(helper.make_node("Mul", [f"l{i}_silu", u], [f"l{i}_m"]))
        d = linear(f"l{i}_m", f"{p}.mlp.down_proj", f"l{i}_d")
        nodes.append(helper.make_node("Add", [f"l{i}_r1", d], [f"l{i}_out"]))
        x = f"l{i}_out"
    # Only the last position reaches the norm and the vocabulary projection.
    for name, value in (("last_start", [-1]), ("last_end", [np.iinfo(np.int64).max]), ("axis1", [1])):
        inits.append(numpy_helper.from_array(np.asarray(value, dtype=np.int64), name))
    nodes.append(helper.make_node("Slice", [x, "last_start", "last_end", "axis1"], ["x_last3"]))
    nodes.append(helper.make_node("Squeeze", ["x_last3", "axis1"], ["x_last"]))
    final = rms_norm("x_last", "model.norm", "x_normed")
    head = "lm_head.weight" if "lm_head.weight" in state and not config.tie_word_embeddings else None
    head_name = weight("lm_head", state[head]) if head else embed
    nodes.append(helper.make_node("Gemm", [final, head_name], ["logits"], transB=1))

    graph = helper.make_graph(nodes, "taskserve-decoder", graph_inputs, graph_outputs, inits)
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    proto = helper.make_model(graph, opset_imports=opsets, producer_name="taskserve-export")
    proto.ir_version = 8
    # The server refuses a max_model_len beyond the rotary tables (runtimes/onnx_decoder.py).
    helper.set_model_props(proto, {MAX_POSITIONS_KEY: str(max_positions)})
    path.parent.mkdir(parents=True, exist_ok=True)
    large = sum(t.ByteSize() for t in inits) > 1_800_000_000
    onnx.save_model(proto, str(path), save_as_external_data=large, location=path.name + ".data")

