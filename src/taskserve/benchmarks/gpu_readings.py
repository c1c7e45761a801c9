"""NVML readings through the server's GPU collector, for the device check: each GPU idle,
during a few seconds of matmuls when a CUDA build of torch is there, and after; how long
one NVML read takes; and the Prometheus text a scrape returns.

    python -m taskserve.benchmarks.gpu_readings --out DIR [--load-seconds 3]

Writes DIR/nvml_readings.json, DIR/nvml_readings.md and DIR/nvml_scrape.txt. Imports only
the collector, prometheus-client and (for the load) torch, so it runs where the rest of
the server's dependencies are missing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

from taskserve.benchmarks.machine import machine_info, package_versions
from taskserve.server.gpu_metrics import GpuCollector, GpuMetricsUnavailable, GpuReading, start_gpu_metrics

PACKAGES = ("nvidia-ml-py", "prometheus-client", "torch", "protobuf", "grpcio", "onnxruntime", "pytest")


def _read_latency_ms(collector: GpuCollector, reads: int = 20) -> dict[str, float]:
    """One NVML read of every GPU (what a scrape costs once the cache is stale)."""
    times = []
    for _ in range(reads):
        started = time.perf_counter()
        collector.read()
        times.append((time.perf_counter() - started) * 1000)
    return {"median": statistics.median(times), "max": max(times)}


def _under_load(collector: GpuCollector, seconds: float) -> tuple[list[GpuReading], dict[str, Any]]:
    """Busiest reading per GPU while a thread runs bf16 matmuls on cuda:0 for ``seconds``."""
    try:
        import torch
    except ImportError as err:
        return [], {"skipped": f"no torch: {err}"}
    if not torch.cuda.is_available():
        return [], {"skipped": "torch sees no CUDA device"}
    stop = threading.Event()
    done = [0]

    def work() -> None:
        x = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
        while not stop.is_set():
            for _ in range(50):
                x @ x
            torch.cuda.synchronize()
            done[0] += 50

    worker = threading.Thread(target=work, daemon=True)
    started = time.perf_counter()
    worker.start()
    busiest: dict[int, GpuReading] = {}
    while time.perf_counter() - started < seconds:
        time.sleep(0.25)
        for r in collector.read():
            best = busiest.get(r.index)
            if best is None or (r.utilization or 0.0) >= (best.utilization or 0.0):
                busiest[r.index] = r
    stop.set()
    worker.join(30)
    elapsed = time.perf_counter() - started
    info = {
        "seconds": round(elapsed, 2),
        "matmuls": done[0],
        "tflops": round(done[0] * 2 * 8192**3 / elapsed / 1e12, 1),
        "device": torch.cuda.get_device_name(0),
    }
    torch.cuda.empty_cache()
    return [busiest[i] for i in sorted(busiest)], info


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# NVML readings through taskserve's GPU collector",
        "",
        f"Driver {result.get('driver_version')}; one NVML read of all GPUs: "
        f"median {result['read_latency_ms']['median']:.2f} ms, max {result['read_latency_ms']['max']:.2f} ms.",
        f"Load: {json.dumps(result['load'])}",
        "",
        "| phase | gpu | uuid | utilization | memory used / total (GiB) | power / limit (W) | energy (J) | temp (°C) |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def fmt(value: float | None, scale: float = 1.0, digits: int = 1) -> str:
        return "n/a" if value is None else f"{value / scale:.{digits}f}"

    for phase, readings in result["phases"].items():
        for r in readings:
            lines.append(
                f"| {phase} | {r['index']} | {r['uuid']} | {fmt(r['utilization'], digits=2)} "
                f"| {fmt(r['memory_used_bytes'], 2**30, 2)} / {fmt(r['memory_total_bytes'], 2**30, 2)} "
                f"| {fmt(r['power_usage_watts'])} / {fmt(r['power_limit_watts'])} "
                f"| {fmt(r['energy_joules'])} | {fmt(r['temperature_celsius'], digits=0)} |"
            )
    return "\n".join(lines) + "\n"


def _driver_version() -> str | None:
    try:
        import pynvml

        version = pynvml.nvmlSystemGetDriverVersion()  # NVML is initialised by the collector
    except Exception:  # an old pynvml, or NVML refusing: the version is only informative
        return None
    return version.decode() if isinstance(version, bytes) else str(version)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_readings", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the JSON, Markdown and scrape text")
    parser.add_argument("--load-seconds", type=float, default=3.0, help="matmul load on cuda:0 (0: none)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    registry = CollectorRegistry()
    try:
        collector = start_gpu_metrics("on", registry, max_age_s=0.0)
    except GpuMetricsUnavailable as err:
        (args.out / "nvml_readings.json").write_text(json.dumps({"error": str(err)}, indent=2) + "\n")
        print(f"gpu_readings: {err}", file=sys.stderr)
        return 1
    assert collector is not None
    try:
        idle = collector.read()
        latency = _read_latency_ms(collector)
        loaded, load = _under_load(collector, args.load_seconds) if args.load_seconds > 0 else ([], {"skipped": "0 s"})
        after = collector.read()
        scrape = generate_latest(registry).decode()
        result = {
            "driver_version": _driver_version(),
            "read_latency_ms": latency,
            "load": load,
            "phases": {
                "idle": [asdict(r) for r in idle],
                "load (busiest)": [asdict(r) for r in loaded],
                "after": [asdict(r) for r in after],
            },
            "machine": machine_info() | {"packages": package_versions(PACKAGES)},
        }
    finally:
        collector.close()
    (args.out / "nvml_readings.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "nvml_readings.md").write_text(_markdown(result))
    (args.out / "nvml_scrape.txt").write_text(scrape)
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
