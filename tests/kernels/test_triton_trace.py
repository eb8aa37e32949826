"""Inductor sees the Triton kernels (issue 21 item 3): under torch.compile's AOT stage every
public op on CUDA tensors becomes its Triton launches (``torch.library.triton_op`` +
``wrap_triton``), not an opaque custom op, and Triton's analysis finds exactly the arguments each
kernel writes, so Inductor clones nothing else. Traced on fake CUDA tensors, no GPU needed
(triton_trace_worker.py, in a fresh process without TRITON_INTERPRET)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cat_kernels import backend

if not backend.triton_available() or not hasattr(torch.library, "triton_op"):
    pytest.skip("needs triton and torch.library.triton_op (torch >= 2.6)", allow_module_level=True)

# op -> its launches: (kernel, the pointer arguments it writes)
EXPECTED = {
    "token_stats": [("_token_stats_kernel", ["cmax_ptr", "d_ptr"]), ("_cluster_score_kernel", ["score_ptr"])],
    "select_tokens": [("_rank_tokens_kernel", ["scratch_ptr"]),
                      ("_select_tokens_kernel", ["idx_ptr", "scratch_ptr", "stale_ptr"])],
    "gather_tokens": [("_gather_tokens_kernel", ["y_ptr"])],
    "scatter_tokens_": [("_scatter_rows_kernel", ["dst_ptr"])],
    "scatter_kv_": [("_scatter_rows_kernel", ["dst2_ptr", "dst_ptr"])],
    "forecast_tokens_": [("_forecast_kernel", ["base_ptr", "out_ptr", "slope_ptr"])],
    "forecast_kv_": [("_forecast_kernel", ["base2_ptr", "base_ptr", "out2_ptr", "out_ptr", "slope2_ptr",
                                           "slope_ptr"])],
    "forecast_kv_/joint": [("_forecast_kernel", ["base2_ptr", "base_ptr", "out2_ptr", "out_ptr", "slope2_ptr",
                                                 "slope_ptr"])],
    "forecast_attention": [("_forecast_attention_kernel", ["o_ptr"])],
    "kmeans": [("_kmeans_assign_kernel", ["labels_ptr"])] * 3,  # iters=2: two Lloyd steps and the final labels
}  # fmt: skip


@pytest.fixture(scope="module")
def graphs() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    here = Path(__file__).parent
    env["PYTHONPATH"] = os.pathsep.join([str(here), *filter(None, [env.get("PYTHONPATH")])])
    done = subprocess.run([sys.executable, str(here / "triton_trace_worker.py")], env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("op", sorted(EXPECTED))
def test_compiled_op_is_its_triton_kernels(graphs, op):
    calls = graphs[op]
    launches = [tuple(c) for c in calls if isinstance(c, list)]
    assert launches == [(k, w) for k, w in EXPECTED[op]], calls
    assert not [c for c in calls if isinstance(c, str) and "cat_ops" in c], calls  # no opaque custom op left


@pytest.mark.gpu
@pytest.mark.parametrize("op", sorted(EXPECTED))
def test_inductor_runs_the_kernels_as_eager_does(op):
    """On a GPU: each op compiled by Inductor (fullgraph; the triton_op path) gives eager's
    outputs and leaves every argument as eager does, bit for bit (the same kernels run)."""
    import triton_trace_worker

    fn, args = triton_trace_worker.cases("cuda")[op]
    eager_args, compiled_args = [a.clone() for a in args], [a.clone() for a in args]
    eager = fn(*eager_args)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)(*compiled_args)
    eager, compiled = (() if x is None else x if isinstance(x, tuple) else (x,) for x in (eager, compiled))
    for a, b in zip([*compiled, *compiled_args], [*eager, *eager_args], strict=True):
        assert torch.equal(a, b)
    torch._dynamo.reset()
