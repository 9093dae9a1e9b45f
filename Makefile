# Tandem — two commands on a fresh machine: `make run` (the demo) and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
GEN := services/gen
PROTOS := $(shell find proto -name '*.proto')

.PHONY: help install proto run up test lint typecheck unit integration e2e clean

help:
	@echo "make run    - install, start the whole stack locally and run the BBC News demo"
	@echo "make up     - install and start the stack (Ctrl-C stops it)"
	@echo "make test   - lint, type-check and run every test tier (real nats-server + PostgreSQL)"
	@echo "make proto  - regenerate Python code from proto/"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned, so nothing resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) $(GEN)/.stamp

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
	$(VENV)/bin/ruff check services tests loadtests
	$(VENV)/bin/ruff format --check services tests loadtests

typecheck: install
	$(VENV)/bin/mypy services tests loadtests

test: lint typecheck
	$(VENV)/bin/pytest -q -p no:cacheprovider tests

clean:
	rm -rf $(GEN) .state exports .mypy_cache .ruff_cache .pytest_cache
