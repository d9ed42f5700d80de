# airflow-secrets-sidecar: `make run` (demo), `make test` (everything CI runs), `make bench`.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      ?= $(CURDIR)/.venv
PYTHON    := $(VENV)/bin/python
CARGO     ?= cargo
BIN_DEBUG := target/debug/airflow-secrets-sidecar
BIN_REL   := target/release/airflow-secrets-sidecar
export SIDECAR_TEST_PYTHON := $(PYTHON)

.PHONY: help deps venv pg-binaries build run test test-rust test-airflow test-deploy test-pod lint bench clean

help:
	@echo "make run    - the sidecar serving a validated demo connection (local Postgres + moto)"
	@echo "make test   - install what the tests need, then run every test (what CI runs)"
	@echo "make bench  - measure speed and memory, write BENCHMARKS.md"

## --- what the tests need -------------------------------------------------

deps: venv pg-binaries

# moto (the AWS emulator), boto3 and cryptography for the harness, pytest.
venv: $(VENV)/.done
$(VENV)/.done: tests/harness/requirements.txt
	@python3 -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing Debian's python3-venv"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv >/dev/null && \
	  python3 -m venv --clear $(VENV); }
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/harness/requirements.txt
	touch $@

# The Postgres server binaries (initdb, postgres), when this machine lacks them.
pg-binaries:
	@if command -v initdb >/dev/null || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
	  echo "postgres: $$(ls /usr/lib/postgresql/*/bin/initdb 2>/dev/null || command -v initdb)"; \
	else \
	  echo "installing Debian's postgresql package"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq postgresql postgresql-client >/dev/null; \
	fi

## --- the two commands ------------------------------------------------------

build:
	$(CARGO) build

run: deps
	$(CARGO) build --release
	$(PYTHON) tests/harness/devenv.py demo --sidecar $(BIN_REL)

test: deps lint test-rust test-airflow test-deploy test-pod

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings

test-rust: deps
	RUST_LOG=trace $(CARGO) test

# Every supported Airflow line: 2.10, 3.0, 3.1, 3.2, 3.3 (about 10-12 min from scratch).
test-airflow: deps build
	bash deploy/airflow/tests/run.sh

test-deploy: deps
	bash deploy/validate.sh

# The pods of deploy/ run as a kubelet would (bwrap per container), a real Airflow task inside.
test-pod: deps build
	bash deploy/pod-e2e/run.sh

bench: deps
	@command -v wrk >/dev/null || { SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq wrk >/dev/null; }
	$(CARGO) build --release --bin airflow-secrets-sidecar --example hello
	$(PYTHON) tests/bench/bench.py --sidecar $(BIN_REL) --hello target/release/examples/hello

clean:
	rm -rf target $(VENV) build
