# Convenience targets; each is also written out in the README for machines without make.
PYTHON ?= python3
WORKDIR ?= runs/omniglot_5w1s
PRESET ?= omniglot_5w1s
DATA_DIR ?=
BENCH_OUT ?= results/benchmarks/latest.json
DATA_FLAG := $(if $(DATA_DIR),--data_dir=$(DATA_DIR),)

.PHONY: install test train evaluate bench

install:
	$(PYTHON) -m pip install -e '.[test]'

test: install
	$(PYTHON) -m pytest -q

train:
	$(PYTHON) -m pip install -e .
	$(PYTHON) -m experiments.train --preset=$(PRESET) --workdir=$(WORKDIR) $(DATA_FLAG)
	$(PYTHON) -m experiments.evaluate --workdir=$(WORKDIR)

evaluate:
	$(PYTHON) -m experiments.evaluate --workdir=$(WORKDIR)

bench:
	$(PYTHON) -m experiments.benchmark --all --output=$(BENCH_OUT)
