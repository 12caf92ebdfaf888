# Set-up and everyday tasks. `make demo` and `make test` do all set-up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUNS ?= runs
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
FMNIST_DIR := /usr/share/datasets/fashion-mnist

.PHONY: install dataset demo lint test test-all bench bench-foundation bench-analyze bench-prune bench-quantize \
        bench-double-prune bench-double-prune-gpu bench-double-prune-sweep-gpu bench-sparse bench-depth bench-a2e bench-resnet18 bench-resnet18-depth clean

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

# The whole pipeline on LeNet-5 (recipes/demo-lenet5.yaml): train, analyze, prune, quantize, double-prune,
# score, info and export, a few minutes on two CPU cores. Outputs in $(RUNS)/demo.
DEMO := $(RUNS)/demo
DEMO_RECIPE := recipes/demo-lenet5.yaml
demo: install dataset
	@mkdir -p $(DEMO)
	$(BIN)/dnnprune train lenet5 -r $(DEMO_RECIPE) -o $(DEMO)/lenet5.safetensors --force
	$(BIN)/dnnprune analyze $(DEMO)/lenet5.safetensors -r $(DEMO_RECIPE) -o $(DEMO)/lenet5.analysis.json --force
	$(BIN)/dnnprune prune $(DEMO)/lenet5.safetensors -r $(DEMO_RECIPE) --analysis $(DEMO)/lenet5.analysis.json \
		-o $(DEMO)/lenet5-pruned.safetensors --force
	$(BIN)/dnnprune quantize $(DEMO)/lenet5-pruned.safetensors -r $(DEMO_RECIPE) -o $(DEMO)/lenet5-pruned-q.safetensors --force
	$(BIN)/dnnprune double-prune $(DEMO)/lenet5.safetensors -r $(DEMO_RECIPE) -o $(DEMO)/lenet5-sparse.safetensors --force
	$(BIN)/dnnprune quantize $(DEMO)/lenet5-sparse.safetensors -r $(DEMO_RECIPE) -o $(DEMO)/lenet5-sparse-q.safetensors --force
	$(BIN)/dnnprune score $(DEMO)/lenet5.safetensors -r $(DEMO_RECIPE) --no-latency --force
	$(BIN)/dnnprune score $(DEMO)/lenet5-pruned-q.safetensors -r $(DEMO_RECIPE) --force
	$(BIN)/dnnprune info $(DEMO)/lenet5-sparse-q.safetensors --count-nonzero
	$(BIN)/dnnprune export $(DEMO)/lenet5-pruned-q.safetensors -r $(DEMO_RECIPE) -o $(DEMO)/lenet5-pruned-q.onnx --force

lint: install
	$(BIN)/lint-imports
	$(BIN)/ruff check dnnprune tests bench

test: install dataset lint
	$(BIN)/python -m pytest -q -m "not slow"

test-all: install dataset lint
	$(BIN)/python -m pytest -q

# Benchmarks (BENCHMARKS.md). Trained baselines are cached in $(CACHE) and reused.
CACHE := $(RUNS)/cache
BENCH := $(RUNS)/bench
# A cached baseline: $(call train_baseline,ARCH,RECIPE) in a recipe for the target file.
train_baseline = mkdir -p $(CACHE) && $(BIN)/dnnprune train $(1) -r $(2) -o $@ --force

bench: bench-foundation bench-analyze bench-prune bench-quantize bench-double-prune bench-sparse bench-depth bench-a2e bench-resnet18 bench-resnet18-depth

bench-foundation: install dataset
	@mkdir -p $(BENCH)
	$(BIN)/dnnprune train lenet5 -r recipes/demo-lenet5.yaml -o $(BENCH)/lenet5.safetensors --force

$(CACHE)/vgg16_bn-fmnist.safetensors: | install dataset
	$(call train_baseline,vgg16_bn,recipes/vgg16-fmnist.yaml)

$(CACHE)/resnet56-fmnist.safetensors: | install dataset
	$(call train_baseline,resnet56,recipes/resnet56-fmnist.yaml)

$(CACHE)/resnet20-fmnist.safetensors: | install dataset
	$(call train_baseline,resnet20,recipes/resnet20-fmnist.yaml)

$(CACHE)/mobilenetv2-fmnist.safetensors: | install dataset
	$(call train_baseline,mobilenetv2_cifar,recipes/mobilenetv2-fmnist.yaml)

$(CACHE)/mobilenetv3s-fmnist.safetensors: | install dataset
	$(call train_baseline,torchvision.mobilenet_v3_small,recipes/mobilenetv3s-fmnist.yaml)

$(CACHE)/resnet18-import/resnet18.safetensors: | install dataset
	$(BIN)/python bench/resnet18_import.py --steps 2000 --out $(CACHE)/resnet18-import

$(CACHE)/alexnet-fmnist.safetensors: | install dataset
	$(call train_baseline,alexnet,recipes/alexnet-fmnist.yaml)

$(CACHE)/vgg16_bn-fmnist.analysis.json: $(CACHE)/vgg16_bn-fmnist.safetensors
	$(BIN)/dnnprune analyze $< -o $@ --samples 2000 --force

$(CACHE)/resnet18.analysis.json: $(CACHE)/resnet18-import/resnet18.safetensors
	$(BIN)/dnnprune analyze $< -o $@ --samples 2000 --force

$(CACHE)/resnet56-fmnist.layers.json: $(CACHE)/resnet56-fmnist.safetensors
	$(BIN)/dnnprune analyze $< --granularity layer -o $@ --samples 3000 --force

$(CACHE)/shuttle.csv: | install
	apt-get install -y -qq r-cran-mlbench >/dev/null
	Rscript -e 'library(mlbench); data(Shuttle); s <- Shuttle[Shuttle$$Class != "High",]; s$$Class <- ifelse(s$$Class == "Rad.Flow", 0, 1); write.csv(s, "$@", row.names=FALSE)'

bench-analyze: $(CACHE)/vgg16_bn-fmnist.analysis.json
	$(BIN)/python bench/analyze_vgg.py --linearity --out $(BENCH)/analyze

bench-prune: $(CACHE)/vgg16_bn-fmnist.analysis.json
	$(BIN)/python bench/prune_compare.py $(CACHE)/vgg16_bn-fmnist.safetensors -r recipes/prune-vgg16-fmnist.yaml --seeds 0,1,2 --out $(BENCH)/prune-vgg16

bench-resnet18: $(CACHE)/resnet18.analysis.json
	$(BIN)/python bench/prune_compare.py $(CACHE)/resnet18-import/resnet18.safetensors -r recipes/prune-resnet18-fmnist.yaml --seeds 0,1,2 --out $(BENCH)/prune-resnet18

$(CACHE)/resnet18.layers.json: $(CACHE)/resnet18-import/resnet18.safetensors
	$(BIN)/dnnprune analyze $< --granularity layer -o $@ --samples 3000 --force

# Blocks first, then channels, to the same 3.78x and 600 fine-tune steps; the bench analyses each seed's
# depth-pruned model itself.
bench-resnet18-depth: $(CACHE)/resnet18.layers.json
	$(BIN)/python bench/prune_compare.py $(CACHE)/resnet18-import/resnet18.safetensors -r recipes/prune-resnet18-width-fmnist.yaml \
	    --depth-recipe recipes/prune-resnet18-depth-fmnist.yaml --seeds 0,1,2 --out $(BENCH)/prune-resnet18-depth

bench-depth: $(CACHE)/resnet56-fmnist.layers.json
	$(BIN)/python bench/prune_compare.py $(CACHE)/resnet56-fmnist.safetensors -r recipes/prune-resnet56-depth.yaml --arms dnnprune,control --out $(BENCH)/depth-resnet56

SWEEP_BASELINES := $(CACHE)/vgg16_bn-fmnist.safetensors $(CACHE)/resnet20-fmnist.safetensors \
	$(CACHE)/resnet56-fmnist.safetensors $(CACHE)/mobilenetv2-fmnist.safetensors $(CACHE)/mobilenetv3s-fmnist.safetensors

bench-double-prune: $(SWEEP_BASELINES)
	$(BIN)/python bench/double_prune.py $< -r recipes/double-prune-vgg16.yaml --seeds 0,1,2 --out $(BENCH)/double-prune
	$(BIN)/python bench/double_prune.py --sweep bench/double-prune-sweep.yaml --out $(BENCH)/double-prune-sweep

# On a CUDA GPU: the converged VGG-16 baseline and the 3-seed headline, all arms at once (4 minutes on
# one H200), and the five-model sweep on 12-epoch baselines (longer than one 10-minute GPU call).
bench-double-prune-gpu: install dataset
	PYTHON=$(BIN)/python bench/double_prune_gpu.sh $(BENCH)/double-prune-long

bench-double-prune-sweep-gpu: install dataset
	PYTHON=$(BIN)/python bench/double_prune_sweep_gpu.sh $(BENCH)/double-prune-sweep-long

bench-sparse: install
	OMP_NUM_THREADS=1 $(BIN)/python bench/sparse_linear.py --out $(BENCH)/sparse-linear.json

bench-a2e: $(CACHE)/shuttle.csv
	$(BIN)/python bench/a2e.py anomaly-fmnist --classes 0,1,2,3,4,5,6,7,8,9 --out $(BENCH)/a2e
	$(BIN)/python bench/a2e.py classify-fmnist --out $(BENCH)/a2e
	$(BIN)/python bench/a2e.py classify-shared-fmnist --out $(BENCH)/a2e
	$(BIN)/python bench/a2e.py anomaly-csv --csv $(CACHE)/shuttle.csv --normal 0 --out $(BENCH)/a2e

# The prune -> quantize chains against the paper's 47.28x (AlexNet) and 35.21x (VGG-16): each pruned model
# next to its control (the baseline fine-tuned with the same steps), then quantized and scored on test.
chain = $(BIN)/python bench/prune_compare.py $(1) -r $(2) --arms dnnprune,control --out $(BENCH)/$(3) && \
	$(BIN)/dnnprune quantize $(BENCH)/$(3)/dnnprune-seed0.safetensors -r recipes/quantize-fc5-conv8.yaml \
		-o $(BENCH)/$(3)/dnnprune-seed0-q.safetensors --force && \
	$(BIN)/dnnprune score $(BENCH)/$(3)/dnnprune-seed0-q.safetensors --no-latency --force

bench-quantize: $(CACHE)/alexnet-fmnist.safetensors $(CACHE)/vgg16_bn-fmnist.analysis.json
	@mkdir -p $(BENCH)
	$(BIN)/dnnprune quantize $(CACHE)/vgg16_bn-fmnist.safetensors -r recipes/quantize-fc5-conv8.yaml -o $(BENCH)/quantize/vgg16-q.safetensors --force
	$(call chain,$(CACHE)/alexnet-fmnist.safetensors,recipes/prune-alexnet-fmnist.yaml,chain-alexnet)
	$(call chain,$(CACHE)/vgg16_bn-fmnist.safetensors,recipes/prune-vgg16-params.yaml,chain-vgg16)

clean:
	rm -rf $(RUNS) .pytest_cache
