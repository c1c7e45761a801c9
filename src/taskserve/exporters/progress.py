"""One progress bar over an export's steps (stderr) and the summary table printed at the end."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TextIO

from tqdm import tqdm  # type: ignore[import-untyped]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain fixed-width table; every cell is shown with ``str``."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@dataclass
class StepRecord:
    name: str
    status: str = "pending"  # ok | failed | skipped
    seconds: float = 0.0
    detail: str = ""


class Steps:
    """Runs named steps in order, advancing one bar and keeping a row per step.

    Not thread-safe; one export owns one instance.
    """

    def __init__(
        self, title: str, names: Sequence[str], stream: TextIO | None = None, enabled: bool = True
    ) -> None:
        self.title = title
        self.records = {name: StepRecord(name) for name in names}
        self.stream = stream or sys.stderr
        self._bar = tqdm(
            total=len(names),
            desc=f"{title}: ",
            unit="step",
            file=self.stream,
            disable=not enabled,
            leave=True,
            bar_format="{desc}{n_fmt}/{total_fmt} steps |{bar:20}| {elapsed}",
        )

    @contextmanager
    def step(self, name: str) -> Iterator[StepRecord]:
        """Run the body as step ``name``; the body may set ``record.detail``."""
        record = self.records[name]
        self._bar.set_description(f"{self.title} [{name}]")
        start = time.perf_counter()
        try:
            yield record
            record.status = "ok"
        except BaseException:
            record.status = "failed"
            raise
        finally:
            record.seconds = time.perf_counter() - start
            self._bar.update(1)

    def skip(self, name: str, reason: str) -> None:
        record = self.records[name]
        record.status, record.detail = "skipped", reason
        self._bar.update(1)

    def close(self) -> None:
        self._bar.set_description(self.title)
        self._bar.close()

    def summary(self) -> str:
        rows = [
            (r.name, r.status, f"{r.seconds:.1f}s" if r.status in ("ok", "failed") else "", r.detail)
            for r in self.records.values()
        ]
        return format_table(("step", "status", "time", "detail"), rows)
