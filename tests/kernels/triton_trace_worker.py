"""Traces every public op on fake CUDA tensors the way torch.compile's AOT stage does (no GPU
needed) and prints, per op, the graph's calls as JSON: a Triton kernel launch as
[kernel name, the arguments the kernel writes], anything else by its name.

Run by test_triton_trace.py in a fresh process without TRITON_INTERPRET (interpreted kernels
cannot be traced). Triton's TTIR lowering, which finds what a kernel writes, asks the active
driver for its target: with no GPU attached, an sm_90 target stands in for one."""

from __future__ import annotations

import json
import logging

import torch
import triton
from functorch.compile import aot_function, make_boxed_func
from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table
from torch._subclasses.fake_tensor import FakeTensorMode
from triton.backends.compiler import GPUTarget

from cat_kernels import ops


class _Sm90:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)


def _calls(gm: torch.fx.GraphModule) -> list:
    calls = []
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if "triton_kernel_wrapper" in str(node.target):
            kernel = kernel_side_table.get_kernel(node.kwargs["kernel_idx"])
            calls.append([kernel.fn.__name__, sorted(node.kwargs["tensors_to_clone"])])
        else:
            calls.append(str(node.target))
    return calls


def cases(device: str = "cuda", B=2, N=48, C=32, H=2, D=16, K=8, nc=4) -> dict:
    """op -> (a function calling it, its arguments): valid random inputs (on fake tensors under a
    FakeTensorMode, as the worker traces them; real ones for the GPU test)."""
    g = None if device == "cuda" and torch._guards.detect_fake_mode() else torch.Generator(device).manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, device=device, generator=g)

    labels = torch.randint(0, nc, (B, N), device=device, generator=g)
    idx = torch.randperm(N, device=device, generator=g)[:K].sort().values.expand(B, K).contiguous()
    pos = torch.full((B, N), -1, dtype=torch.int64, device=device)
    pos.scatter_(1, idx, torch.arange(K, device=device).expand(B, K).contiguous())
    return {
        "token_stats": (lambda o, a, lab: ops.token_stats(o, a, lab, nc), (r(B, N, C), r(B, N, C), labels)),
        "select_tokens": (lambda d, s, lab, st: ops.select_tokens(d, s, lab, st, K, first=False),
                          (r(B, N).abs(), r(B, nc).abs(), labels, r(B, N).abs())),
        "gather_tokens": (ops.gather_tokens, (r(B, N, C), idx)),
        "scatter_tokens_": (ops.scatter_tokens_, (r(B, N, C), idx, r(B, K, C))),
        "scatter_kv_": (ops.scatter_kv_, (r(B, H, N, D), r(B, H, N, D), idx, r(B, H, K, D), r(B, H, K, D))),
        "forecast_tokens_": (ops.forecast_tokens_, (r(B, N, C), r(B, N, C), r(B, N, C), pos, r(B, K, C), r(B, N),
                                                    r(B, N))),
        "forecast_kv_": (ops.forecast_kv_, (*[r(B, H, N, D) for _ in range(6)], pos, r(B, H, K, D), r(B, H, K, D),
                                            r(B, N), r(B, N))),
        # the pruned step's joint attention: K/V forecast into the image rows of a [text; image] buffer
        "forecast_kv_/joint": (lambda kb, vb, ks, vs, kw, vw, *rest: ops.forecast_kv_(
            kb, vb, ks, vs, kw.narrow(2, 5, N), vw.narrow(2, 5, N), *rest),
            (*[r(B, H, N, D) for _ in range(4)], r(B, H, 5 + N, D), r(B, H, 5 + N, D), pos, r(B, H, K, D),
             r(B, H, K, D), r(B, N), r(B, N))),
        "forecast_attention": (ops.forecast_attention, (r(B, H, K, D), *[r(B, H, N, D) for _ in range(4)], r(B, N))),
        "kmeans": (lambda f: ops.kmeans(f, nc, 2), (r(B, N, 3),)),
    }  # fmt: skip


def main() -> None:
    logging.disable(logging.WARNING)
    triton.runtime.driver.set_active(_Sm90())
    graphs = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for name, (fn, args) in cases().items():

            def compiler(gm, inputs, name=name):
                graphs[name] = _calls(gm)
                return make_boxed_func(gm.forward)

            def step(*a, fn=fn):
                result = fn(*a)
                return a[0] + 0 if result is None else result  # the mutating ops return nothing

            aot_function(step, fw_compiler=compiler)(*args)
    print(json.dumps(graphs))


if __name__ == "__main__":
    main()
