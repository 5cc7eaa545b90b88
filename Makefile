# lipdp: `make demo` runs the main job, `make test` runs the suite. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=
# Two workers (one per core), whole test files per worker (torchrun and cache tests stay in one process each).
PARALLEL ?= -n 2 --dist loadfile

.PHONY: setup demo test test-quick clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/install_data.sh
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	bash scripts/install_data.sh $(PY)
	touch $@

demo: setup
	$(PY) -m lipdp.cli demo

test: setup
	$(PY) -m pytest $(PARALLEL) $(PYTEST_ARGS)

test-quick: setup
	$(PY) -m pytest -m "not slow" $(PARALLEL) $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
