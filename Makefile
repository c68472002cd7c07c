# The README's commands. Each target creates .venv when missing and installs what it needs itself.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fxeff-installed
SOURCES := $(wildcard csrc/ops/*.cpp csrc/ops/*.h csrc/ops/cpu/*.cpp csrc/ops/cuda/*.cu)

.PHONY: setup demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# torch and torchvision come from the package registry (a CUDA build of torch that runs on the CPU);
# the extension is compiled against that torch (--no-build-isolation).
$(STAMP): $(BIN)/python pyproject.toml setup.py $(SOURCES)
	$(BIN)/pip install -q "torch>=2.5" torchvision ninja "setuptools>=64" wheel
	$(BIN)/pip install -q --no-build-isolation -e ".[test,demo]"
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/fxeff demo

test: setup
	$(BIN)/python -m pytest -q -ra tests

bench: setup
	$(BIN)/python benchmarks/focus.py
	$(BIN)/python benchmarks/shift.py
	$(BIN)/python benchmarks/hetconv.py

clean:
	rm -rf build *.egg-info fxeff/_C*.so
