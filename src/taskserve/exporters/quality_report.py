"""``python -m taskserve.exporters.quality_report OUT ENTRY...``: the ``--weights`` quality checks
of exported entries (their ``export-info.json`` ``quality`` blocks) side by side, written as
``OUT.json`` and ``OUT.md`` (benchmarks/results/quantization-*). Quality only: no timings."""

from __future__ import annotations

import argparse
import json
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import onnxruntime


def _cpu() -> tuple[str, list[str]]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return "unknown CPU", []
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile")
    return name, [f for f in wanted if f in flags]


def _commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + (" (src modified)" if dirty.strip() else "")


def collect(entries: Sequence[Path]) -> dict[str, Any]:
    cpu, features = _cpu()
    found: dict[str, Any] = {}
    for entry in entries:
        info = json.loads((entry / "export-info.json").read_text(encoding="utf-8"))
        if "quality" not in info:
            raise SystemExit(f"{entry}: export-info.json has no quality block (export it with --weights)")
        found[str(info["options"]["weights"])] = {"entry": entry.name, **info["quality"]}
    return {"commit": _commit(), "cpu": cpu, "cpu_features": features, "onnxruntime": onnxruntime.__version__,
            "note": "quality only: these numbers do not depend on load; no timings", "weights": found}  # fmt: skip


def markdown(data: dict[str, Any], title: str, commands: Sequence[str]) -> str:
    modes = data["weights"]
    first = next(iter(modes.values()))
    prefix = min(first["tolerance"]["prefix_tokens"], first["new_tokens"])

    def row(name: str, ref: object, key: Any) -> str:
        return f"| {name} | {ref} | " + " | ".join(str(key(q)) for q in modes.values()) + " |"

    lines = [
        f"# {title}", "",
        f"Report written at commit `{data['commit']}`, {data['cpu']} "
        f"({', '.join(data['cpu_features'])}), onnxruntime "
        f"{data['onnxruntime']}. Each quantized graph against the float32 graph of the same export, both run "
        "through the server's engine runner; definitions in docs/export.md (\"Quality check\"). Quality only: "
        "no timings.", "",
        "| measure | float32 | " + " | ".join(modes) + " |",
        "|---|---|" + "---|" * len(modes),
        row(f"prompts equal over the first {prefix} tokens", first["prompts"], lambda q: q["prefix_matches"]),
        row(f"prompts equal over all {first['new_tokens']} tokens", first["prompts"], lambda q: q["full_matches"]),
        row(f"mean agreed prefix (fraction of {first['new_tokens']})", 1, lambda q: f"{q['mean_agreement']:.3f}"),
        row(f"perplexity ({first['text_tokens']} tokens)", f"{first['reference_perplexity']:.4f}",
            lambda q: f"{q['perplexity']:.4f} ({q['perplexity_increase']:+.2%})"),
        row("teacher-forced top-1 agreement on the text", 1, lambda q: f"{q['top1_agreement']:.3f}"),
        row("agreed prefix per prompt", f"{first['new_tokens']} each", lambda q: " ".join(map(str, q["agreed"]))),
        "",
    ]  # fmt: skip
    for mode, quality in modes.items():
        tol = quality["tolerance"]
        verdict = "meets it" if not quality["misses"] else "misses it: " + "; ".join(quality["misses"])
        lines.append(
            f"- {mode}, tolerance perplexity <= {tol['max_perplexity_increase']:+.0%} and >= "
            f"{tol['min_prefix_share']:.0%} of prompts equal over their first {tol['prefix_tokens']} tokens: {verdict}"
        )
    if commands:
        lines += ["", "Commands:", "", "```sh", *commands, "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m taskserve.exporters.quality_report", description=__doc__)
    p.add_argument("out", type=Path, help="path without suffix: OUT.json and OUT.md are written")
    p.add_argument("entries", type=Path, nargs="+", help="entries exported with --weights")
    p.add_argument("--title", default="Weight-only quantization quality")
    p.add_argument("--command", action="append", default=[], help="a command that made the entries (repeatable)")
    args = p.parse_args(argv)
    data = collect(args.entries)
    data["commands"] = args.command
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_name(args.out.name + ".json").write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    args.out.with_name(args.out.name + ".md").write_text(markdown(data, args.title, args.command), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
