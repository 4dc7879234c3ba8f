# The two commands a newcomer runs: `make demo` and `make test`. Everything else is a building block.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: help venv lint generate check-generated unit integration trainer-tests test demo clean

help:
	@echo "make demo   - run the main example job end to end"
	@echo "make test   - lint, type-check and run every test tier"

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[operator,trainer,dev]'
	touch $@

venv: $(VENV)/.installed

generate: venv  ## regenerate the CRD in manifests/ and the chart from the API models
	$(PY) -m finetune_api.crd
	$(PY) -m finetune_api.docs

check-generated: venv
	$(PY) -m finetune_api.crd --check
	$(PY) -m finetune_api.docs --check

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy api operator trainer-image cli

unit: venv
	$(PY) -m pytest tests/unit -q

trainer-tests: venv
	$(PY) -m pytest tests/trainer -q

integration: venv k8s-binaries
	$(PY) -m pytest tests/integration -q

test: venv k8s-binaries
	$(MAKE) lint check-generated
	$(PY) -m pytest tests -q

demo: venv
	$(PY) -m finetune_cli.main demo

.PHONY: bench bench-operator bench-train bench-data bench-storage bench-submit bench-gang
BENCH_ARGS ?=
bench: bench-operator bench-train bench-data bench-storage bench-submit bench-gang  ## every benchmark; results go to docs/benchmarks.md

bench-operator: venv k8s-binaries  ## the operator at scale on the real control plane, e.g. BENCH_ARGS=--quick
	$(PY) bench/operator_bench.py $(BENCH_ARGS)

bench-train: venv  ## training tokens/s on CPU: ours vs a plain Trainer (max-length / per-batch padding)
	$(PY) bench/train_bench.py $(BENCH_ARGS)

bench-data: venv  ## data preparation: tokenise + pack, ours vs the seeds' datasets.map/group_texts, s per GB
	$(PY) bench/data_bench.py $(BENCH_ARGS)

bench-storage: venv  ## checkpoint blocking, and upload/download via the storage layer vs plain boto3 (local S3)
	$(PY) bench/storage_bench.py $(BENCH_ARGS)

bench-submit: venv k8s-binaries  ## submit -> first training step by stage on the local cluster, vs a plain Job
	$(PY) bench/submit_bench.py $(BENCH_ARGS)

bench-gang: venv k8s-binaries  ## a 2-pod gang vs 1 pod on the local cluster: apply -> first step, tokens/s
	$(PY) bench/gang_bench.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

include scripts/control-plane.mk
include scripts/cluster.mk
