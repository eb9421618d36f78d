# Two commands a newcomer needs: `make bench` and `make test`. Each creates .venv on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv bench readme-table demo test lint typecheck docs clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,bench]"
	touch $@

venv: $(BIN)/.installed

bench: venv
	$(BIN)/datatrace bench --json out/bench.json --out out

# the results tables of README.md and docs/ (benchmarks.md, choosing.md), regenerated from the stored JSON of the
# default run (docs/results/bench-default.json: `datatrace bench --json` of `make bench`)
readme-table: venv
	$(BIN)/python -m datatrace.bench.report --update README.md docs/*.md

demo: venv
	$(BIN)/python -m datatrace.demo

test: venv
	$(BIN)/python -m pytest tests

lint: venv
	$(BIN)/ruff check src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples

typecheck: venv
	$(BIN)/mypy

# the documentation site (mkdocs.yml), into out/site; warnings fail the build
docs: venv
	$(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV)
