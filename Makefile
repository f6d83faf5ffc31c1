# rkd: the two set-up commands of the README are `make demo` and `make test`.
# Both create .venv (seeing system site-packages, so a torch that is already installed, e.g. a GPU
# build, is reused), install torch 2.13.0 (CPU build) only when no torch is importable, then build and
# install rkd with its C++ extension (and its CUDA extension where a CUDA toolkit and torch exist).
# The tests also cover the Hugging Face and Lightning adapters, so the hf and lightning extras come along
# (about 30 s and 210 MB on top of torch).

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.rkd-installed
SOURCES := $(shell find rkd_engine kernels csrc -type f \( -name '*.py' -o -name '*.cpp' -o -name '*.h' -o -name '*.cu' \) 2>/dev/null) setup.py pyproject.toml
DEMO_OUT ?= demo_out
PYTEST_ARGS ?=

.PHONY: install test demo bench lint clean

$(PY):
	python3 -m venv --system-site-packages $(VENV)

$(STAMP): $(PY) $(SOURCES)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -c "import triton" 2>/dev/null || $(PY) -m pip install -q triton
	$(PY) -m pip install -q --no-build-isolation -e ".[test,hf,lightning]"
	$(PY) -c "import rkd_engine, rkd_engine.ops as o; print('rkd backends here:', o.explain_backends())"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(VENV)/bin/rkd demo --out $(DEMO_OUT)

bench: $(STAMP)
	$(PY) benchmarks/bench_loss.py

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf build *.egg-info rkd_engine/*.so $(STAMP)
