# edgec: the two commands of the README.
#   make demo   set everything up on a fresh machine and compile the bundled example
#   make test   the test suite (.ci/run calls exactly this)
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
EDGEC := $(VENV)/bin/edgec
STAMP := $(VENV)/.edgec-installed
export PIP_CACHE_DIR ?= $(HOME)/.cache/edgec/pip
# tool:debian-package pairs: the ARM targets' cross compilers, and qemu-user for the emulated boards
# (qemu-user-static runs them; Debian's dynamic qemu-user also loads the instruction-counting plugin)
CROSS_TOOLS := arm-linux-gnueabihf-g++:g++-arm-linux-gnueabihf aarch64-linux-gnu-g++:g++-aarch64-linux-gnu \
	qemu-arm-static:qemu-user-static qemu-aarch64-static:qemu-user-static \
	qemu-arm:qemu-user qemu-aarch64:qemu-user gcc:gcc
DEMO := build/examples

.PHONY: setup toolchains demo test clean

setup: $(STAMP) toolchains

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

toolchains:
	@missing=""; \
	for pair in $(CROSS_TOOLS); do command -v $${pair%%:*} >/dev/null || missing="$$missing $${pair##*:}"; done; \
	if [ -n "$$missing" ]; then \
	  sudo=""; [ "$$(id -u)" = 0 ] || sudo=sudo; \
	  missing=$$(echo $$missing | tr " " "\n" | sort -u | tr "\n" " "); \
	  echo "installing Debian packages: $$missing"; \
	  $$sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq $$missing >/dev/null; \
	fi

demo: setup
	$(PY) examples/mobilenet_v2.py -o $(DEMO)/mobilenet_v2.pt
	$(EDGEC) compile $(DEMO)/mobilenet_v2.pt --input-shape 1,3,224,224 -t x86 -o $(DEMO)/mobilenet_v2_x86
	$(EDGEC) compile $(DEMO)/mobilenet_v2.pt --input-shape 1,3,224,224 -t cortex-a7 -o $(DEMO)/mobilenet_v2_cortex-a7
	$(EDGEC) run $(DEMO)/mobilenet_v2_x86 --random -o $(DEMO)/output.npy
	$(PY) examples/summary.py $(DEMO)/mobilenet_v2_x86 $(DEMO)/mobilenet_v2_cortex-a7

# pytest exits 5 when it collects no test: a run that tested nothing is a failure, and says so.
test: setup
	@$(PY) -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; fi; exit $$rc

clean:
	rm -rf build .pytest_cache

# edgec vs PyTorch eager and ONNX Runtime on this machine (bench/compare.py; BENCH_ARGS=--tune-trials N adds tuned)
.PHONY: bench
bench: setup
	$(PY) bench/compare.py $(BENCH_ARGS)
