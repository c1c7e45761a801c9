"""How an ONNX Runtime model spreads over the CPU cores: the session options of its
instances, and the wide session a batch may use when it computes alone.

On a few cores no one thread layout wins every load. Narrow instances (one thread
each, side by side) serve the most rows per second under load, because a small
batch's matrices split poorly over many threads; but then a lone request computes
on one core. ``wide_when_alone`` gives a model both: its instances stay narrow,
and a batch that starts while nothing else of the model computes and nothing
waits runs on one extra session that has every core (docs/performance-notes.md).
Sessions cannot change their thread count per run, so the width is a choice
between two sessions of the same model file, not a run option.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from taskserve.server.repository.config import RuntimeConfig

_OPT_LEVELS = ("disable", "basic", "extended", "all")


def usable_cores() -> int:
    """Cores this process may run on (its affinity mask, not the machine's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_intra_op_threads(instance_count: int) -> int:
    """Split the cores between instances so N instances don't oversubscribe them."""
    return max(1, usable_cores() // max(1, instance_count))


def instance_threads(rc: RuntimeConfig, instance_count: int) -> int:
    """Intra-op threads of each instance's own session."""
    return rc.intra_op_threads or default_intra_op_threads(instance_count)


def alone_threads(rc: RuntimeConfig, instance_count: int) -> int:
    """Intra-op threads of the session a lone batch runs on; 0 when there is no such
    session (off, or it would be no wider than the instances' own)."""
    if not rc.wide_when_alone:
        return 0
    wide = rc.alone_intra_op_threads or usable_cores()
    return wide if wide > instance_threads(rc, instance_count) else 0


def session_options(ort: Any, rc: RuntimeConfig, intra_op_threads: int, alone: bool = False) -> Any:
    """``onnxruntime.SessionOptions`` for one session of ``intra_op_threads`` threads;
    ``alone``: the wide session a lone batch runs on."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = intra_op_threads
    opts.inter_op_num_threads = rc.inter_op_threads
    opts.enable_cpu_mem_arena = rc.cpu_memory_arena
    levels = (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    )
    opts.graph_optimization_level = levels[_OPT_LEVELS.index(rc.graph_optimization_level)]
    # Threads spin-wait by default, which steals the cores other instances and the
    # event loop need between batches. The wide session runs only while nothing else of
    # the model computes, so there its spinning takes no core from another batch, and it
    # saves the wake-up of every thread at every operator, most of a small batch's time.
    spin = rc.allow_spinning or alone
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    return opts


class SharedSessions:
    """One wide session per (model file, width), shared by a model's instances.

    Only a batch that computes alone uses it, so the instances never need one each
    (a MiniLM session holds ~90 MB of weights). Counted: the last ``release`` drops it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[tuple[Path, int], tuple[Any, int]] = {}

    def acquire(self, key: tuple[Path, int], create: Any) -> Any:
        with self._lock:
            session, users = self._sessions.get(key, (None, 0))
            if session is None:
                session = create()
            self._sessions[key] = (session, users + 1)
            return session

    def release(self, key: tuple[Path, int]) -> None:
        with self._lock:
            session, users = self._sessions.get(key, (None, 0))
            if users <= 1:
                self._sessions.pop(key, None)
            else:
                self._sessions[key] = (session, users - 1)


WIDE_SESSIONS = SharedSessions()
