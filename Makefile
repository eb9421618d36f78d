# Two commands a newcomer needs: `make bench` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv bench demo test lint typecheck clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

venv: $(BIN)/.installed

bench: venv
	$(BIN)/datatrace bench --json out/bench.json --out out

demo: venv
	$(BIN)/python -m datatrace.demo

test: venv
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: venv
	$(BIN)/mypy

clean:
	rm -rf $(VENV)
