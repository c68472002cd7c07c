# The README's commands. Each target creates .venv when missing and installs what it needs itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxeff-installed
SOURCES := $(wildcard csrc/ops/*.cpp csrc/ops/*.h csrc/ops/cpu/*.cpp csrc/ops/cuda/*.cu csrc/ops/cuda/*.cuh)

.PHONY: setup data demo test bench accuracy clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and torchvision come from the package registry (a CUDA build of torch that runs on the CPU);
# the extension is compiled against that torch (--no-build-isolation).
$(STAMP): $(BIN)/python pyproject.toml setup.py $(SOURCES)
	$(BIN)/pip install -q "torch>=2.5" torchvision ninja "setuptools>=64" wheel
	$(BIN)/pip install -q --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

setup: $(STAMP)

# Fashion-MNIST comes from Debian's dataset-fashion-mnist package (no download at run time); installed
# as root, or with sudo when that needs no password; FXEFF_FASHION_MNIST_DIR points to another copy.
FASHION_MNIST_DIR ?= $(or $(FXEFF_FASHION_MNIST_DIR),/usr/share/datasets/fashion-mnist)
data:
	@if [ ! -f "$(FASHION_MNIST_DIR)/t10k-labels-idx1-ubyte.gz" ]; then \
	  SUDO=; [ "$$(id -u)" = 0 ] || SUDO="sudo -n"; \
	  echo "installing Debian's dataset-fashion-mnist"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq dataset-fashion-mnist \
	  || { echo "Fashion-MNIST is missing: run 'sudo apt-get install dataset-fashion-mnist' (or set FXEFF_FASHION_MNIST_DIR)"; exit 1; }; \
	fi

demo: setup data
	$(BIN)/fxeff demo

test: setup data
	$(BIN)/python -m pytest -q -ra tests

bench: setup
	$(BIN)/python benchmarks/focus.py
	$(BIN)/python benchmarks/shift.py
	$(BIN)/python benchmarks/hetconv.py

# docs/accuracy.md and its plots (trained reference models, every pass, recovery fine-tuning; about three hours
# on 2 cores). Each row is saved to docs/accuracy-rows.json (committed); `make accuracy ARGS=--resume` goes on after a stop.
accuracy: setup data
	$(BIN)/python benchmarks/accuracy.py $(ARGS)

clean:
	rm -rf build *.egg-info fxeff/_C*.so
