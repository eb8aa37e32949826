"""Shared test setup: Triton runs in its CPU interpreter when no GPU is present; hardware
skips live here (marker `gpu`), not scattered through the tests."""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before triton decorates the kernels, i.e. before cat_kernels is imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Two threads per test process at most; under pytest-xdist (`make test` runs `-n auto`) the cores
# are shared between the workers instead, so they do not oversubscribe the machine.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, (os.cpu_count() or 1) // _WORKERS)))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_configure(config):
    # `make test-min-diffusers` runs the model tests on the oldest supported diffusers; make sure
    # that is what imports, or the run would silently test the venv's newest one again.
    expected = os.environ.get("CAT_EXPECT_DIFFUSERS")
    if expected:
        import diffusers

        if diffusers.__version__ != expected:
            raise pytest.UsageError(f"expected diffusers {expected}, imported {diffusers.__version__}")
