"""make bench: its plan regenerates every published result (or says which it supersedes)."""

from __future__ import annotations

from pathlib import Path

from taskserve.benchmarks.cli import build_parser
from taskserve.benchmarks.publish import GPU_PREFIX, RESULTS, SUPERSEDED, main, steps


def test_every_published_result_has_a_step_and_every_step_parses() -> None:
    plan = steps(Path("demo-models"))
    names = [s.name for s in plan]
    assert len(names) == len(set(names))
    published = {p.stem for p in RESULTS.glob("*.json") if not p.name.startswith(GPU_PREFIX)}
    assert published - set(SUPERSEDED) <= set(names), "a results file make bench would not regenerate"
    for step in plan:
        if step.argv[0] != "export":  # export parses its own arguments
            args = build_parser().parse_args(list(step.argv))
            assert args.name == step.name  # the step writes the file it is named after


def test_dry_run_prints_the_plan_and_its_duration(capsys: object) -> None:
    assert main(["--dry-run"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    assert "expected about" in out and "minutes" in out and "peers-all-MiniLM-L6-v2-fixed-length" in out
