# pdp: `make run` starts the sidecar on the demo defaults, `make test` runs everything.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
LISTEN ?= 127.0.0.1:50051
# AuthZEN over HTTP (README, "AuthZEN") next to gRPC.
HTTP_LISTEN ?= 127.0.0.1:8080
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' pdp/__init__.py)
IMAGE ?= pdp:$(VERSION)
OCI_BUILDER ?=  # docker (when its daemon answers), else podman, else buildah; or a path

.PHONY: run test lint proto iso3166 image fuzz bench bench-quick bench-inprocess clean help

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	$(BIN)/python scripts/proto_overlap.py  # xds-protos overwrites other packages' files (grpc/grpc#42830)
	@# pdp's runtime dependencies as wheels, the image's exporters included: tests/test_wheel.py installs the image's way from them, offline.
	$(BIN)/pip wheel --quiet --wheel-dir $(VENV)/wheelhouse '.[otlp,prometheus]'
	rm -f $(VENV)/wheelhouse/pdp-*.whl
	touch $@

run: $(STAMP)  ## start the sidecar on the example rules and the demo GeoIP database
	$(BIN)/pdp serve --listen $(LISTEN) --http-listen $(HTTP_LISTEN) --snapshot file://$(CURDIR)/examples/rules.yaml --geoip-db demo --log-format text

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

image:  ## build the container image IMAGE (default pdp:VERSION) with docker, podman or buildah
	@builder="$(OCI_BUILDER)"; \
	if [ -z "$$builder" ]; then \
	  if command -v docker >/dev/null 2>&1 && docker info >/dev/null 2>&1; then builder=docker; \
	  elif command -v podman >/dev/null 2>&1; then builder=podman; \
	  elif command -v buildah >/dev/null 2>&1; then builder=buildah; \
	  elif command -v docker >/dev/null 2>&1; then \
	    echo "make image: docker is installed but its daemon does not answer (docker info failed):" \
	         "start it, or install podman or buildah, which need none" >&2; exit 2; \
	  else \
	    echo "make image: no OCI image builder on PATH: install docker, podman or buildah" \
	         "(Debian: apt-get install podman), or name one with OCI_BUILDER=..." >&2; exit 2; \
	  fi; \
	fi; \
	echo "$$builder build --tag $(IMAGE) --file Dockerfile ."; \
	"$$builder" build --tag $(IMAGE) --file Dockerfile . || exit 2; \
	echo "built $(IMAGE): push it to your registry, then set the chart's image.repository and image.tag"

iso3166: $(STAMP)  ## regenerate pdp/iso3166.json from pycountry and the demo GeoIP database (about a minute)
	$(BIN)/python scripts/gen_iso3166.py

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
