# Two commands do all the set-up on a fresh machine (Debian, Python 3.11, Java 17):
#   make demo   - create .venv from requirements.lock and run the pipeline on the embedded sample
#   make test   - the same environment, then the test suite (what .ci/run calls)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
export PATH := $(abspath $(BIN)):$(PATH)
export PYSPARK_PYTHON := $(abspath $(BIN))/python
export PYSPARK_DRIVER_PYTHON := $(abspath $(BIN))/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: venv demo test lint bench bench-extract bench-all-pairs clean

venv: $(STAMP)

$(STAMP): requirements.lock setup.cfg
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	# One install of the whole locked stack: installing piecemeal lets pip move numpy.
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cbir demo --output output $(ARGS)

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check cbir_lib jobs tests airflow_dags benchmarks

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(BIN)/pip install --quiet -c requirements.lock -r requirements-bench.txt
	touch $(BENCH_STAMP)

# Benchmarks are run by hand, never in CI; each records its results under benchmarks/results/.
bench: bench-extract bench-all-pairs

bench-extract: $(STAMP)
	$(BIN)/python benchmarks/extract_speed.py

bench-all-pairs: $(BENCH_STAMP)
	$(BIN)/python benchmarks/all_pairs.py --real --n 100000 --n 1000000 $(ARGS)

clean:
	rm -rf output .pytest_cache
