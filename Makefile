# Set-up and everyday tasks. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install dataset demo test test-all bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_PINS)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# Debian ships Fashion-MNIST as a package; elsewhere pass --data-root or --download.
dataset:
	@if [ -d $(FMNIST_DIR) ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) || \
		echo "could not install dataset-fashion-mnist; tests that need it will skip"; \
	else echo "Fashion-MNIST not found at $(FMNIST_DIR); tests that need it will skip"; fi

demo: install dataset
	@mkdir -p $(RUNS)/demo
	$(BIN)/dnnprune train lenet5 -r recipes/demo-lenet5.yaml -o $(RUNS)/demo/lenet5.safetensors --force
	$(BIN)/dnnprune score $(RUNS)/demo/lenet5.safetensors -r recipes/demo-lenet5.yaml

test: install dataset
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install dataset
	$(BIN)/python -m pytest -q

bench: install dataset
	$(BIN)/python bench/run.py all

clean:
	rm -rf $(RUNS) .pytest_cache
