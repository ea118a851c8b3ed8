# Two entry points: `make run` (set up, then run the quickstart study) and `make test` (set up with the dev
# extras, then run the test suite). Both create .venv with the first python3 (3.10+) on PATH if needed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STUDY  ?= studies/quickstart.toml
PYTEST_ARGS ?=
# test files spread over this many pytest-xdist processes, each file's tests in one of them (--dist loadfile keeps
# a module's fixtures together); the suite alone keeps about one core busy. 0: one process, as plain pytest
PYTEST_WORKERS ?= 2

.PHONY: run test setup setup-dev lint clean sample-folder bytecode

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

setup: $(VENV)/.installed bytecode
setup-dev: $(VENV)/.installed-dev bytecode

# The project's own modules compiled ahead (what `pip install .` does for an installed package, and an editable
# install does not): where PYTHONDONTWRITEBYTECODE is set (CI images, containers) every `hpo` process would
# otherwise compile them again, about 0.2 s of each start. Quick when nothing changed.
bytecode: | $(BIN)/python
	$(BIN)/python -m compileall -q search objectives >/dev/null

run: setup
	$(BIN)/hpo run $(STUDY)

test: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS); rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest: no tests collected"; rc=0; fi; exit $$rc

# scikit-learn's digits as an image folder (data/digits-folder/{train,val}/<digit>/*.png), for
# studies/folder_example.toml: `make sample-folder && .venv/bin/hpo run studies/folder_example.toml`
sample-folder: setup
	$(BIN)/python examples/make_sample_folder.py data/digits-folder

lint: setup-dev
	$(BIN)/ruff check .
	$(BIN)/mypy

clean:
	rm -rf runs .pytest_cache test-artifacts
