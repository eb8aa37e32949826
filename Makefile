# The two commands that do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.14.1

.PHONY: install ext test test-min-diffusers demo lint clean

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

# pytest-xdist: one worker per core (`-n auto`); loadfile runs each file's tests on one worker, so
# module fixtures (the 2-rank launch, the ahead-of-time compiles) run once.
XDIST := -n auto --dist loadfile

test: install ext
	$(PY) -m pytest -q $(XDIST)
	$(MAKE) test-min-diffusers

# The oldest diffusers cat_pruning supports (python/cat_pruning/compat.py), installed beside the
# venv and put first on PYTHONPATH: the equivalence and pipeline tests of every family, the tiny
# model and the command line on it (the forecast_from="all"/"rebase" store variants run on the newest only:
# it changes the cache store, not the diffusers seams).
DIFFUSERS_MIN := $(shell sed -n 's/^DIFFUSERS_MIN = "\(.*\)"/\1/p' python/cat_pruning/compat.py)
MIN_DIR := build/diffusers-$(DIFFUSERS_MIN)
test-min-diffusers: install
	test -d $(MIN_DIR) || ( $(PY) -m pip install -q --no-deps --target $(MIN_DIR).tmp diffusers==$(DIFFUSERS_MIN) \
		&& $(PY) -m pip install -q --target $(MIN_DIR).tmp httpx && mv $(MIN_DIR).tmp $(MIN_DIR) )
	CAT_EXPECT_DIFFUSERS=$(DIFFUSERS_MIN) PYTHONPATH=$(MIN_DIR) $(PY) -m pytest -q $(XDIST) tests/models tests/test_cli.py \
		-k "(keep_ratio_one or oracle or pipeline or tiny or cli) and not from-all and not from-rebase and not order-1 and not fused" -p no:cacheprovider

# The shipped models: the scene model (SD3 architecture), the photo model (Flux architecture) and
# the video model (Wan architecture: animated GIFs).
demo: install
	$(PY) -m cat_pruning demo --model tiny --out out/demo/tiny
	$(PY) -m cat_pruning demo --model photos --out out/demo/photos
	$(PY) -m cat_pruning demo --model video --out out/demo/video

lint: install
	$(PY) -m ruff check .

clean:
	rm -rf build dist *.egg-info
