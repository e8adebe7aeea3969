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

.PHONY: venv demo test test-fast test-faults lint browser bench bench-extract bench-all-pairs bench-quality bench-finetune clean

venv: $(STAMP)

$(STAMP): requirements.lock setup.cfg
	$(PYTHON) -m venv $(VENV)
	# setuptools stays below 70: petastorm 0.13.1 declares setuptools<70 (pip check flags newer).
	$(BIN)/pip install --quiet --upgrade pip wheel "setuptools==69.5.1"
	# One install of the whole locked stack: installing piecemeal lets pip move numpy.
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/cbir demo --output output $(ARGS)

test: lint browser
	$(BIN)/python -m pytest -m "not matrix" --durations=15 $(PYTEST_ARGS)

# The fast tier: pure cores and local[2] adapters, no end-to-end job runs (pytest -m "not slow").
test-fast: lint
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The fault-injection suite with the whole kill -9 matrix (tests/faults, ~12 min here).
test-faults: $(STAMP)
	$(BIN)/python -m pytest tests/faults $(PYTEST_ARGS)

# The gallery test drives a real headless Chromium: Debian's chromium + chromium-driver.
browser:
	@command -v chromedriver >/dev/null 2>&1 && command -v chromium >/dev/null 2>&1 || \
	  { (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "make browser: could not install chromium (not root?); the browser test will skip"; }

lint: $(STAMP)
	$(BIN)/ruff check cbir_lib jobs tests airflow_dags benchmarks
	$(BIN)/ruff format --check cbir_lib jobs tests airflow_dags benchmarks
	$(BIN)/mypy

BENCH_STAMP := $(VENV)/.bench-installed

$(BENCH_STAMP): $(STAMP) requirements-bench.txt
	$(BIN)/pip install --quiet -c requirements.lock -r requirements-bench.txt
	touch $(BENCH_STAMP)

# Benchmarks are run by hand, never in CI; each records its results under benchmarks/results/.
bench: bench-extract bench-all-pairs bench-quality bench-finetune

bench-extract: $(STAMP)
	$(BIN)/python benchmarks/extract_speed.py

bench-all-pairs: $(BENCH_STAMP)
	# --fashion needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist).
	$(BIN)/python benchmarks/all_pairs.py --fashion --real --n 100000 --n 1000000 --lsh-max-n 50000 $(ARGS)
	$(BIN)/python benchmarks/reduced_pass.py --data fashion

bench-quality: $(STAMP)
	$(BIN)/python benchmarks/quality.py $(ARGS)

bench-finetune: $(STAMP)
	$(BIN)/python benchmarks/finetune.py $(ARGS)

clean:
	rm -rf output .pytest_cache
