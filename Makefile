# SpecRelay developer commands. Everything runs inside .venv, created on first use with the
# local CPU torch wheel installed *before* the project (a bare torch requirement pulls CUDA).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Test workers (pytest-xdist): most of the suite is single-threaded (process start-up, imports, Python), so 2 workers on a
# 2-core box take ~13 min where one took ~28 (each worker and its processes get one thread: tests/conftest.py).
TEST_WORKERS ?= 2

.PHONY: setup demo test test-fast test-sglang test-vllm deploy-check proto bench bench-smoke clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m draft_trainer.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS)

# SGLang backend lane: its own venv (.venv-sglang, see tests/sglang_lane/setup.sh).
test-sglang:
	bash tests/sglang_lane/run.sh

# vLLM serving lane: its own venv (.venv-vllm, see tests/vllm_lane/setup.sh).
test-vllm:
	bash tests/vllm_lane/run.sh

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

# Static and live checks of deploy/ (installs Debian prometheus + docker-compose if missing).
deploy-check: $(STAMP)
	bash .ci/deploy-tools.sh
	$(BIN)/python -m pytest -q tests/deploy

# Every CPU benchmark at full size (bounded: each script has a time limit, see docs/benchmarks.md)
# -> benchmarks/results/*.json + docs/benchmarks.md. bench-smoke: tiny sizes, proves each still runs.
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

bench-smoke: $(STAMP)
	$(BIN)/python -m benchmarks.run_all --smoke --out runs/bench-smoke

proto: $(STAMP)
	$(BIN)/python -m common.rpc.generate

clean:
	rm -rf runs .pytest_cache
