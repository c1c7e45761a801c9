"""sentence-transformers folders (modules.json + 1_Pooling/config.json) exported with the
pooling and normalization inside the graph, so the served output is the embedding."""

# transformers' factories are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.exporters.errors import ExportError, UsageError
from taskserve.exporters.graph_io import serving_specs
from taskserve.exporters.optimize import transformer_shape
from taskserve.exporters.quiet import quiet
from taskserve.exporters.sources.text_samples import TEXT_KEYS, tokenized_batches
from taskserve.exporters.spec import ExportedModel, ValidationCase

# sentence-transformers' pooling flags, in the order it concatenates them.
POOLING_FLAGS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
}
DEFAULT_MAX_BATCH = 64


@dataclass(frozen=True)
class StLayout:
    transformer_dir: Path
    pooling: tuple[str, ...]
    normalize: bool
    max_length: int | None


def read_layout(directory: Path) -> StLayout:
    """Parse modules.json; refuse module types whose math would not be in the graph."""
    if not directory.is_dir():
        raise UsageError(f"model directory {directory} does not exist")
    modules_file = directory / "modules.json"
    if not modules_file.is_file():
        raise UsageError(f"{directory} is not a sentence-transformers folder (no modules.json)")
    transformer_dir: Path | None = None
    pooling: tuple[str, ...] = ()
    normalize = False
    for module in json.loads(modules_file.read_text()):
        kind = module["type"].rsplit(".", 1)[-1]
        path = directory / module.get("path", "")
        if kind == "Transformer":
            transformer_dir = path
        elif kind == "Pooling":
            cfg = json.loads((path / "config.json").read_text())
            if cfg.get("pooling_mode_weightedmean_tokens"):
                raise ExportError("weighted-mean pooling is not supported by the exporter")
            pooling = tuple(mode for flag, mode in POOLING_FLAGS.items() if cfg.get(flag))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ExportError(
                f"sentence-transformers module {module['type']} is not supported (only Transformer, "
                "Pooling, Normalize)"
            )
    if transformer_dir is None or not pooling:
        raise ExportError(f"{modules_file}: needs a Transformer and a Pooling module")
    st_config = directory / "sentence_bert_config.json"
    max_length = json.loads(st_config.read_text()).get("max_seq_length") if st_config.is_file() else None
    return StLayout(transformer_dir, pooling, normalize, max_length)


def _embedding_module(encoder: Any, pooling: tuple[str, ...], normalize: bool, token_embeddings: bool) -> Any:
    import torch

    class SentenceEmbedding(torch.nn.Module):
        """Encoder + the pooling/normalization sentence-transformers applies after it."""

        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, input_ids: Any, attention_mask: Any, token_type_ids: Any = None) -> Any:
            kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
            tokens = self.encoder(
                input_ids=input_ids, attention_mask=attention_mask, **kwargs
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            lengths = mask.sum(1).clamp(min=1e-9)
            parts = []
            for mode in pooling:
                if mode == "cls":
                    parts.append(tokens[:, 0])
                elif mode == "max":
                    parts.append(
                        torch.where(mask > 0, tokens, torch.full_like(tokens, -1e9)).max(dim=1).values
                    )
                elif mode == "mean":
                    parts.append((tokens * mask).sum(1) / lengths)
                elif mode == "mean_sqrt_len":
                    parts.append((tokens * mask).sum(1) / lengths.sqrt())
                else:  # lasttoken, right padding
                    last = (attention_mask.sum(1) - 1).clamp(min=0)
                    parts.append(tokens[torch.arange(tokens.shape[0]), last])
            embedding = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            if normalize:
                embedding = torch.nn.functional.normalize(embedding, p=2.0, dim=1)
            return (embedding, tokens) if token_embeddings else embedding

    return SentenceEmbedding().eval()


def export_sentence_transformer(
    directory: Path, work: Path, *, token_embeddings: bool = False, opset: int = 17
) -> ExportedModel:
    import torch
    from transformers import AutoModel, AutoTokenizer

    layout = read_layout(directory)
    if not (layout.transformer_dir / "tokenizer.json").is_file():
        raise ExportError(
            f"{layout.transformer_dir} has no tokenizer.json, which the server needs to tokenize"
        )
    with quiet():
        encoder = AutoModel.from_pretrained(layout.transformer_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(layout.transformer_dir)
    max_length = min(layout.max_length or 512, _model_limit(encoder.config, tokenizer))
    wrapper = _embedding_module(encoder, layout.pooling, layout.normalize, token_embeddings)
    batches = tokenized_batches(tokenizer, "sentence-embedding", max_length)
    input_names = [k for k in TEXT_KEYS if k in batches[0]]
    output_names = ["sentence_embedding"] + (["token_embeddings"] if token_embeddings else [])
    axes: dict[str, dict[int, str]] = {k: {0: "batch", 1: "sequence"} for k in input_names}
    axes["sentence_embedding"] = {0: "batch"}
    if token_embeddings:
        axes["token_embeddings"] = {0: "batch", 1: "sequence"}

    onnx_dir = work / "onnx"
    onnx_dir.mkdir(parents=True)
    example = tuple(torch.from_numpy(batches[0][k]) for k in input_names)
    with quiet(), torch.inference_mode():
        torch.onnx.export(
            wrapper,
            example,
            str(onnx_dir / "model.onnx"),
            input_names=input_names,
            output_names=output_names,
            dynamic_axes=axes,
            opset_version=opset,
            dynamo=False,
        )
    reference, reference_kind = _reference(directory, wrapper, input_names, token_embeddings)
    cases = [
        ValidationCase("model.onnx", {k: b[k] for k in input_names}, reference(b), f"sentences#{i}")
        for i, b in enumerate(batches)
    ]
    pad = {"input_ids": float(tokenizer.pad_token_id or 0)}
    width = int(
        cases[0].expected["sentence_embedding"].shape[-1]
    )  # the tracer loses it through cat/normalize
    inputs, outputs = serving_specs(
        onnx_dir / "model.onnx", batched=True, pad_values=pad, fixed_dims={"sentence_embedding": (width,)}
    )
    extra = {
        n: layout.transformer_dir / n
        for n in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
        if (layout.transformer_dir / n).is_file()
    }
    config = encoder.config
    from taskserve.exporters.torch_entry import sentence_transformer_entry

    return ExportedModel(
        work_dir=onnx_dir,
        task="sentence-embedding",
        onnx_files=["model.onnx"],
        cases=cases,
        inputs=inputs,
        outputs=outputs,
        max_batch_size=DEFAULT_MAX_BATCH,
        task_options={
            "tokenizer": "tokenizer.json",
            "max_length": max_length,
            "pooling": "+".join(layout.pooling),
            "normalize": layout.normalize,
            "pooled_in_graph": True,
            "embedding_output": "sentence_embedding",
        },
        extra_files=extra,
        transformer=transformer_shape(config.model_type, config.num_attention_heads, config.hidden_size),
        source={
            "kind": "sentence-transformers",
            "model": str(directory),
            "reference": reference_kind,
            "model_type": config.model_type,
        },
        torch_entry=sentence_transformer_entry(encoder, layout.pooling, layout.normalize),
    )


def _model_limit(config: Any, tokenizer: Any) -> int:
    limits = [getattr(config, "max_position_embeddings", 512)]
    if tokenizer.model_max_length < 1_000_000:
        limits.append(tokenizer.model_max_length)
    return int(min(limits))


def _reference(
    directory: Path, wrapper: Any, input_names: list[str], token_embeddings: bool
) -> tuple[Any, str]:
    """The sentence-transformers library itself when installed (it checks our pooling),
    otherwise the PyTorch wrapper (it checks the export only)."""
    import torch

    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        st = None
    else:
        with quiet():
            st = SentenceTransformer(str(directory), device="cpu").eval()

    def run(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        features = {k: torch.from_numpy(batch[k]) for k in input_names}
        with torch.inference_mode():
            if st is not None:
                out = st(dict(features))
                result = {"sentence_embedding": out["sentence_embedding"].numpy()}
                if token_embeddings:
                    result["token_embeddings"] = out["token_embeddings"].numpy()
                return result
            got = wrapper(*features.values())
            got = got if isinstance(got, tuple) else (got,)
            names = ["sentence_embedding", "token_embeddings"][: len(got)]
            return {n: t.numpy() for n, t in zip(names, got, strict=True)}

    return run, "sentence-transformers" if st is not None else "pytorch wrapper"
