# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export HF_HUB_OFFLINE := 1
export PYTHONHASHSEED := 0

.PHONY: install test test-fast test-demo lint demo clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch 2.14.1 / torchvision 0.29.1 are served from local disk on the CPU machines
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev]'
	# img2dataset depends on the `dataclasses` backport, whose dataclasses.py shadows the stdlib and breaks torch
	$(PY) -m pip uninstall -q -y dataclasses
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check dtplib tests

test: install lint
	$(VENV)/bin/pytest -q -ra tests

test-fast: install
	$(VENV)/bin/pytest -q -ra -m "not slow" tests

test-demo: install
	$(VENV)/bin/pytest -q -ra -m demo tests

demo: install
	$(PY) -m dtplib.demo

clean:
	rm -rf $(VENV) results/demo
