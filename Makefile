# moegen: the two commands are `make sim` and `make test`; both set up .venv on first use.
#
#   make sim      the main job on the simulated accelerator (see README)
#   make test     the whole test suite, Verilator and formal tests included
#   make lint     ruff
#   make clean    remove build outputs (keeps .venv)
#
# Variables: PYTHON (interpreter for the venv), TORCH (the torch requirement; the default is
# the CPU wheel, install it first so no CUDA build is pulled), CONFIG (config for `make sim`),
# PYTEST_ARGS (extra pytest arguments, for instance `-m "not slow"` or `-k router`).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= default
PYTEST_ARGS ?=

PY := $(VENV)/bin/python
# re-install when the dependencies or the torch choice change, and only then
TORCH_TAG := $(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(TORCH_TAG)

.PHONY: help install sim test lint clean

help:
	@sed -n '2,11p' Makefile | sed 's/^# \{0,1\}//'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

sim: $(STAMP)
	$(VENV)/bin/moegen verify requant --config $(CONFIG)

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis
