#!/usr/bin/env bash
# Device check for the NVML GPU metrics, on a machine with an NVIDIA GPU where taskserve is
# not installed and nothing can be fetched. Takes well under 5 minutes.
#
#   OUT=DIR bash benchmarks/gpu/device_check.sh                   # python3 as found
#   PYTHON=.venv/bin/python bash benchmarks/gpu/device_check.sh   # another interpreter
#
# 1. Makes the taskserve.* packages importable without pip: build/devcheck/taskserve/ holds
#    symlinks to server/, exporters/, clients/, benchmarks/ (as `make typecheck` does) and
#    goes on PYTHONPATH. Wheels found in $WHEELS (benchmarks/gpu/fetch_wheels.sh fills it,
#    here) are installed into build/devcheck/site first, also on PYTHONPATH.
# 2. Prints nvidia-smi, the versions, and whether the generated protobuf code and the
#    whole server import with that machine's packages.
# 3. Runs the gpu-marked tests (tests/e2e/test_gpu_metrics.py; the server-process test skips
#    itself, saying why, when the server does not import), then the fake-NVML unit tests.
# 4. Writes NVML readings (idle, under a few seconds of matmuls, after) through the collector.
#
# $OUT gets: device_check.log, device_check.json (summary), pytest_gpu.xml,
# nvml_readings.json, nvml_readings.md, nvml_scrape.txt.
# Exit status: the gpu tests' pytest status (0 when they passed or skipped).
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
ROOT=$PWD
PYTHON=${PYTHON:-python3}
OUT=${OUT:-build/devcheck/out}
WHEELS=${WHEELS:-build/devcheck/wheels}
TEST_TIMEOUT=${TEST_TIMEOUT:-180}
LOAD_SECONDS=${LOAD_SECONDS:-3}
mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)

section() { printf '\n===== %s =====\n' "$*"; }

checks() {
  local started=$SECONDS wheels=none
  section "layout"
  rm -rf build/devcheck/taskserve build/devcheck/site
  mkdir -p build/devcheck/taskserve
  for p in server exporters clients benchmarks; do ln -s "$ROOT/$p" "build/devcheck/taskserve/$p"; done
  local path="$ROOT/build/devcheck"
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
  export PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}"
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
  timeout 120 "$PYTHON" - <<'PY'
import importlib.metadata as m
import platform

print("python", platform.python_version(), platform.machine())
for name in ("nvidia-ml-py", "prometheus-client", "protobuf", "grpcio", "grpcio-health-checking", "pydantic",
             "pyyaml", "numpy", "onnxruntime", "onnx", "torch", "pytest", "pytest-timeout", "uvloop"):
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
  timeout 60 "$PYTHON" -c "import taskserve.clients.generated.inference.grpc_service_pb2_grpc" 2>"$OUT/.import.err" \
    || generated=$(tail -n 1 "$OUT/.import.err")
  echo "generated protobuf/grpc code: $generated"
  timeout 60 "$PYTHON" -c "import taskserve.server.frontends.grpc.server" 2>"$OUT/.import.err" \
    || server=$(tail -n 1 "$OUT/.import.err")
  echo "whole server: $server"
  rm -f "$OUT/.import.err"

  section "gpu tests"
  timeout "$TEST_TIMEOUT" "$PYTHON" -m pytest -m gpu -v -rs -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" \
    tests/e2e/test_gpu_metrics.py
  local gpu_rc=$?

  section "fake-NVML unit tests (this machine's prometheus-client)"
  timeout 120 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/unit/test_gpu_metrics.py
  local unit_rc=$?

  section "NVML readings"
  timeout 90 "$PYTHON" -m taskserve.benchmarks.gpu_readings --out "$OUT" --load-seconds "$LOAD_SECONDS"
  local readings_rc=$?

  section "summary"
  SMI_RC=$smi_rc WHEELS_STATE=$wheels GENERATED=$generated SERVER=$server GPU_RC=$gpu_rc UNIT_RC=$unit_rc \
  READINGS_RC=$readings_rc ELAPSED=$((SECONDS - started)) timeout 60 "$PYTHON" - "$OUT" <<'PY'
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
    "seconds": int(env["ELAPSED"]),
}
(out / "device_check.json").write_text(json.dumps(summary, indent=2) + "\n")
print(json.dumps(summary, indent=2))
PY
  return "$gpu_rc"
}

checks 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
