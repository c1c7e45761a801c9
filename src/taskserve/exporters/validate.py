"""Run exported ONNX files on the validation cases and compare with the source model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from taskserve.exporters.errors import ValidationFailed
from taskserve.exporters.progress import format_table
from taskserve.exporters.spec import ValidationCase


@dataclass(frozen=True)
class OutputDiff:
    case: str
    output: str
    expected_shape: tuple[int, ...]
    actual_shape: tuple[int, ...]
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.expected_shape == self.actual_shape and self.max_abs_diff <= self.tolerance


def open_session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only: the CLI output is the summary table
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_cases(model_dir: Path, cases: Sequence[ValidationCase]) -> list[dict[str, np.ndarray]]:
    """Outputs of each case's ONNX file (under ``model_dir``) on the case's inputs."""
    sessions: dict[str, ort.InferenceSession] = {}
    results = []
    for case in cases:
        if case.onnx_file not in sessions:
            sessions[case.onnx_file] = open_session(model_dir / case.onnx_file)
        session = sessions[case.onnx_file]
        names = [o.name for o in session.get_outputs()]
        wanted = {i.name for i in session.get_inputs()}
        feeds = {k: v for k, v in case.inputs.items() if k in wanted}
        results.append(dict(zip(names, session.run(names, feeds), strict=True)))
    return results


def max_abs_diff(expected: np.ndarray, actual: np.ndarray) -> float:
    if expected.shape != actual.shape:
        return float("inf")
    if expected.size == 0:
        return 0.0
    diff = np.abs(expected.astype(np.float64) - actual.astype(np.float64))
    return float("inf") if np.isnan(diff).any() else float(diff.max())


def compare(
    cases: Sequence[ValidationCase], actual: Sequence[Mapping[str, np.ndarray]], tolerance: float
) -> list[OutputDiff]:
    diffs = []
    for i, (case, got) in enumerate(zip(cases, actual, strict=True)):
        label = case.label or f"{case.onnx_file}#{i}"
        for name, want in case.expected.items():
            have = got.get(name)
            have_shape = tuple(have.shape) if have is not None else ()
            diff = max_abs_diff(want, have) if have is not None else float("inf")
            diffs.append(OutputDiff(label, name, tuple(want.shape), have_shape, diff, tolerance))
    return diffs


def diff_table(diffs: Sequence[OutputDiff]) -> str:
    rows = [
        (
            d.case,
            d.output,
            list(d.expected_shape),
            list(d.actual_shape) if d.actual_shape else "missing",
            f"{d.max_abs_diff:.3g}",
            f"{d.tolerance:.0e}",
            "ok" if d.ok else "MISMATCH",
        )
        for d in diffs
    ]
    return format_table(
        ("case", "output", "expected shape", "onnx shape", "max abs diff", "tolerance", ""), rows
    )


def validate(
    model_dir: Path, cases: Sequence[ValidationCase], tolerance: float, what: str
) -> list[OutputDiff]:
    """Raise ValidationFailed with the table when any output differs beyond ``tolerance``."""
    if not cases:
        raise ValidationFailed(f"{what}: no validation inputs; the exporter produced no test cases")
    diffs = compare(cases, run_cases(model_dir, cases), tolerance)
    if not all(d.ok for d in diffs):
        raise ValidationFailed(
            f"{what} does not match the source model (max abs diff above {tolerance:g}):\n{diff_table(diffs)}"
        )
    return diffs


def worst(diffs: Sequence[OutputDiff]) -> str:
    """One-line summary for the step table."""
    top = max(diffs, key=lambda d: d.max_abs_diff)
    cases = len({d.case for d in diffs})
    return (
        f"{len(diffs)} outputs in {cases} cases, "
        f"max abs diff {top.max_abs_diff:.2g} ({top.output}) <= {top.tolerance:g}"
    )
