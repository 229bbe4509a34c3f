# Two commands for a fresh machine: `make demo` and `make test`. Both reuse .venv once built.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU build of torch on this project's machines; on a GPU node pre-install your CUDA build
# into the venv (or pass TORCH_SPEC=torch) before running make.
TORCH_SPEC ?= torch==2.13.0

.PHONY: venv test lint

venv: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	@echo ">> creating the virtual environment in $(VENV) and installing requirements"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt -r requirements-dev.txt
	@touch $@

test: venv
	@echo ">> running the test suite"
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check .
