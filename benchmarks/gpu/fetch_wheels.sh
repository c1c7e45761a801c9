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
