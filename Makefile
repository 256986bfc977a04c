# ditlab: two commands on a fresh machine — `make train` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
FMNIST := /usr/share/datasets/fashion-mnist

.PHONY: install train test test-unit test-slow lint bench clean

install: $(STAMP) fashion-mnist slurm

# Re-installs only when the project's dependencies change. tools/install.py: uv with pip's own index
# settings, and pip itself when uv fails (the two measured: experiments/fmnist_cpu/README.md).
$(STAMP): pyproject.toml tools/install.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) tools/install.py -e '.[dev]'
	touch $(STAMP)

# The offline default dataset (Debian package); installed when missing and we are root.
.PHONY: fashion-mnist
fashion-mnist:
	@if [ ! -d $(FMNIST) ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (apt-get install -y -q dataset-fashion-mnist || (apt-get update -q && apt-get install -y -q dataset-fashion-mnist)) >/dev/null; \
	  else \
	    echo "note: $(FMNIST) is missing; run 'sudo apt-get install dataset-fashion-mnist' for the default dataset"; \
	  fi; \
	fi

# A real SLURM for the tests (tests/slurm_cluster.py starts a private one-node cluster from these
# binaries, its own munge key and conf in a temp dir); installed when missing and we are root. No
# daemon is started or enabled here.
.PHONY: slurm
slurm:
	@if ! [ -x /usr/sbin/slurmctld ] || ! [ -x /usr/sbin/munged ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge || \
	     (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge)) >/dev/null; \
	  else \
	    echo "note: SLURM is missing; run 'sudo apt-get install slurm-wlm munge' for the SLURM tests (they skip without it)"; \
	  fi; \
	fi

train: install
	$(PY) -m ditlab.train experiment=fmnist_cpu

# unit + integration (pyproject's addopts leave out `slow`); its time on 2 cores, test by test:
# experiments/benchmarks/README.md
test: install
	$(PY) -m pytest -q

test-unit: install
	$(PY) -m pytest -q -m unit

test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf outputs multirun .pytest_cache
