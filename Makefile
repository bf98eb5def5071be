# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv if missing; `make lab` opens JupyterLab.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export PYTHONHASHSEED := 0
# the tests and the demo never reach the Hub (their weights are built, not downloaded); make lab leaves it unset, so
# that a user's own pretrained= loads work there
OFFLINE_TARGETS := test test-fast test-demo demo gpu-check
$(OFFLINE_TARGETS): export HF_HUB_OFFLINE := 1
# the shared data folder (flickr8k/, coco-mini/, cifar10-test/); set it in the environment to use another one
export DTPLIB_DATA ?= $(abspath $(CURDIR)/../shared/data)
# the Jupyter kernel of this .venv, installed into .venv/share/jupyter/kernels (make lab, tests/test_lab.py)
KERNEL := dtp-vit
KERNEL_JSON := $(VENV)/share/jupyter/kernels/$(KERNEL)/kernel.json
LAB_PORT ?= 8888
LAB_ARGS ?=
# jupyter refuses to run as root (containers) without --allow-root
LAB_ROOT := $(if $(filter 0,$(shell id -u)),--allow-root)

.PHONY: install test test-fast test-demo lint demo lab clean gpu-check

# The tested set: every package at the version in constraints.txt (scripts/constraints.py writes it from a working
# .venv; torch 2.14.1 / torchvision 0.29.1 are served from local disk on the CPU machines).
$(VENV)/.installed: pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[all,dev]'
	# img2dataset 1.47.0 (the `data` extra) requires the `dataclasses` backport with no python_version marker, and pip
	# cannot leave a dependency out; its dataclasses.py in site-packages shadows the stdlib wherever site-packages
	# comes first on sys.path (a cwd or PYTHONPATH there) and then fails with "module 'typing' has no attribute
	# '_ClassVar'": remove it
	$(PY) -m pip uninstall -q -y dataclasses
	touch $@

$(KERNEL_JSON): | $(VENV)/.installed
	$(PY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python ($(KERNEL))"

install: $(VENV)/.installed $(KERNEL_JSON)

lint: install
	$(VENV)/bin/ruff check dtplib tests

# Two pytest-xdist workers of one thread each; a test class (tests that share a fixture) or any other test is a unit
# of work (tests/conftest.py). The whole suite: about 14 minutes on 2 cores, both busy throughout (much of it the
# imports of the ~60 Python processes the tests start, about 10 s each); one process took 40-45 minutes.
TEST_WORKERS ?= 2
XDIST := -n $(TEST_WORKERS) --dist loadgroup

test: install lint
	$(VENV)/bin/pytest -q -ra --durations=15 $(XDIST) tests  # the 15 slowest listed at the end

test-fast: install
	$(VENV)/bin/pytest -q -ra $(XDIST) -m "not slow" tests

# the notebooks with their own defaults, as make demo runs them (make test passes them small parameters)
test-demo: install
	$(VENV)/bin/pytest -q -ra -m demo --demo-defaults tests

demo: install
	$(PY) -m dtplib.demo

# JupyterLab on 127.0.0.1 only (open the printed URL with its token), the repository as its root, this kernel
# (no HF_HUB_OFFLINE here: open_clip pretrained= downloads work in the lab's kernels)
lab: install
	$(VENV)/bin/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
		--ServerApp.root_dir=$(CURDIR) --FileContentsManager.preferred_dir=$(CURDIR)/notebooks \
		--MappingKernelManager.default_kernel_name=$(KERNEL) --MappingKernelManager.transport_encryption=auto \
		$(LAB_ROOT) $(LAB_ARGS)

clean:
	rm -rf $(VENV) results/demo

# On a GPU machine without network (no .venv: wheels in .whl/, ../shared/gpu/README.md): pytest -m gpu, the
# benchmark eager and compiled, a compiled training smoke run, within 9 minutes into $OUT or results/gpu_check/<time>
gpu-check:
	bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)
