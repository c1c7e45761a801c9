#!/usr/bin/env bash
# Create the peer servers' own virtualenvs next to the repository's .venv:
#   .venv-kserve   kserve (v2 gRPC through kserve.ModelServer) + onnxruntime
#   .venv-mlserver mlserver (v2 gRPC) + onnxruntime, uvloop < 0.22
# and the generation peers (taskserve-bench generation --peer ...):
#   .peers/llama.cpp llama-server and llama-quantize built from source (llama_cpp.sh, ~17 min
#                    the first time; PEERS_LLAMA_CPP=0 skips it)
#   .venv-vllm       vLLM's CPU build, ~3.5 GB: only with PEERS_VLLM=1 (vllm.sh)
# Each peer gets its own environment: their pins (protobuf, grpcio, fastapi, uvloop)
# clash with taskserve's and with each other's. Safe to re-run; nothing is
# reinstalled when an environment is already complete.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
KSERVE_VERSION="${KSERVE_VERSION:-0.21.0}"
MLSERVER_VERSION="${MLSERVER_VERSION:-1.7.1}"
ORT_VERSION="${ORT_VERSION:-$("$ROOT/.venv/bin/python" -c 'import onnxruntime; print(onnxruntime.__version__)' 2>/dev/null || echo 1.22.0)}"

make_venv() {  # make_venv DIR MARKER PACKAGES...
  local dir="$1" marker="$2"; shift 2
  if [[ -f "$dir/$marker" ]]; then
    echo "$dir: ready"
    return
  fi
  echo "$dir: creating"
  "$PYTHON" -m venv "$dir"
  "$dir/bin/pip" install --quiet --upgrade pip
  "$dir/bin/pip" install --quiet "$@"
  touch "$dir/$marker"
}

# The same onnxruntime as taskserve's, so every server runs the same kernels.
make_venv "$ROOT/.venv-kserve" .installed "kserve==$KSERVE_VERSION" "onnxruntime==$ORT_VERSION" numpy
# MLServer's default worker process crashes under uvloop 0.23: pin uvloop below 0.22.
make_venv "$ROOT/.venv-mlserver" .installed "mlserver==$MLSERVER_VERSION" "onnxruntime==$ORT_VERSION" numpy "uvloop<0.22"

"$ROOT/.venv-kserve/bin/python" -c 'import kserve, onnxruntime; print("kserve", kserve.__version__ if hasattr(kserve, "__version__") else "?", "onnxruntime", onnxruntime.__version__)'
"$ROOT/.venv-mlserver/bin/python" -c 'import mlserver, onnxruntime; print("mlserver", mlserver.__version__, "onnxruntime", onnxruntime.__version__)'

if [[ "${PEERS_LLAMA_CPP:-1}" != 0 ]]; then
  bash "$ROOT/benchmarks/peers/llama_cpp.sh"
fi
if [[ "${PEERS_VLLM:-0}" == 1 ]]; then
  bash "$ROOT/benchmarks/peers/vllm.sh"
fi
