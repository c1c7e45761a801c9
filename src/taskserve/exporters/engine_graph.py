"""The decoder graph the generation engine serves: a causal LM written directly as ONNX,
with ONNX Runtime's ``GroupQueryAttention`` over a resident cache.

Why not optimum's graph: it takes the past keys/values as inputs and returns them
concatenated with the new ones, so every step copies the whole cache (twice: in
and out), and its prefill computes full-vocabulary logits at every prompt position.
This graph instead

- takes per-slot cache buffers of ``max_model_len`` positions (``past_key.N`` /
  ``past_value.N``, shape (batch, kv heads, max_model_len, head size)) that the runner
  binds as both input and output (``present_key.N`` / ``present_value.N``): the
  attention kernel writes only the new tokens' keys/values in place and reads only
  each row's own positions (``seqlens_k``: positions held after the step, minus one);
- derives each new token's position from ``seqlens_k`` (row b's tokens take positions
  ``seqlens_k[b] + 1 - sequence ... seqlens_k[b]``), so rows of different lengths share
  a call without masks or position ids; rotary embeddings run inside the attention kernel
  where it can (heads of a multiple of 16), as graph ops otherwise;
- computes a layer's query, key and value projections as one MatMul (and the MLP's gate and
  up projections as one), whose result GroupQueryAttention takes packed, and adds each
  residual inside the next norm (``Skip(Simplified)LayerNormalization``): fewer, larger
  operators, where a one-row decode step pays for every operator it runs;
- returns ``logits`` only for the positions ``logits_index`` names (flat indices into
  batch x sequence, shape (rows,)): one per row that samples, so a call whose rows are
  padded on the right to the longest chunk still gets each row's last real token, and
  prefill computes no full-vocabulary logits for the rest of the prompt.

Supported: ``LlamaForCausalLM`` and the same-shaped ``MistralForCausalLM`` (without a
sliding window) and ``Qwen2ForCausalLM`` (query/key/value biases); ``GPT2LMHeadModel``
(learned positions, LayerNorm, GELU). Heads of a multiple of 8 (``GroupQueryAttention``).
"""

# transformers and torch are untyped enough here.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.exporters.errors import ExportError

LLAMA_FAMILY = ("llama", "mistral", "qwen2")
ARCHITECTURES = (*LLAMA_FAMILY, "gpt2")
# Read by the server's runner (runtimes/onnx_decoder.py); exporters never import server code.
MAX_POSITIONS_KEY = "taskserve.max_positions"
# GPT-2 activations the graph writes: the tanh approximation (FastGelu) or the exact GELU.
GPT2_ACTIVATIONS = {"gelu_new": "FastGelu", "gelu_pytorch_tanh": "FastGelu", "gelu": "Gelu"}


def unsupported(config: Any) -> str | None:
    """Why the engine's graph cannot express ``config``; None when it can."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        return f"model type {model_type!r} is not one of {', '.join(ARCHITECTURES)}"
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or int(config.hidden_size) // heads)
    if head_dim % 8:
        # GroupQueryAttention's CPU kernel takes heads of a multiple of 8 only.
        return f"attention heads of {head_dim} (GroupQueryAttention takes multiples of 8)"
    if model_type == "gpt2":
        activation = getattr(config, "activation_function", "gelu_new")
        if activation not in GPT2_ACTIVATIONS:
            return f"activation {activation!r} (the graph writes {', '.join(GPT2_ACTIVATIONS)})"
        if getattr(config, "scale_attn_by_inverse_layer_idx", False) or not getattr(config, "scale_attn_weights", True):
            return "GPT-2 attention scaling other than 1/sqrt(head size)"
        return None
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (silu only)"
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    if model_type == "mistral" and sliding:
        return "sliding-window attention"
    return None


def supports(config: Any) -> bool:
    """Whether the engine's graph can express ``config`` (``unsupported`` says why not)."""
    return unsupported(config) is None


def build_decoder_graph(model: Any, path: Path, max_positions: int) -> None:
    """Write ``model`` (a transformers causal LM of ``ARCHITECTURES``, float32) as the engine's
    graph, its position tables covering ``max_positions`` (the cache length is chosen when served)."""
    import onnx
    import torch
    from onnx import TensorProto, helper, numpy_helper

    config = model.config
    reason = unsupported(config)
    if reason is not None:
        raise ExportError(f"the generation engine's graph cannot express this model: {reason}")
    gpt2 = config.model_type == "gpt2"
    hidden = int(config.hidden_size)
    heads = int(config.num_attention_heads)
    kv_heads = heads if gpt2 else int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    layers = int(config.num_hidden_layers)
    state = {k: v.detach().to(torch.float32).cpu().numpy() for k, v in model.state_dict().items()}

    inits: list[onnx.TensorProto] = []
    consts: set[str] = set()
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, array: np.ndarray, dtype: Any = np.float32) -> str:
        inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name))
        return name

    def node(op: str, inputs: list[str], out: str, domain: str = "", **attrs: Any) -> str:
        nodes.append(helper.make_node(op, inputs, [out], domain=domain or None, **attrs))
        return out

    def dense(x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        """x @ w (+ b), ``w`` of shape (in, out)."""
        mm = node("MatMul", [x, weight(f"{name}.weight_t", w)], f"{name}_mm" if b is not None else name)
        return node("Add", [mm, weight(f"{name}.bias", b)], name) if b is not None else mm

    def linear(x: str, prefix: str, out: str) -> str:
        """A torch Linear (weight (out, in))."""
        return dense(x, state[f"{prefix}.weight"].T, state.get(f"{prefix}.bias"), out)

    def conv1d(x: str, prefix: str, out: str) -> str:
        """A GPT-2 Conv1D (weight (in, out))."""
        return dense(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"], out)

    def rms_norm(x: str, prefix: str, out: str) -> str:
        w = weight(f"{prefix}.weight", state[f"{prefix}.weight"])
        eps = float(config.rms_norm_eps)
        return node("SimplifiedLayerNormalization", [x, w], out, axis=-1, epsilon=eps)

    def layer_norm(x: str, prefix: str, out: str) -> str:
        w, b = weight(f"{prefix}.weight", state[f"{prefix}.weight"]), weight(f"{prefix}.bias", state[f"{prefix}.bias"])
        return node("LayerNormalization", [x, w, b], out, axis=-1, epsilon=float(config.layer_norm_epsilon))

    def linears(x: str, prefixes: list[str], out: str) -> str:
        """Torch Linears reading the same input as one MatMul, their outputs side by side."""
        w = np.concatenate([state[f"{p}.weight"].T for p in prefixes], axis=1)
        biases = [state.get(f"{p}.bias") for p in prefixes]
        if all(b is None for b in biases):
            return dense(x, w, None, out)
        shapes = [state[f"{p}.weight"].shape[0] for p in prefixes]
        b = np.concatenate([np.zeros(n, np.float32) if v is None else v for v, n in zip(biases, shapes, strict=True)])
        return dense(x, w, b, out)

    def skip_norm(x: str, skip: str, prefix: str, out: str, total: str) -> tuple[str, str]:
        """``norm(x + skip)`` and ``x + skip`` in one node (the residual sum and the next norm)."""
        w = weight(f"{prefix}.weight", state[f"{prefix}.weight"])
        if gpt2:
            b = weight(f"{prefix}.bias", state[f"{prefix}.bias"])
            eps = float(config.layer_norm_epsilon)
            op, inputs = "SkipLayerNormalization", [x, skip, w, b]
        else:
            eps = float(config.rms_norm_eps)
            op, inputs = "SkipSimplifiedLayerNormalization", [x, skip, w]
        nodes.append(helper.make_node(op, inputs, [out, "", "", total], domain="com.microsoft", epsilon=eps))
        return out, total

    def const(name: str, value: list[int]) -> str:
        """An int64 constant, written once however many nodes read it."""
        if name not in consts:
            consts.add(weight(name, np.asarray(value), np.int64))
        return name

    # Positions of the new tokens, (batch, sequence): seqlens_k + 1 - sequence + [0, sequence).
    node("Shape", ["input_ids"], "seq_len1", start=1, end=2)
    node("Squeeze", ["seq_len1", const("axis0", [0])], "seq_len")
    node("Range", [weight("zero", np.asarray(0), np.int64), "seq_len", weight("one", np.asarray(1), np.int64)], "steps")
    node("Cast", ["seqlens_k"], "seqlens64", to=TensorProto.INT64)
    node("Unsqueeze", ["seqlens64", const("axis1", [1])], "seqlens_col")
    node("Sub", ["seqlens_col", "seq_len1"], "first_m1")
    node("Add", ["first_m1", "one"], "first")
    node("Add", ["first", "steps"], "positions_raw")
    # Never negative (a negative index would wrap around the table): a row's own tokens are
    # always at positions >= 0; the clamp only guards a malformed call.
    node("Max", ["positions_raw", "zero"], "positions")

    # Rotary tables from the model's own rotary module (covers rope scaling variants).
    in_kernel_rotary = not gpt2 and head_dim % 16 == 0
    if not gpt2:
        rotary = model.model.rotary_emb
        positions = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(positions, rotary.inv_freq.to(torch.float32))
        scaling = float(getattr(rotary, "attention_scaling", 1.0))
        cos = weight("rotary.cos", (freqs.cos() * scaling).numpy())
        sin = weight("rotary.sin", (freqs.sin() * scaling).numpy())
        if not in_kernel_rotary:
            # GroupQueryAttention rotates heads of a multiple of 16 only: smaller ones are rotated
            # here (rotate-half, as transformers' Llama), with the tables gathered per position.
            half = head_dim // 2
            const("axis2", [2])
            for kind, table in (("cos", cos), ("sin", sin)):
                node("Gather", [table, "positions"], f"rot_{kind}_half")
                node("Concat", [f"rot_{kind}_half", f"rot_{kind}_half"], f"rot_{kind}_full", axis=-1)
                node("Unsqueeze", [f"rot_{kind}_full", "axis2"], f"rot_{kind}")  # (b, s, 1, d)
            const("rot_lo", [0])
            const("rot_mid", [half])
            const("rot_hi", [head_dim])
            const("axis_last", [-1])

    def rotate(x: str, n_heads: int, out: str) -> str:
        if in_kernel_rotary or gpt2:
            return x
        split = node("Reshape", [x, const(f"{out}_shape4", [0, 0, n_heads, head_dim])], f"{out}_4d")
        x1 = node("Slice", [split, "rot_lo", "rot_mid", "axis_last"], f"{out}_x1")
        x2 = node("Slice", [split, "rot_mid", "rot_hi", "axis_last"], f"{out}_x2")
        turned = node("Concat", [node("Neg", [x2], f"{out}_nx2"), x1], f"{out}_turned", axis=-1)
        cos_part = node("Mul", [split, "rot_cos"], f"{out}_c")
        mixed = node("Add", [cos_part, node("Mul", [turned, "rot_sin"], f"{out}_s")], f"{out}_r")
        return node("Reshape", [mixed, const(f"{out}_shape3", [0, 0, n_heads * head_dim])], out)

    cache_shape: list[Any] = ["batch", kv_heads, "cache_length", head_dim]
    graph_inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_index", TensorProto.INT64, ["rows"]),
    ]
    graph_outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["rows", int(config.vocab_size)])]

    def attention(i: int, qkv: str) -> str:
        """Attention over ``qkv``, the query, key and value projections side by side (one
        MatMul): packed into GroupQueryAttention as they are where the kernel rotates (or
        nothing rotates), split for the graph's own rotation otherwise."""
        for kind in ("key", "value"):
            graph_inputs.append(helper.make_tensor_value_info(f"past_{kind}.{i}", TensorProto.FLOAT, cache_shape))
            graph_outputs.append(helper.make_tensor_value_info(f"present_{kind}.{i}", TensorProto.FLOAT, cache_shape))
        if in_kernel_rotary or gpt2:
            inputs = [qkv, "", ""]
        else:
            q, k, v = f"l{i}_q", f"l{i}_k", f"l{i}_v"
            widths = const("qkv_widths", [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
            nodes.append(helper.make_node("Split", [qkv, widths], [q, k, v], axis=-1))
            inputs = [rotate(q, heads, f"l{i}_qr"), rotate(k, kv_heads, f"l{i}_kr"), v]
        inputs += [f"past_key.{i}", f"past_value.{i}", "seqlens_k", "total_sequence_length"]
        if in_kernel_rotary:
            inputs += [cos, sin]
        nodes.append(
            helper.make_node(
                "GroupQueryAttention",
                inputs,
                [f"l{i}_attn", f"present_key.{i}", f"present_value.{i}"],
                domain="com.microsoft",
                num_heads=heads,
                kv_num_heads=kv_heads,
                scale=1.0 / math.sqrt(head_dim),
                do_rotary=int(in_kernel_rotary),
                rotary_interleaved=0,
            )
        )
        return f"l{i}_attn"

    if gpt2:
        embed = weight("embed_tokens", state["transformer.wte.weight"])
        node("Gather", [embed, "input_ids"], "tok_embeds")
        table = weight("embed_positions", state["transformer.wpe.weight"][:max_positions])
        node("Gather", [table, "positions"], "pos_embeds")
        x = node("Add", ["tok_embeds", "pos_embeds"], "x0")
        activation = GPT2_ACTIVATIONS[getattr(config, "activation_function", "gelu_new")]
        h = layer_norm(x, "transformer.h.0.ln_1", "l0_h")
        for i in range(layers):
            p = f"transformer.h.{i}"
            o = conv1d(attention(i, conv1d(h, f"{p}.attn.c_attn", f"l{i}_qkv")), f"{p}.attn.c_proj", f"l{i}_o")
            h2, r1 = skip_norm(x, o, f"{p}.ln_2", f"l{i}_h2", f"l{i}_r1")
            act = node(activation, [conv1d(h2, f"{p}.mlp.c_fc", f"l{i}_fc")], f"l{i}_act", domain="com.microsoft")
            d = conv1d(act, f"{p}.mlp.c_proj", f"l{i}_d")
            if i + 1 < layers:
                h, x = skip_norm(r1, d, f"transformer.h.{i + 1}.ln_1", f"l{i + 1}_h", f"l{i}_out")
            else:
                x = node("Add", [r1, d], f"l{i}_out")
        head_weight = state.get("lm_head.weight")
        tied = head_weight is None or np.array_equal(head_weight, state["transformer.wte.weight"])
    else:
        embed = weight("embed_tokens", state["model.embed_tokens.weight"])
        x = node("Gather", [embed, "input_ids"], "x0")
        h = rms_norm(x, "model.layers.0.input_layernorm", "l0_h")
        for i in range(layers):
            p = f"model.layers.{i}"
            qkv = linears(h, [f"{p}.self_attn.{n}_proj" for n in "qkv"], f"l{i}_qkv")
            o = linear(attention(i, qkv), f"{p}.self_attn.o_proj", f"l{i}_o")
            h2, r1 = skip_norm(x, o, f"{p}.post_attention_layernorm", f"l{i}_h2", f"l{i}_r1")
            gate_up = linears(h2, [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"], f"l{i}_gu")
            g, u = f"l{i}_g", f"l{i}_u"
            widths = const("gate_up_widths", [int(config.intermediate_size)] * 2)
            nodes.append(helper.make_node("Split", [gate_up, widths], [g, u], axis=-1))
            silu = node("Mul", [g, node("Sigmoid", [g], f"l{i}_gs")], f"l{i}_silu")
            d = linear(node("Mul", [silu, u], f"l{i}_m"), f"{p}.mlp.down_proj", f"l{i}_d")
            if i + 1 < layers:
                h, x = skip_norm(r1, d, f"model.layers.{i + 1}.input_layernorm", f"l{i + 1}_h", f"l{i}_out")
            else:
                x = node("Add", [r1, d], f"l{i}_out")
        head_weight = state.get("lm_head.weight")
        tied = head_weight is None or bool(config.tie_word_embeddings)
    # Only the positions logits_index names reach the norm and the vocabulary projection.
    node("Reshape", [x, const("flat_shape", [-1, hidden])], "x_flat")
    node("Gather", ["x_flat", "logits_index"], "x_last", axis=0)
    if gpt2:
        final = layer_norm("x_last", "transformer.ln_f", "x_normed")
    else:
        final = rms_norm("x_last", "model.norm", "x_normed")
    head_name = embed if tied or head_weight is None else weight("lm_head", head_weight)
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

