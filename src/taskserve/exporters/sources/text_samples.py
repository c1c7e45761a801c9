"""Fixed sentences tokenized into validation inputs (padding included, so masks matter)."""

from __future__ import annotations

from typing import Any

import numpy as np

SENTENCES = (
    "The quick brown fox jumps over the lazy dog.",
    "A man is playing a guitar on a small stage in the park.",
    "How do I bake bread at home?",
    "Stock markets fell sharply on Monday after the central bank raised interest rates.",
    "The cat sat on the mat.",
    "Paris is the capital and most populous city of France.",
    "ONNX Runtime runs exported models quickly on CPUs and GPUs.",
    "I love this movie!",
)
QUESTIONS = ("Where did the cat sit?", "What is the capital of France?", "What fell on Monday?")
CONTEXTS = (SENTENCES[4], SENTENCES[5], SENTENCES[3])

TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def tokenized_batches(tokenizer: Any, task: str, max_length: int) -> list[dict[str, np.ndarray]]:
    """Two batches of different sizes and lengths: three padded texts, then one text."""
    length = min(max_length, 48)
    batches: list[tuple[list[str], list[str] | None]]
    if task == "question-answering":
        batches = [(list(QUESTIONS), list(CONTEXTS)), ([QUESTIONS[0]], [CONTEXTS[0]])]
    else:
        batches = [(list(SENTENCES[:3]), None), ([SENTENCES[6]], None)]
    out = []
    for first, second in batches:
        enc = tokenizer(first, second, padding=True, truncation=True, max_length=length, return_tensors="np")
        out.append({k: np.asarray(v, dtype=np.int64) for k, v in enc.items() if k in TEXT_KEYS})
    return out
