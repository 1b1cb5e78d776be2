# pdp: `make run` starts the sidecar on the demo defaults, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051

.PHONY: run test lint proto fuzz bench bench-quick bench-inprocess clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(STAMP)  ## start the sidecar on the example rules and the demo GeoIP database
	$(BIN)/pdp serve --listen $(LISTEN) --snapshot file://$(CURDIR)/examples/rules.yaml --geoip-db demo --log-format text

test: $(STAMP)  ## lint, type-check and run the whole test suite
	$(MAKE) --no-print-directory lint
	$(BIN)/pytest

lint: $(STAMP)  ## ruff, mypy --strict, and buf lint, format and breaking on proto/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python scripts/check_proto.py

proto: $(STAMP)  ## regenerate pdp/_proto/ from proto/
	$(BIN)/python scripts/gen_proto.py

bench-inprocess: $(STAMP)  ## decision cost in µs on the real GeoLite2-City
	$(BIN)/python -m benchmarks.inprocess

fuzz: $(STAMP)  ## longer fuzzing of the snapshot parser and the request handler
	PDP_FUZZ_EXAMPLES=50000 $(BIN)/pytest tests/test_fuzz.py -p no:cacheprovider --timeout 3600

bench: $(STAMP)  ## the full benchmark suite (about 10 minutes): benchmarks/results/<date>.{json,md,png}
	$(BIN)/python -m benchmarks.suite

bench-quick: $(STAMP)  ## the suite with fewer repeats (under 2 minutes)
	$(BIN)/python -m benchmarks.suite --quick

clean:  ## remove the virtualenv and caches
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
