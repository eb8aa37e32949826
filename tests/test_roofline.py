"""bench/roofline.py: the per-op cost model counts FLOPs, bytes and launches as its docstring
says (a linear, a view, attention as one flash-style launch, a fused cat_kernels op as the bytes
its kernel moves) and restores what it wraps. Meta device, milliseconds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import roofline  # noqa: E402

import cat_kernels.ops as ops  # noqa: E402


def _bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_a_linear_is_one_launch_with_its_matmul_flops_and_every_tensor_moved_once():
    x = torch.empty(3, 7, 40, device="meta", dtype=torch.bfloat16)
    layer = torch.nn.Linear(40, 24, device="meta", dtype=torch.bfloat16)
    with roofline.counting() as c:
        y = layer(x)
        y.view(21, 24).transpose(0, 1)  # views move nothing
    assert c.cost.launches == 1
    assert c.cost.flops == 2 * 21 * 40 * 24
    assert c.cost.bytes == _bytes(x, layer.weight, layer.bias, y)
    for gpu, (peak, bandwidth) in roofline.GPUS.items():
        expected = max(c.cost.flops / peak, c.cost.bytes / bandwidth) + roofline.LAUNCH_GAP_S
        assert c.cost.seconds[gpu] == pytest.approx(expected)


def test_attention_is_one_flash_launch_whatever_runs_inside():
    q = torch.empty(2, 3, 50, 16, device="meta", dtype=torch.bfloat16)
    k = torch.empty(2, 3, 70, 16, device="meta", dtype=torch.bfloat16)
    v = torch.empty(2, 3, 70, 16, device="meta", dtype=torch.bfloat16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with roofline.counting() as c:
        out = torch.nn.functional.scaled_dot_product_attention(query=q, key=k, value=v)
    assert torch.nn.functional.scaled_dot_product_attention is sdpa
    assert c.cost.launches == 1
    assert c.cost.flops == 4 * 2 * 3 * 50 * 70 * 16
    assert c.cost.bytes == _bytes(q, k, v, out)  # no 50 x 70 scores
    assert c.cost.bytes_by_op == {"attention": c.cost.bytes}


def test_a_fused_op_moves_what_its_kernel_moves_and_is_restored():
    x = torch.empty(2, 100, 32, device="meta")
    idx = torch.empty(2, 9, device="meta", dtype=torch.int64)
    gather = ops.gather_tokens
    with roofline.counting() as c:
        rows = ops.gather_tokens(x, idx, 1, backend="torch")
    assert ops.gather_tokens is gather
    assert rows.shape == (2, 9, 32)
    assert c.cost.launches == 1  # the torch reference's aten ops are not counted
    assert c.cost.bytes == 2 * _bytes(rows) + _bytes(idx)  # K rows read and written, not all N


def test_a_forecast_reads_every_row_and_writes_the_computed_ones_twice():
    n, k, c_ = 64, 8, 16
    base = torch.empty(2, n, c_, device="meta", dtype=torch.bfloat16)
    slope = torch.empty(2, n, c_, device="meta", dtype=torch.float32)
    out = torch.empty_like(base)
    pos = torch.empty(2, n, device="meta", dtype=torch.int64)
    rows = torch.empty(2, k, c_, device="meta", dtype=torch.bfloat16)
    weight = torch.empty(2, n, device="meta")
    expected = 3 * _bytes(pos) + _bytes(base, slope, out, rows) + k / n * _bytes(base, slope)
    assert roofline.FUSED_BYTES["forecast_tokens_"]((base, slope, out, pos, rows, weight, weight), None) == expected
