# Two entry points for a new user: `make demo` (the main job) and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
OUT ?= runs/demo
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: setup data demo demo-report test lint format bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	$(BIN)/pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"

data:
	@test -f $(FMNIST) || { (command -v sudo >/dev/null && sudo apt-get update -qq || apt-get update -qq) && \
	  (command -v sudo >/dev/null && sudo apt-get install -y -qq dataset-fashion-mnist || apt-get install -y -qq dataset-fashion-mnist); }

demo: setup data
	$(BIN)/hf-permerge run configs/fmnist_mlp_2x512.yaml --output-dir $(OUT) --overwrite

demo-report: setup data
	$(BIN)/python benchmarks/demo_report.py

test: setup data
	$(BIN)/python -m pytest tests

lint: setup
	bash .ci/lint

format: setup
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

bench: setup data
	$(BIN)/python benchmarks/run_benchmarks.py

clean:
	rm -rf $(VENV) runs
