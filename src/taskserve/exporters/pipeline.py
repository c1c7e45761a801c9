"""The export pipeline every source goes through:
export -> validate -> optimize -> [quantize | fp16] -> [tensorrt] -> write entry."""

from __future__ import annotations

import re
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, TypeVar

import numpy as np

from taskserve.exporters import decoder_quality
from taskserve.exporters import tensorrt as trt_build
from taskserve.exporters.entry_config import ENGINE_FILE, LABELS_FILE, build_config, encoder_config
from taskserve.exporters.errors import ExportError, UsageError, ValidationFailed
from taskserve.exporters.fp16 import convert_fp16
from taskserve.exporters.optimize import optimize_file
from taskserve.exporters.progress import Steps
from taskserve.exporters.quantize import AccuracyChange, accuracy_change, accuracy_summary, quantize_int8
from taskserve.exporters.repository_entry import check_writable, write_entry
from taskserve.exporters.sources.hf import ENCODER_FILE
from taskserve.exporters.spec import ExportedModel
from taskserve.exporters.tasks import TOLERANCES
from taskserve.exporters.torch_entry import check_torch_entry, write_torch_files
from taskserve.exporters.validate import OutputDiff, run_cases, validate, worst
from taskserve.exporters.weight_quantize import BITS as WEIGHT_BITS
from taskserve.exporters.weight_quantize import BLOCK_SIZE as WEIGHT_BLOCK
from taskserve.exporters.weight_quantize import quantize_weights

Source = Callable[[Path], ExportedModel]
T = TypeVar("T")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ExportOptions:
    out: Path
    name: str
    version: int = 1
    # None: the source's default (0 for models without a shared batch dim).
    max_batch_size: int | None = None
    max_queue_delay_us: int = 2000
    # Sequence-length bucket edges for the batcher (text models): short requests
    # then never pay for long ones' padding.
    length_buckets: tuple[int, ...] = ()
    # Runtime instances side by side (config instance_count); each gets cores / N threads.
    instance_count: int = 1
    # CPU: a batch that computes alone runs on a session with every core (runtime.wide_when_alone).
    wide_when_alone: bool = False
    optimize: bool = True
    quantize: str | None = None  # "int8"
    # Weight-only blockwise quantization (weight_quantize.py): "int4" or "int8".
    weights: str | None = None
    # --weights on an engine decoder: how much the quality check against float32 computes, and
    # what it must meet (None: decoder_quality.TOLERANCES[weights]).
    quality_plan: decoder_quality.QualityPlan = field(default_factory=decoder_quality.QualityPlan)
    quality_tolerance: decoder_quality.QualityTolerance | None = None
    # Write the entry (with a warning and the misses in export-info.json) when it misses the tolerance.
    allow_quality_loss: bool = False
    fp16: bool = False
    tensorrt: bool = False
    trt_workspace_mb: int = 2048
    # "onnx" (model.onnx for onnxruntime) or "torch" (safetensors for the PyTorch runtime).
    format: str = "onnx"
    # Override of the per-task tolerance for the max abs difference.
    atol: float | None = None
    progress: bool = True
    stream: TextIO | None = None
    # Extra facts recorded in export-info.json (e.g. which demo recipe built the entry).
    tags: Mapping[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        if not _NAME.match(self.name):
            raise UsageError(f"invalid model name {self.name!r}: use letters, digits, '_', '.', '-'")
        if self.version < 1:
            raise UsageError(f"--version must be a positive integer, got {self.version}")
        if self.quantize not in (None, "int8"):
            raise UsageError(f"unknown quantization {self.quantize!r}; the supported mode is 'int8'")
        if self.quantize and (self.fp16 or self.tensorrt):
            raise UsageError("--quantize int8 targets CPU; it cannot be combined with --fp16 or --tensorrt")
        if self.weights not in (None, *WEIGHT_BITS):
            raise UsageError(f"unknown --weights {self.weights!r}; use one of {sorted(WEIGHT_BITS)}")
        if self.weights and (self.quantize or self.fp16 or self.tensorrt or self.format == "torch"):
            raise UsageError(
                f"--weights {self.weights} quantizes an ONNX entry's weights for the CPU; it cannot be combined "
                "with --quantize, --fp16, --tensorrt or --format torch"
            )
        if self.max_batch_size is not None and self.max_batch_size < 0:
            raise UsageError("--max-batch-size must be >= 0")
        if self.format not in ("onnx", "torch"):
            raise UsageError(f"unknown --format {self.format!r}; use 'onnx' or 'torch'")
        if self.format == "torch" and (self.quantize or self.fp16 or self.tensorrt):
            raise UsageError(
                "--format torch cannot be combined with --quantize, --fp16 or --tensorrt: torch entries run "
                "fp16 on CUDA and fp32 on the CPU by themselves (runtime.torch.dtype)"
            )
        if self.instance_count < 1:
            raise UsageError(f"--instances must be >= 1, got {self.instance_count}")


@dataclass
class ExportResult:
    entry: Path
    task: str
    config: dict[str, Any]
    diffs: list[OutputDiff] = field(default_factory=list)
    accuracy: list[AccuracyChange] = field(default_factory=list)
    summary: str = ""
    # --weights on an engine decoder: the quality check against float32 (decoder_quality.py).
    quality: dict[str, Any] | None = None
    quality_table: str = ""


def _native_engines() -> bool:
    """Whether --tensorrt writes native engines (platform: tensorrt). Only once the server's
    TensorRT runtime has run on a GPU; until then --tensorrt writes an onnxruntime entry
    with the TensorRT execution provider, which builds and caches its engines itself."""
    from taskserve.server.runtimes.tensorrt import NATIVE_RUNTIME_VERIFIED

    return NATIVE_RUNTIME_VERIFIED


def _step_names(options: ExportOptions) -> list[str]:
    if options.format == "torch":
        return ["export", "validate", "torch", "write"]
    names = ["export", "validate", "optimize"]
    if options.quantize:
        names.append("quantize")
    if options.weights:
        names.append("weights")
    if options.fp16 and not options.tensorrt:
        names.append("fp16")
    if options.tensorrt and _native_engines():
        names.append("tensorrt")
    return names + ["write"]


def _resolve_batch(exported: ExportedModel, requested: int | None) -> int:
    if requested is None:
        return exported.max_batch_size
    if exported.max_batch_size == 0 and requested != 0:
        raise UsageError(
            f"this {exported.task} model has no shared batch dimension; --max-batch-size must be 0"
        )
    if exported.max_batch_size > 0 and requested == 0:
        raise UsageError("--max-batch-size 0 would serve a batched model without its batch dim; use >= 1")
    return requested


def _stage(src_dir: Path, dst_dir: Path, files: list[str], convert: Callable[[Path, Path], T]) -> list[T]:
    dst_dir.mkdir(parents=True, exist_ok=True)
    return [convert(src_dir / f, dst_dir / f) for f in files]


def run_export(source: Source, options: ExportOptions, description: str) -> ExportResult:
    """Run every step; on any failure nothing is written and the error propagates."""
    options.check()
    check_writable(options.out)
    if options.tensorrt and _native_engines():
        trt_build.require_tensorrt()  # fail before minutes of export work
    stream = options.stream or sys.stderr
    steps = Steps(f"{options.name}", _step_names(options), stream=stream, enabled=options.progress)
    result: ExportResult | None = None
    try:
        with tempfile.TemporaryDirectory(prefix="taskserve-export-") as tmp:
            result = _run(source, options, description, steps, Path(tmp))
    finally:
        steps.close()
        summary = steps.summary()
        if options.progress:
            print(summary, file=stream)
            if result is not None and result.quality_table:
                print(f"--weights {options.weights} against float32:\n{result.quality_table}", file=stream)
    if result is not None and result.quality and result.quality["misses"]:
        # --allow-quality-loss wrote it: said even under --quiet.
        print(
            f"WARNING: --weights {options.weights} missed the quality tolerance and was written anyway "
            f"(--allow-quality-loss): {'; '.join(result.quality['misses'])}",
            file=stream,
        )
    assert result is not None  # reached only when _run returned
    result.summary = summary
    return result


def _run(source: Source, options: ExportOptions, description: str, steps: Steps, work: Path) -> ExportResult:
    with steps.step("export") as rec:
        exported = source(work / "export")
        rec.detail = f"{description} -> {exported.task}: {', '.join(exported.onnx_files)}"
    if exported.task == "text-generation" and exported.generation is None:
        # The server runs text-generation on the generation engine only (its own decoder graph).
        raise UsageError(
            "text-generation models run on the generation engine, which needs the decoder graph "
            "taskserve-export writes from a transformers model: `taskserve-export hf MODEL_DIR --task "
            "text-generation --out REPOSITORY --name NAME` (docs/generation.md)"
        )
    if exported.generation is not None:
        if exported.task == "text-generation" and (options.quantize or options.fp16 or options.tensorrt):
            # Untested with the in-place cache binding; refused rather than written and unservable.
            raise UsageError(
                "the generation engine's graph takes float32 or --weights int4|int8 only; drop --quantize, "
                "--fp16 and --tensorrt"
            )
        # The engine batches sequences itself: --max-batch-size sets how many decode together.
        if options.max_batch_size:
            exported.generation["max_num_seqs"] = options.max_batch_size
            budget = exported.generation["max_num_batched_tokens"]
            exported.generation["max_num_batched_tokens"] = max(budget, options.max_batch_size)
        max_batch = 0
    else:
        max_batch = _resolve_batch(exported, options.max_batch_size)
    tolerance = options.atol if options.atol is not None else TOLERANCES[exported.task]
    files, cases = exported.onnx_files, exported.cases

    with steps.step("validate") as rec:
        diffs = validate(exported.work_dir, cases, tolerance, "the exported ONNX graph")
        rec.detail = worst(diffs)
    current = exported.work_dir
    if options.format == "torch":
        return _write_torch(exported, options, description, steps, work, max_batch, tolerance, diffs)

    if options.optimize and options.tensorrt:
        # TensorRT cannot parse onnxruntime's fused contrib ops (Attention,
        # SkipLayerNormalization) and does its own fusions.
        steps.skip("optimize", "--tensorrt: TensorRT fuses the plain graph itself")
    elif options.optimize:
        with steps.step("optimize") as rec:
            notes = _stage(
                current, work / "optimized", files, lambda s, d: optimize_file(s, d, exported.transformer)
            )
            try:
                validate(work / "optimized", cases, tolerance, "the optimized graph")
                current = work / "optimized"
                rec.detail = "; ".join(str(n) for n in notes)
            except ValidationFailed as err:
                rec.detail = (
                    f"kept the unoptimized graph: optimized outputs differ ({str(err).splitlines()[0]})"
                )
    else:
        steps.skip("optimize", "--no-optimize")
    fp32_outputs: list[dict[str, np.ndarray]] | None = None
    accuracy: list[AccuracyChange] = []
    quality: dict[str, Any] | None = None
    quality_table = ""

    if options.quantize:
        with steps.step("quantize") as rec:
            counts = _stage(current, work / "int8", files, quantize_int8)
            fp32_outputs = run_cases(current, cases)
            accuracy = accuracy_change(fp32_outputs, run_cases(work / "int8", cases))
            current = work / "int8"
            nodes = sum(counts)
            rec.detail = f"int8 dynamic, {nodes} nodes; vs fp32: {accuracy_summary(accuracy)}"

    if options.weights:
        with steps.step("weights") as rec:
            mode = options.weights
            counts = _stage(current, work / mode, files, lambda s, d: quantize_weights(s, d, mode))
            fp32_outputs = run_cases(current, cases)
            accuracy = accuracy_change(fp32_outputs, run_cases(work / mode, cases))
            rec.detail = (
                f"{mode} weights (MatMulNBits, blocks of {WEIGHT_BLOCK}), {sum(counts)} nodes; "
                f"vs fp32: {accuracy_summary(accuracy)}"
            )
            if exported.generation is not None and exported.task == "text-generation":
                quality, quality_table = decoder_quality.check_export(
                    exported, options.name, mode, current, work / mode, options.quality_plan, options.quality_tolerance,
                    options.allow_quality_loss,
                )  # fmt: skip
                rec.detail += (
                    f"; greedy {quality['prefix_matches']}/{quality['prompts']} prompts equal over "
                    f"{min(quality['tolerance']['prefix_tokens'], quality['new_tokens'])} tokens, "
                    f"perplexity {quality['perplexity_increase']:+.2%}"
                )
            current = work / mode

    if options.fp16 and not options.tensorrt:
        with steps.step("fp16") as rec:
            _stage(current, work / "fp16", files, convert_fp16)
            fp32_outputs = run_cases(current, cases)
            current = work / "fp16"
            try:
                accuracy = accuracy_change(fp32_outputs, run_cases(current, cases))
                rec.detail = f"vs fp32 on CPU: {accuracy_summary(accuracy)}"
            except Exception as err:  # onnxruntime CPU lacks fp16 kernels for some ops
                rec.detail = f"not checked on CPU ({type(err).__name__}: {str(err).splitlines()[0][:80]})"

    version_files = {p.name: p for p in sorted(current.iterdir()) if p.is_file()}
    native = options.tensorrt and _native_engines()
    if native:
        with steps.step("tensorrt") as rec:
            if exported.inputs is None or len(files) != 1:
                raise ExportError("--tensorrt supports single-file models with declared inputs")
            max_length = int(exported.task_options.get("max_length", 512))
            profile = trt_build.derive_profile(exported.inputs, max_batch, max_length, min(128, max_length))
            start = time.perf_counter()
            # The plain export, not the optimized graph: TensorRT cannot parse onnxruntime's
            # fused contrib ops (Attention, SkipLayerNormalization) and does its own fusions.
            engine = trt_build.build_engine(
                exported.work_dir / files[0],
                profile,
                options.fp16,
                options.trt_workspace_mb,
                trt_build.cache_dir(),
            )
            version_files[ENGINE_FILE] = engine
            precision = "fp16" if options.fp16 else "fp32"
            rec.detail = f"{precision} engine in {time.perf_counter() - start:.0f}s, cache {engine}"

    with steps.step("write") as rec:
        config = build_config(
            exported,
            options.name,
            max_batch,
            options.max_queue_delay_us,
            length_buckets=options.length_buckets,
            instance_count=options.instance_count,
            wide_when_alone=options.wide_when_alone,
            int8=bool(options.quantize or options.weights),
            fp16=options.fp16,
            tensorrt=options.tensorrt,
            native_engine=native,
        )
        model_files = _model_files(exported, work)
        info = {
            "source": exported.source,
            "description": description,
            "options": {
                "optimize": options.optimize,
                "quantize": options.quantize,
                "weights": options.weights,
                "fp16": options.fp16,
                "tensorrt": options.tensorrt,
                "max_batch_size": max_batch,
            },
            "validation": {"tolerance": tolerance, "max_abs_diff": max(d.max_abs_diff for d in diffs)},
            "accuracy": [vars(a) for a in accuracy],
            **({"quality": quality} if quality is not None else {}),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tags": dict(options.tags),
        }
        if exported.task == "text2text-generation":
            encoder_name = f"{options.name}-encoder"
            config["task_options"]["encoder_model"] = encoder_name
            write_entry(
                options.out, encoder_name, options.version, encoder_config(encoder_name),
                {"model.onnx": version_files.pop(ENCODER_FILE)}, {}, {**info, "part_of": options.name},
            )  # fmt: skip
        entry = write_entry(
            options.out, options.name, options.version, config, version_files, model_files, info
        )
        rec.detail = str(entry)
    return ExportResult(entry, exported.task, config, diffs, accuracy, quality=quality, quality_table=quality_table)



def _model_files(exported: ExportedModel, work: Path) -> dict[str, Path]:
    model_files = dict(exported.extra_files)
    if exported.labels:
        labels_path = work / LABELS_FILE
        labels_path.write_text("\n".join(exported.labels) + "\n")
        model_files[LABELS_FILE] = labels_path
    return model_files


def _write_torch(
    exported: ExportedModel,
    options: ExportOptions,
    description: str,
    steps: Steps,
    work: Path,
    max_batch: int,
    tolerance: float,
    diffs: list[OutputDiff],
) -> ExportResult:
    """--format torch: safetensors + config files, checked through the server's TorchRuntime."""
    config = build_config(
        exported,
        options.name,
        max_batch,
        options.max_queue_delay_us,
        length_buckets=options.length_buckets,
        instance_count=options.instance_count,
        platform="torch",
    )
    with steps.step("torch") as rec:
        version_dir = work / "torch"
        version_files = write_torch_files(exported, version_dir)
        worst_diff = check_torch_entry(config, version_dir, exported, tolerance)
        rec.detail = f"{len(version_files)} files; server TorchRuntime (CPU fp32) vs source: {worst_diff:.2e}"
    with steps.step("write") as rec:
        info = {
            "source": exported.source,
            "description": description,
            "options": {"format": "torch", "max_batch_size": max_batch},
            "validation": {
                "tolerance": tolerance,
                "max_abs_diff": max(d.max_abs_diff for d in diffs),
                "torch_entry_max_abs_diff": worst_diff,
            },
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "tags": dict(options.tags),
        }
        entry = write_entry(
            options.out, options.name, options.version, config, version_files, _model_files(exported, work), info
        )
        rec.detail = str(entry)
    return ExportResult(entry, exported.task, config, diffs)
