# Two commands for a newcomer: `make demo` and `make test`.
# Both create (or reuse) a local virtualenv in .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint format bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The oldest Django the package supports (pyproject: Django>=4.2), for its Django tests.
OLDEST ?= .venv-django42
$(OLDEST)/.installed: pyproject.toml
	$(PYTHON) -m venv $(OLDEST)
	$(OLDEST)/bin/pip install --quiet --upgrade pip
	$(OLDEST)/bin/pip install --quiet -e '.[dev]' 'Django==4.2.*'
	touch $@

demo: $(STAMP)
	$(BIN)/python example_project/demo.py

test: $(STAMP) $(OLDEST)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest
	METER_TEST_DB=postgres $(BIN)/pytest tests/django_app
	$(OLDEST)/bin/pytest tests/django_app

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_compat.py
	$(BIN)/python benchmarks/bench_delivery.py
	$(BIN)/python benchmarks/bench_asgi.py
	$(BIN)/python benchmarks/bench_loop_lag.py

clean:
	rm -rf $(VENV) $(OLDEST) .mypy_cache .pytest_cache .ruff_cache build dist *.egg-info
