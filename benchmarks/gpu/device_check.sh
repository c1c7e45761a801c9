#!/usr/bin/env bash
# The GPU device check, in one go on a machine with an NVIDIA GPU where taskserve is not
# installed and nothing can be fetched (the lent H200: docs/gpu.md). Ends within 8 minutes:
# every part has a timeout cut to the time left, and a failing part is logged and the
# next one runs.
#
#   OUT=DIR bash benchmarks/gpu/device_check.sh                   # python3 as found
#   PYTHON=.venv/bin/python bash benchmarks/gpu/device_check.sh   # another interpreter
#
# Prepared here (each fits one device call of 64 MiB; files stay on a warm machine):
#   bash benchmarks/gpu/pack_models.sh   -> build/devcheck/models  (torch entries, fp16 weights)
#   bash benchmarks/gpu/fetch_wheels.sh  -> build/devcheck/wheels  (what the server lacks there)
#   ORT_GPU=1 bash benchmarks/gpu/fetch_wheels.sh -> build/devcheck/ortgpu/part-NN (optional:
#     onnxruntime-gpu in 60 MB parts, one per call; joined and checked here)
#   SMOLLM2=1 bash benchmarks/gpu/pack_models.sh -> build/devcheck/smollm2/part-NN (optional:
#     the SmolLM2 torch entry in fp16, ~260 MB in 60 MB parts, one per call; joined into models/)
#
# 1. Layout: src/ goes on PYTHONPATH with the wheels installed into build/devcheck/site (and onnxruntime-gpu
#    into build/devcheck/site-ort, ahead of the machine's CPU onnxruntime, when all parts came).
# 2. nvidia-smi, versions, imports.
# 3. The gpu tests: tests/gpu (PyTorch runtime fp16 vs CPU fp32, CUDA graphs, batching on the
#    GPU, memory released on unload, onnxruntime CUDA I/O binding, native TensorRT where
#    installed), tests/e2e/test_gpu_metrics.py, the CUDA test in tests/unit/test_onnx_runtime.py.
# 4. The fake-NVML unit tests and NVML readings (as before).
# 5. The benchmark through the server (taskserve.benchmarks.gpu_bench): MiniLM and
#    EfficientNet-Lite0 at concurrency 1-64, fp16 GPU batched vs max_batch_size 1 vs the same
#    server on the CPU cores; SmolLM2 decode with 1/8/32 streams when models/ has an entry.
#
# $OUT gets: device_check.log, device_check.json (summary), pytest_gpu.xml, nvml_readings.*,
# results/gpu-h200.json and results/gpu-h200.md (copy them to benchmarks/results/).
# Exit status: the gpu tests' pytest status (0 when they passed or skipped).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
PYTHON=${PYTHON:-python3}
OUT=${OUT:-build/devcheck/out}
WHEELS=${WHEELS:-build/devcheck/wheels}
MODELS=${MODELS:-build/devcheck/models}
ORTGPU=${ORTGPU:-build/devcheck/ortgpu}
SMOLLM2_PARTS=${SMOLLM2_PARTS:-build/devcheck/smollm2}
TEST_TIMEOUT=${TEST_TIMEOUT:-200}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-230}
LOAD_SECONDS=${LOAD_SECONDS:-3}
# The whole check ends by then (seconds from the start), whatever hangs.
TOTAL_SECONDS=${TOTAL_SECONDS:-470}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)

# join_parts PARTS_DIR OUT_DIR: join PARTS_DIR/part-*/chunk.* into OUT_DIR/<NAME> and check its
# sha256 (fetch_wheels.sh and pack_models.sh write NAME and SHA256 into every part).
join_parts() {
  local name expected
  name=$(cat "$1"/part-*/NAME 2>/dev/null | head -n 1)
  expected=$(cat "$1"/part-*/SHA256 2>/dev/null | head -n 1)
  [ -n "$name" ] || { echo "$1: parts without a NAME file"; return 1; }
  cat "$1"/part-*/chunk.* > "$2/$name"
  if [ "$(sha256sum "$2/$name" | cut -d' ' -f1)" != "$expected" ]; then
    echo "$1: the joined $name does not match its sha256 (carry every part-NN)"
    return 1
  fi
  echo "$1: joined $name ($(du -h "$2/$name" | cut -f1))"
}

section() { printf '\n===== %s (%ds in) =====\n' "$*" "$SECONDS"; }
# A step's timeout: its own, cut to what is left of TOTAL_SECONDS (at least 5 s).
budget() { local left=$((TOTAL_SECONDS - SECONDS - 10)); [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"; }

checks() {
  local started=$SECONDS wheels=none
  section "layout"
  rm -rf build/devcheck/site
  local path="$ROOT/src"
  if compgen -G "$WHEELS/*.whl" >/dev/null; then
    if "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
        --target build/devcheck/site "$WHEELS"/*.whl; then
      wheels=installed
      path="$path:$ROOT/build/devcheck/site"
      echo "installed $(ls "$WHEELS" | wc -l) wheels from $WHEELS into build/devcheck/site"
    else
      wheels=failed
      echo "the wheels in $WHEELS did not install (wrong Python?); going on with the machine's packages"
    fi
  else
    echo "no wheels in $WHEELS: the machine's own packages only"
  fi
  local ortgpu=none smollm2=none
  if compgen -G "$ORTGPU/part-*/chunk.*" >/dev/null; then
    ortgpu=incomplete
    rm -rf build/devcheck/site-ort build/devcheck/joined && mkdir -p build/devcheck/joined
    if join_parts "$ORTGPU" build/devcheck/joined && "$PYTHON" -m pip install -q --no-index --no-deps --no-compile \
        --no-cache-dir --disable-pip-version-check --target build/devcheck/site-ort build/devcheck/joined/*.whl; then
      ortgpu=installed
      path="$ROOT/build/devcheck/site-ort:$path"
    fi
    rm -rf build/devcheck/joined
  fi
  if compgen -G "$SMOLLM2_PARTS/part-*/chunk.*" >/dev/null; then
    smollm2=incomplete
    mkdir -p build/devcheck/joined "$MODELS"
    if join_parts "$SMOLLM2_PARTS" build/devcheck/joined && tar -xf build/devcheck/joined/*.tar -C "$MODELS"; then
      smollm2=unpacked
    fi
    rm -rf build/devcheck/joined
  fi
  echo "SmolLM2 torch entry: $smollm2"
  echo "onnxruntime-gpu: $ortgpu"
  export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
  export TASKSERVE_GPU_MODELS="$ROOT/$MODELS"
  ls "$MODELS" 2>/dev/null || echo "no models in $MODELS: tests/gpu skips what needs them, the benchmark fails"
  export ORT_DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
  echo "PYTHON=$PYTHON PYTHONPATH=$PYTHONPATH"

  section "nvidia-smi"
  timeout 30 nvidia-smi
  local smi_rc=$?
  if [ "$smi_rc" -eq 0 ]; then
    # The same fields as the collector's, to compare with nvml_readings.md.
    timeout 30 nvidia-smi --format=csv --query-gpu=index,uuid,utilization.gpu,memory.used,memory.total,power.draw,power.limit,temperature.gpu
  else
    echo "nvidia-smi failed or is missing (status $smi_rc)"
  fi

  section "versions"
  timeout "$(budget 90)" "$PYTHON" - <<'PY'
import importlib.metadata as m
import platform

print("python", platform.python_version(), platform.machine())
for name in ("nvidia-ml-py", "prometheus-client", "protobuf", "grpcio", "grpcio-health-checking", "pydantic",
             "pyyaml", "numpy", "onnxruntime", "onnxruntime-gpu", "onnx", "torch", "transformers", "safetensors",
             "tensorrt", "pytest", "pytest-timeout", "uvloop"):
    try:
        print(f"{name} {m.version(name)}")
    except m.PackageNotFoundError:
        print(f"{name} (not installed)")
import taskserve.server

print("taskserve.server from", taskserve.server.__path__[0])
try:
    import torch

    print("torch cuda", torch.version.cuda, "available", torch.cuda.is_available(),
          torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
except Exception as err:
    print("torch:", type(err).__name__, err)
try:
    import onnxruntime

    print("onnxruntime providers", onnxruntime.get_available_providers())
except Exception as err:
    print("onnxruntime:", type(err).__name__, err)
PY

  section "imports"
  local generated=ok server=ok
  timeout 60 "$PYTHON" -c "import taskserve.protocol.generated.inference.grpc_service_pb2_grpc" 2>"$OUT/.import.err" \
    || generated=$(tail -n 1 "$OUT/.import.err")
  echo "generated protobuf/grpc code: $generated"
  timeout 60 "$PYTHON" -c "import taskserve.server.frontends.grpc.server" 2>"$OUT/.import.err" \
    || server=$(tail -n 1 "$OUT/.import.err")
  echo "whole server: $server"
  rm -f "$OUT/.import.err"

  section "gpu tests"
  timeout "$(budget "$TEST_TIMEOUT")" "$PYTHON" -m pytest -m gpu -v -rs -p no:cacheprovider \
    --junitxml="$OUT/pytest_gpu.xml" tests/gpu tests/e2e/test_gpu_metrics.py tests/unit/test_onnx_runtime.py
  local gpu_rc=$?

  section "benchmark through the server"
  local smollm2_args=()
  for entry in SmolLM2-135M-Instruct-torch SmolLM2-135M-Instruct; do
    if [ -d "$MODELS/$entry" ]; then smollm2_args=(--smollm2 "$entry"); break; fi
  done
  local bench_timeout
  bench_timeout=$(budget "$BENCH_TIMEOUT")
  # 24 model points and 3 decode points must fit the budget: short windows (a GPU serves
  # thousands of requests in 2 s), or the last points (SmolLM2's decode) would be skipped.
  timeout "$bench_timeout" "$PYTHON" -m taskserve.benchmarks.gpu_bench --models "$MODELS" --out "$OUT/results" \
    --name h200 --budget-s $((bench_timeout - 40)) --window-s 2 --warmup-s 0.5 --decode-seconds 6 "${smollm2_args[@]}"
  local bench_rc=$?

  section "fake-NVML unit tests (this machine's prometheus-client)"
  timeout "$(budget 60)" "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/unit/test_gpu_metrics.py
  local unit_rc=$?

  section "NVML readings"
  timeout "$(budget 40)" "$PYTHON" -m taskserve.benchmarks.gpu_readings --out "$OUT" --load-seconds "$LOAD_SECONDS"
  local readings_rc=$?

  section "summary"
  SMI_RC=$smi_rc WHEELS_STATE=$wheels GENERATED=$generated SERVER=$server GPU_RC=$gpu_rc UNIT_RC=$unit_rc \
  READINGS_RC=$readings_rc BENCH_RC=$bench_rc ORT_GPU=$ortgpu SMOLLM2=$smollm2 ELAPSED=$((SECONDS - started)) \
  timeout 30 "$PYTHON" - "$OUT" <<'PY'
import json
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

out = Path(sys.argv[1])
cases = []
try:
    for case in ET.parse(out / "pytest_gpu.xml").getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome, message = tag, node.get("message", "")
        cases.append({"test": case.get("name"), "outcome": outcome, "message": message[:500],
                      "seconds": float(case.get("time", 0))})
except (OSError, ET.ParseError) as err:
    cases.append({"test": "(no junit xml)", "outcome": "error", "message": str(err)})
env = os.environ
summary = {
    "nvidia_smi_status": int(env["SMI_RC"]),
    "wheels": env["WHEELS_STATE"],
    "imports": {"generated_code": env["GENERATED"], "server": env["SERVER"]},
    "gpu_tests": {"status": int(env["GPU_RC"]), "cases": cases},
    "unit_tests_status": int(env["UNIT_RC"]),
    "readings_status": int(env["READINGS_RC"]),
    "onnxruntime_gpu": env["ORT_GPU"],
    "smollm2_entry": env["SMOLLM2"],
    "benchmark_status": int(env["BENCH_RC"]),
    "benchmark": json.loads((out / "results" / "gpu-h200.json").read_text()).get("ratios")
    if (out / "results" / "gpu-h200.json").is_file() else None,
    "seconds": int(env["ELAPSED"]),
}
(out / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
  return "$gpu_rc"
}

checks 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
