# moegen: the two commands are `make sim` and `make test`; both set up .venv on first use.
#
#   make sim      the main job on the simulated accelerator (see README)
#   make test     the whole test suite, Verilator and formal tests included
#   make lint     ruff
#   make bitstream  a bitstream for BOARD (default ulx3s-85f) from CONFIG (default: the board's
#                 preset), with its resource and timing report (see docs/boards.md)
#   make train-demo  retrain the demo MoE model that `make sim` runs (host/demo/checkpoint/):
#                 seeded, the same checkpoint again on the same machine, about 7 minutes
#   make clean    remove build outputs (keeps .venv)
#
# Variables: PYTHON (interpreter for the venv), TORCH (the torch requirement; the default is
# the CPU wheel, install it first so no CUDA build is pulled), CONFIG (config for `make sim` and
# `make bitstream`), BOARD (board for `make bitstream`), PYTEST_ARGS (extra pytest arguments,
# for instance `-m "not slow"` or `-k router`).

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
CONFIG ?= default
PYTEST_ARGS ?=
BOARD ?= ulx3s-85f

PY := $(VENV)/bin/python
# re-install when the dependencies or the torch choice change, and only then
TORCH_TAG := $(shell printf '%s' '$(TORCH)' | cksum | cut -d' ' -f1)
STAMP := $(VENV)/.installed-$(TORCH_TAG)

.PHONY: help install sim test lint clean train-demo bitstream

help:
	@sed -n '2,16p' Makefile | sed 's/^# \{0,1\}//'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet '$(TORCH)'
	$(PY) -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

sim: $(STAMP)
	$(VENV)/bin/moegen sim demo --config $(CONFIG) --plot build/sim-demo.png

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -n auto --dist loadfile $(PYTEST_ARGS)

lint: $(STAMP)
	$(PY) -m ruff check .

# CONFIG given on the command line or in the environment is used; its `?=` default is the
# simulation's, so without it the board's own preset is built
bitstream: $(STAMP)
	$(VENV)/bin/moegen bitstream --board $(BOARD) $(if $(filter command% environment%,$(origin CONFIG)),--config $(CONFIG))

train-demo: $(STAMP)
	$(PY) -m moegen.host.demo.train

clean:
	rm -rf build .pytest_cache .ruff_cache .hypothesis
