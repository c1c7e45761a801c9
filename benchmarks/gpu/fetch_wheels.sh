#!/usr/bin/env bash
# Download, here, the wheels device_check.sh installs on the GPU machine so that the whole
# server imports there (that machine cannot reach a package registry): the server's
# dependencies it lacks (pydantic, grpcio-health-checking, grpcio-reflection) and the
# protobuf/grpcio releases the generated code needs, at the versions of this checkout's .venv.
#
#   bash benchmarks/gpu/fetch_wheels.sh            # into build/devcheck/wheels (ignored by git)
#
# Then carry build/devcheck/wheels with the device call. Without them, device_check.sh still
# runs the NVML tests and skips the server test if the server does not import there.
#
#   ORT_GPU=1 bash benchmarks/gpu/fetch_wheels.sh   # also onnxruntime-gpu, split for transfer
#
# The onnxruntime-gpu wheel (a CUDA 13 build, ~255 MB) is more than one device call carries
# (64 MiB): it is split into build/devcheck/ortgpu/part-NN/ of <= 60 MB each, every part with
# the wheel's name and sha256. Carry one part per call (files stay on a warm machine);
# device_check.sh joins them, checks the sha256 and installs the wheel ahead of the
# machine's CPU onnxruntime.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
WHEELS=${WHEELS:-build/devcheck/wheels}
DEVICE_PYTHON=${DEVICE_PYTHON:-3.12}
PACKAGES=(grpcio protobuf grpcio-health-checking grpcio-reflection pydantic pydantic-core annotated-types
          typing-inspection typing-extensions)
specs=()
for name in "${PACKAGES[@]}"; do
  specs+=("$name==$("$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
done
rm -rf "$WHEELS" && mkdir -p "$WHEELS"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
  "${platforms[@]}" -d "$WHEELS" "${specs[@]}"
ls -l "$WHEELS"
du -sh "$WHEELS"

if [ "${ORT_GPU:-0}" = "1" ]; then
  ORTGPU=${ORTGPU:-build/devcheck/ortgpu}
  ORT_GPU_VERSION=${ORT_GPU_VERSION:-1.31.1}
  tmp=$(mktemp -d)
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$DEVICE_PYTHON" --implementation cp \
    "${platforms[@]}" -d "$tmp" "onnxruntime-gpu==$ORT_GPU_VERSION"
  wheel=$(ls "$tmp"/onnxruntime_gpu-*.whl)
  rm -rf "$ORTGPU" && mkdir -p "$ORTGPU"
  split -b 60000000 -d -a 2 "$wheel" "$tmp/chunk."
  for chunk in "$tmp"/chunk.*; do
    part="$ORTGPU/part-${chunk##*.}"
    mkdir -p "$part" && mv "$chunk" "$part/"
    basename "$wheel" > "$part/NAME"
    sha256sum "$wheel" | cut -d' ' -f1 > "$part/SHA256"
  done
  rm -rf "$tmp"
  du -sh "$ORTGPU"/part-*
fi
