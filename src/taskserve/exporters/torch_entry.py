"""Torch entries (``--format torch``): safetensors + config files the server's PyTorch
runtime (server/runtimes/torch_runtime.py) builds its module from.

The ONNX export still runs first: it gives the served inputs/outputs and the validation
cases, and the torch entry is then checked on those cases through the server's own
runtime (fp32, CPU) before anything is written.
"""

# transformers' factories are untyped.
# mypy: disable-error-code="no-untyped-call"

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from taskserve.exporters.errors import UsageError, ValidationFailed
from taskserve.exporters.spec import ExportedModel

# optimum task -> the transformers auto class the server rebuilds the model with.
AUTO_CLASS_FOR_TASK = {
    "feature-extraction": "AutoModel",
    "text-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
    "fill-mask": "AutoModelForMaskedLM",
    "image-classification": "AutoModelForImageClassification",
    # KV-cache decoders, with the ONNX decoder's step tensors (the generation engine's contract).
    "text-generation-with-past": "AutoModelForCausalLM",
}


@dataclass(frozen=True)
class TorchEntry:
    """What goes into the version directory: ``torch_model.json`` (``spec``) and ``files``."""

    spec: dict[str, Any]
    files: dict[str, Path]


TorchEntryWriter = Callable[[Path], TorchEntry]


def _saved_transformer(model: Any, work: Path) -> dict[str, Path]:
    work.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(work), safe_serialization=True)
    return {p.name: p for p in sorted(work.iterdir()) if p.is_file() and p.suffix in (".json", ".safetensors")}


def sentence_transformer_entry(encoder: Any, pooling: tuple[str, ...], normalize: bool) -> TorchEntryWriter:
    def write(work: Path) -> TorchEntry:
        spec = {"format": 1, "architecture": "sentence-transformer", "pooling": list(pooling), "normalize": normalize}
        return TorchEntry(spec, _saved_transformer(encoder, work))

    return write


def transformers_entry(model: Any, optimum_task: str) -> TorchEntryWriter | None:
    auto = AUTO_CLASS_FOR_TASK.get(optimum_task)
    if auto is None:
        return None

    def write(work: Path) -> TorchEntry:
        architecture = "causal-lm" if auto == "AutoModelForCausalLM" else "transformers"
        spec = {"format": 1, "architecture": architecture, "auto_class": auto}
        return TorchEntry(spec, _saved_transformer(model, work))

    return write


def efficientnet_entry(module: Any) -> TorchEntryWriter:
    def write(work: Path) -> TorchEntry:
        from safetensors.torch import save_file

        work.mkdir(parents=True, exist_ok=True)
        weights = work / "model.safetensors"
        save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(weights))
        spec = {
            "format": 1,
            "architecture": "efficientnet-lite0",
            "num_classes": int(module._fc.out_features),
            "image_size": 224,
        }
        return TorchEntry(spec, {weights.name: weights})

    return write


def module_entry(module: Any) -> TorchEntryWriter | None:
    """Torch entries for modules the server knows how to build (EfficientNet-Lite0)."""
    from taskserve.torch_modules.efficientnet_lite0 import EfficientNetLite0

    return efficientnet_entry(module) if isinstance(module, EfficientNetLite0) else None


def write_torch_files(exported: ExportedModel, work: Path) -> dict[str, Path]:
    """The version-directory files of the torch entry for ``exported``."""
    from taskserve.torch_modules.entry_format import SPEC_FILE

    if exported.torch_entry is None:
        raise UsageError(
            f"--format torch supports sentence-transformers folders, transformers models for "
            f"{', '.join(AUTO_CLASS_FOR_TASK)} and EfficientNet-Lite0; this {exported.task} model has no torch entry "
            "(export it as ONNX)"
        )
    if exported.generation is None and (exported.inputs is None or exported.outputs is None):
        raise UsageError("--format torch needs a model with declared inputs and outputs")
    entry = exported.torch_entry(work)
    for path in entry.files.values():
        path.chmod(0o644)  # safetensors writes owner-only files; the server may run as another user
    spec_path = work / SPEC_FILE
    spec_path.write_text(json.dumps(entry.spec, indent=2) + "\n")
    return {**entry.files, SPEC_FILE: spec_path}


def check_torch_entry(
    config: dict[str, Any], version_dir: Path, exported: ExportedModel, tolerance: float
) -> float:
    """Run the written files through the server's own torch code (fp32, CPU) on the export's
    validation cases: TorchRuntime, or for engine entries (a generation block) the engine's
    TorchDecoderRunner. Return the largest difference or raise ValidationFailed."""
    from taskserve.server.repository.config import parse_model_config
    from taskserve.server.runtimes.torch_runtime import TorchRuntime
    from taskserve.torch_modules.entry_format import SPEC_FILE

    checked = dict(config)
    checked["runtime"] = {**checked.get("runtime", {}), "torch": {"device": "cpu", "dtype": "fp32"}}
    model_config = parse_model_config(checked, Path(str(config["name"])) / "config.yaml", str(config["name"]))
    if model_config.generation is not None:
        return _check_engine_entry(model_config, version_dir / SPEC_FILE, exported, tolerance)
    runtime = TorchRuntime(version_dir / SPEC_FILE, model_config)
    runtime.load()
    worst = 0.0
    try:
        for case in exported.cases:
            if case.onnx_file != exported.onnx_files[0]:
                continue
            wanted = [n for n in case.expected if n in {t.name for t in exported.outputs or ()}]
            got = runtime.infer({k: np.asarray(v) for k, v in case.inputs.items()}, wanted)
            for name in wanted:
                worst = max(worst, _checked_diff(name, got[name], case.expected[name], tolerance, case.label))
    finally:
        runtime.close()
    return worst


def _check_engine_entry(config: Any, spec_path: Path, exported: ExportedModel, tolerance: float) -> float:
    """The engine graph's validation case (prompts from an empty cache, last-position logits),
    each prompt prefilled into its own slot of the server's TorchDecoderRunner."""
    from taskserve.server.runtimes.generation import StepRow
    from taskserve.server.runtimes.torch_decoder import TorchDecoderRunner

    runner = TorchDecoderRunner(spec_path, config)
    runner.load()
    worst = 0.0
    try:
        for case in exported.cases:
            prompts = np.asarray(case.inputs["input_ids"], np.int64)
            got = runner.step([StepRow(slot, ids, 0) for slot, ids in enumerate(prompts)])
            worst = max(worst, _checked_diff("logits", got, case.expected["logits"], tolerance, case.label))
            for slot in range(len(prompts)):
                runner.release(slot)
    finally:
        runner.close()
    return worst


def _checked_diff(name: str, got: np.ndarray, expected: Any, tolerance: float, label: str) -> float:
    """The largest difference of output ``name`` from the source model's; ValidationFailed past ``tolerance``."""
    diff = float(np.max(np.abs(np.asarray(got, np.float64) - np.asarray(expected, np.float64))))
    if not diff <= tolerance:
        raise ValidationFailed(
            f"the torch entry's output {name!r} differs from the source model by {diff:.3g} "
            f"(tolerance {tolerance:g}) on {label or 'a validation case'}"
        )
    return diff

