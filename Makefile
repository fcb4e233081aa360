# The two set-up commands of the README:
#   make run    install into .venv and start the embedded cluster (SQLite, local files, tiny
#               models, CPU) with the API on http://127.0.0.1:8000/api/v2/
#   make test   install into .venv (or reuse it) and run the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# Serve's HAProxy ingress; must be in the environment of the process that starts Ray.
SERVE_ENV := RAY_SERVE_ENABLE_HA_PROXY=1 RAY_SERVE_THROUGHPUT_OPTIMIZED=1

.PHONY: run test install bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned in pyproject.toml (2.13.0, the CPU wheel found through PIP_FIND_LINKS here).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# `rayhorde run` (cluster/run_cli.py) is `serve run --address local` (a fresh Ray for this
# cluster, on a free port, never 6379, instead of joining some other Ray on the machine) with
# Serve's HAProxy switched on, and SIGTERM (systemd, container runtimes) stopping everything it
# started the way Ctrl-C does, HAProxy included.
run: install
	mkdir -p data
	$(BIN)/rayhorde run configs/local.yaml

# scripts/test-services.sh starts PostgreSQL and Redis when they are down and installs
# Debian's chromium (the web page's browser test) when it is missing.
test: install
	bash scripts/test-services.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# Benchmarks print their figures; they reset the tables of the database they are given
# (BENCH_DB, a scratch PostgreSQL database), so never point them at a live one.
BENCH_DB ?= postgresql://postgres@127.0.0.1:5432/test
bench: install
	$(BIN)/python bench/statements.py --url $(BENCH_DB)
	$(BIN)/python bench/queue_depth.py --url $(BENCH_DB)
	$(SERVE_ENV) $(BIN)/python bench/api_latency.py --url $(BENCH_DB)
	$(SERVE_ENV) $(BIN)/python bench/pop_latency.py --url $(BENCH_DB)
	$(BIN)/python bench/pop_inprocess.py --url $(BENCH_DB)
	$(BIN)/python bench/submit_inprocess.py --url $(BENCH_DB)
	$(SERVE_ENV) $(BIN)/python bench/whole_path.py
	$(SERVE_ENV) $(BIN)/python bench/workflows.py
	$(SERVE_ENV) $(BIN)/python bench/workflow_graphs.py
	$(BIN)/python bench/lora_switch.py
	$(BIN)/python bench/llm_throughput.py
	$(SERVE_ENV) $(BIN)/python bench/volunteer_nodes.py
	$(BIN)/python bench/postprocess_safety.py
	$(BIN)/python bench/fuzz_openapi.py --db-url $(BENCH_DB)
	$(SERVE_ENV) $(BIN)/python bench/load.py --start serve --db-url $(BENCH_DB) --clients 200 --seconds 60
