# The two commands that do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1

.PHONY: install test demo lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the tested release first so pip does not pull another one.
install: $(PY)
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[test]"

test: install
	$(PY) -m pytest -q

demo: install
	$(PY) bench/run.py --suite kernels --device cpu

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf build dist *.egg-info
