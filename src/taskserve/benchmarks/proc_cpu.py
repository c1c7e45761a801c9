"""How many cores a server process kept busy during a window, from ``/proc/<pid>/stat``.

A process's ``utime + stime`` counts the CPU time of all its threads; its children's
count only once they have exited and been waited for, so a server that works in child
processes (vLLM's engine core, MLServer's workers) is read as its whole process tree.
Cores busy = CPU seconds the tree used in the window / the window's seconds.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")
TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True)
class ProcStat:
    pid: int
    ppid: int
    cpu_ticks: int  # utime + stime


def parse_stat(text: str) -> ProcStat:
    """One ``/proc/<pid>/stat`` line. The command name (field 2) is in parentheses and may
    itself hold spaces and parentheses, so the fields are counted from its last ')'."""
    head, _, tail = text.rpartition(")")
    pid = int(head.split("(", 1)[0])
    fields = tail.split()
    # After the name: state(3) ppid(4) ... utime(14) stime(15).
    return ProcStat(pid, int(fields[1]), int(fields[11]) + int(fields[12]))


def read_stats(proc: Path = PROC) -> list[ProcStat]:
    """Every process's stat that can still be read (processes come and go while scanning)."""
    stats = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stats.append(parse_stat((entry / "stat").read_text()))
        except (OSError, ValueError, IndexError):
            continue
    return stats


def tree_ticks(root: int, stats: Iterable[ProcStat]) -> int:
    """CPU ticks of ``root`` and every live descendant."""
    children: dict[int, list[ProcStat]] = defaultdict(list)
    by_pid = {}
    for s in stats:
        children[s.ppid].append(s)
        by_pid[s.pid] = s
    if root not in by_pid:
        return 0
    total, todo = 0, [by_pid[root]]
    while todo:
        s = todo.pop()
        total += s.cpu_ticks
        todo.extend(children.get(s.pid, ()))
    return total


def cpu_seconds(pids: Iterable[int], proc: Path = PROC) -> dict[int, float]:
    """CPU seconds used so far by each of ``pids`` with its descendants, from one scan."""
    stats = read_stats(proc)
    return {pid: tree_ticks(pid, stats) / TICKS_PER_S for pid in pids}


def cores_busy(before: dict[int, float], after: dict[int, float], seconds: float) -> dict[int, float]:
    """Cores each process tree kept busy between two ``cpu_seconds`` readings."""
    if seconds <= 0:
        return dict.fromkeys(after, 0.0)
    return {pid: max(0.0, after[pid] - before.get(pid, 0.0)) / seconds for pid in after}
