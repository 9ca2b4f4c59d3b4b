# Every target creates/refreshes the virtual environment on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel by default; on a GPU box: make TORCH_SPEC="torch" (or install your CUDA build into .venv first).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.avfuse-installed

.PHONY: venv test lint demo bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev,cluster,ast]"
	touch $(STAMP)

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m ruff format --check src tests benchmarks
	$(PY) -m mypy

# The training and predict tests again at 16 torch threads: oneDNN defects that corrupt the heap
# show with many threads, whatever the core count (tests/conftest.py reads AVFUSE_TEST_THREADS).
THREADED_TESTS := tests/test_predict.py \
	tests/test_scoring.py::test_score_videos_aggregates_windows_per_video \
	tests/test_train.py::test_best_checkpoint_only_from_validated_epochs \
	tests/test_train.py::test_killed_run_resumes_to_identical_weights

test: lint
	$(PY) -m pytest -q
	AVFUSE_TEST_THREADS=16 $(PY) -m pytest -q $(THREADED_TESTS)

demo: $(STAMP)
	$(VENV)/bin/avfuse demo --work demo-work

BENCH_STAMP := $(VENV)/.avfuse-bench-installed

$(BENCH_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,cluster,ast,bench]"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.bench_extract
	$(PY) -m benchmarks.bench_melspec
	$(PY) -m benchmarks.bench_store
	$(PY) -m benchmarks.bench_train
	$(PY) -m benchmarks.bench_fuse
	$(PY) -m benchmarks.bench_scale --videos 20000

clean:
	rm -rf demo-work .pytest_cache .mypy_cache .ruff_cache
