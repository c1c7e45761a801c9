"""Wrappers that give a transformers model the outputs a torch entry serves: sentence
embeddings with sentence-transformers' pooling, a head's output attributes, one KV-cache
decoder step with the ONNX decoder's tensor names, or one named output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


class SentenceEmbedding(nn.Module):
    """A transformers encoder plus the pooling/normalization sentence-transformers applies."""

    def __init__(self, encoder: nn.Module, pooling: tuple[str, ...], normalize: bool) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.normalize = normalize

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        tokens = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
        lengths = mask.sum(1).clamp(min=1e-9)
        parts = []
        for mode in self.pooling:
            if mode == "cls":
                parts.append(tokens[:, 0])
            elif mode == "max":
                parts.append(torch.where(mask > 0, tokens, torch.full_like(tokens, -1e4)).max(dim=1).values)
            elif mode == "mean":
                parts.append((tokens * mask).sum(1) / lengths)
            elif mode == "mean_sqrt_len":
                parts.append((tokens * mask).sum(1) / lengths.sqrt())
            else:  # lasttoken, right padding
                last = (attention_mask.sum(1) - 1).clamp(min=0)
                parts.append(tokens[torch.arange(tokens.shape[0], device=tokens.device), last])
        embedding = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if self.normalize:
            # In fp32: fp16 squares of a 384-wide vector lose the norm's low bits.
            embedding = F.normalize(embedding.float(), p=2.0, dim=1).to(tokens.dtype)
        return {"sentence_embedding": embedding, "token_embeddings": tokens}


class HeadOutputs(nn.Module):
    """A transformers model whose output attributes are the served outputs."""

    def __init__(self, model: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        out = self.model(**inputs)
        return {name: getattr(out, name) for name in self.names}


def _cache_layers(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(key, value) per layer of a transformers cache, across transformers versions."""
    layers = getattr(cache, "layers", None)
    if layers is not None and all(hasattr(layer, "keys") for layer in layers):
        return [(layer.keys, layer.values) for layer in layers]
    legacy = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
    return [(k, v) for k, v in legacy]


class CausalLMStep(nn.Module):
    """One step of a KV-cache decoder with the ONNX decoder's tensors: ``input_ids``,
    ``attention_mask`` (past + new), ``position_ids``, ``past_key_values.N.key/value`` in;
    ``logits`` and ``present.N.key/value`` out. The generation engine drives either alike."""

    def __init__(self, model: nn.Module, layers: int) -> None:
        super().__init__()
        self.model = model
        self.layers = layers

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        cache = None
        if self.layers and inputs["past_key_values.0.key"].shape[2] > 0:
            from transformers import DynamicCache

            cache = DynamicCache()
            for i in range(self.layers):
                cache.update(inputs[f"past_key_values.{i}.key"], inputs[f"past_key_values.{i}.value"], i)
        kwargs = {"position_ids": inputs["position_ids"]} if "position_ids" in inputs else {}
        out = self.model(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], past_key_values=cache,
            use_cache=True, **kwargs,
        )  # fmt: skip
        result = {"logits": out.logits}
        for i, (key, value) in enumerate(_cache_layers(out.past_key_values)):
            result[f"present.{i}.key"], result[f"present.{i}.value"] = key, value
        return result


class NamedOutput(nn.Module):
    def __init__(self, module: nn.Module, name: str) -> None:
        super().__init__()
        self.module = module
        self.name = name

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.name: self.module(*inputs.values())}
