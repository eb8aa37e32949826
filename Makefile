# The two commands that do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1

.PHONY: install ext test demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the tested release first so pip does not pull another one.
install: $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"

# The compiled extension cat_kernels._C, in place; fails when csrc/ does not compile (CUDA
# sources for sm_80 and sm_90 when nvcc is here). Cached in build/ext/: a rerun only relinks.
ext: install
	PY=$(PY) tools/check_cuda_build.sh

test: install ext
	$(PY) -m pytest -q

demo: install
	$(PY) -m cat_pruning demo

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf build dist *.egg-info
