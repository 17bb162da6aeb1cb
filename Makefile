# `make run`: set everything up and run the pipeline in process (SQLite, `airflow dags test`).
# `make test`: set everything up (system packages included) and run the tests.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CONF ?= {}
# pytest-xdist: the suite on TEST_WORKERS processes; the cluster tests stay one after another (tests/conftest.py).
TEST_WORKERS ?= 2
PYTEST_ARGS ?= --durations=15 -n $(TEST_WORKERS) --dist loadgroup

.PHONY: setup run sweep test test-prerequisites test-fast bench clean constraints-gpu

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-base.txt constraints.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r requirements.txt -c constraints.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

run: setup
	CONF='$(CONF)' scripts/run_local.sh

# `make sweep CONF='{..., "trials": {"learning_rate": [0.02, 0.04]}}'`: the sweep DAG in process (docs/sweeps.md).
sweep: setup
	ALEXNET_DAG=alexnet_cifar10_sweep CONF='$(CONF)' scripts/run_local.sh

# Chromium and its driver (apt-get, through sudo when not root), PostgreSQL and Redis started.
test-prerequisites:
	scripts/test_prerequisites.sh

test: setup test-prerequisites
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -m "not slow and not cluster" $(PYTEST_ARGS)

bench: setup
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) airflow_home .pytest_cache

# constraints-gpu.txt: the GPU image's pinned resolution (TensorFlow with CUDA, every nvidia-*
# library), kept in step with constraints.txt. Regenerate after changing either requirements file.
constraints-gpu:
	$(PYTHON) scripts/pin_gpu_constraints.py --python $(PYTHON)
