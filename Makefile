# Switchyard developer entry points. Every target uses the project's own virtualenv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PRESET ?= tiny
PROTO_OUT := shared/proto
PROTOS := $(shell find protos -name '*.proto')

.PHONY: setup protos model test test-all bench up down run status clean

# Creates .venv with every dependency pinned in requirements.txt, then generates the stubs.
setup: $(VENV)/.installed protos

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and alone: its pin selects the CPU build and keeps CUDA wheels out.
	$(PY) -m pip install --quiet "torch==$$(grep -E '^torch==' requirements.txt | cut -d= -f3)"
	$(PY) -m pip install --quiet -r requirements.txt
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

# Writes the default model (PRESET=tiny -> models/tiny-llama, PRESET=small -> models/small-llama).
model: $(VENV)/.installed
	$(PY) -m services.worker.make_model --preset $(PRESET)

test: setup
	$(PY) -m pytest -q

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

# `up`, then one streamed completion (make run PROMPT='your prompt').
run: up
	$(PY) -m deploy.demo $(if $(PROMPT),'$(PROMPT)')

clean:
	rm -rf $(PROTO_OUT) .pytest_cache
