"""Test doubles for task-module tests: a word-piece tokenizer built in code, a
scheduler computing outputs with a Python function, and a served-model stand-in."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from taskserve.server.repository.config import ModelConfig
from taskserve.server.scheduling.base import InferRequest, InferResult, Scheduler

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "the", "cat", "sat", "on", "mat", "a", "dog", "ran", "in", "park", "paris", "is", "capital", "of", "france",
    "john", "smith", "lives", "new", "york", "what", "where", "who", "city", "big", "small", "red", "blue",
    "un", "##believ", "##able", "##s", "##ing", ".", ",", "?", "!",
]  # fmt: skip


def wordpiece_tokenizer(words: list[str] | None = None) -> Tokenizer:
    """A BERT-style uncased word-piece tokenizer over a small vocabulary."""
    vocab = {token: i for i, token in enumerate(SPECIALS + (words or WORDS))}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIALS)
    return tok


def write_tokenizer(model_dir: Path, max_length: int | None = None) -> Tokenizer:
    model_dir.mkdir(parents=True, exist_ok=True)
    tok = wordpiece_tokenizer()
    tok.save(str(model_dir / "tokenizer.json"))
    config: dict[str, Any] = {"mask_token": "[MASK]", "pad_token": "[PAD]"}
    if max_length is not None:
        config["model_max_length"] = max_length
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return tok


Outputs = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


class FakeScheduler(Scheduler):
    """Computes each request's outputs with ``fn`` and records the requests."""

    def __init__(self, fn: Outputs) -> None:
        self.fn = fn
        self.requests: list[InferRequest] = []

    async def start(self) -> None:
        return None

    async def submit(self, request: InferRequest) -> InferResult:
        self.requests.append(request)
        outputs = self.fn(request.inputs)
        if request.output_names is not None:
            outputs = {k: v for k, v in outputs.items() if k in request.output_names}
        return InferResult(outputs=outputs, batch_size=next(iter(request.inputs.values())).shape[0])

    def inflight_count(self) -> int:
        return 0

    async def stop(self, drain: bool = True) -> None:
        return None


@dataclass
class FakeModel:
    name: str
    config: ModelConfig
    model_dir: Path
    scheduler: FakeScheduler
    version: str = "1"
    engine: None = None  # the fakes run on the request batcher
    stages: list[str] = field(default_factory=list)


def fake_model(model_dir: Path, task: str, fn: Outputs, max_batch_size: int = 8, **config: Any) -> FakeModel:
    cfg = ModelConfig.model_validate(
        {"name": model_dir.name, "task": task, "max_batch_size": max_batch_size, **config}
    )
    return FakeModel(model_dir.name, cfg, model_dir, FakeScheduler(fn))
