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


def test_forecast_kv_counts_each_cache_by_its_own_dtypes():
    """Through counting(): K and V caches of different dtypes, so swapped arguments change the count.
    Per cache: base read, forecast written, the K computed rows read and written into base and
    slope, the others' slopes read; pos (int64) and the fp32 weight and inv_dt once."""
    b, h, n, k, d = 2, 3, 40, 5, 8

    def cache(dtype, slope_dtype):
        def empty(rows, dt):
            return torch.empty(b, h, rows, d, device="meta", dtype=dt)

        return empty(n, dtype), empty(n, slope_dtype), empty(n, dtype), empty(k, dtype)

    (kb, ks, ko, kr), (vb, vs, vo, vr) = cache(torch.bfloat16, torch.float32), cache(torch.float16, torch.bfloat16)
    pos = torch.empty(b, n, device="meta", dtype=torch.int64)
    weight = torch.empty(b, n, device="meta")
    with roofline.counting() as c:
        ops.forecast_kv_(kb, vb, ks, vs, ko, vo, pos, kr, vr, weight, weight, 2, backend="torch")
    elements, c_ = b * h * n * d, k / n

    def per_cache(base: int, slope: int) -> float:  # bytes of one cache with these element sizes
        return elements * (base + base + c_ * base + c_ * (base + slope) + (1 - c_) * slope)

    expected = b * n * (8 + 4 + 4) + per_cache(2, 4) + per_cache(2, 2)
    assert c.cost.launches == 1
    assert c.cost.bytes == pytest.approx(expected)
    # without out (a step that computes every row): only the computed rows, read and stored
    with roofline.counting() as c:
        ops.forecast_kv_(kb, vb, ks, vs, None, None, pos, kr, vr, weight, weight, 2, backend="torch")
    expected = b * n * (8 + 4 + 4) + elements * c_ * (3 * 2 + 4 + 3 * 2 + 2)
    assert c.cost.bytes == pytest.approx(expected)


def test_forecast_attention_is_one_launch_reading_each_cache_once():
    """fused_attention's op: the attention FLOPs of its M queries against N + T keys, and every
    argument read once (bases, slopes, weight, extras, the extra mask) with the output written:
    no forecast buffer, no concatenation."""
    b, h, m, n, t, d = 2, 3, 9, 40, 5, 16

    def empty(rows, dtype=torch.bfloat16):
        return torch.empty(b, h, rows, d, device="meta", dtype=dtype)

    q, kb, vb, ks, vs, kx, vx = empty(m), empty(n), empty(n), empty(n), empty(n), empty(t), empty(t)
    weight = torch.empty(b, n, device="meta")
    mask = torch.empty(b, t, device="meta", dtype=torch.bool)
    original = ops.forecast_attention
    with roofline.counting() as c:
        out = ops.forecast_attention(q, kb, vb, ks, vs, weight, kx, vx, extra_mask=mask, backend="torch")
    assert c.cost.launches == 1
    assert c.cost.flops == 4 * b * h * m * (n + t) * d
    assert c.cost.bytes == _bytes(q, kb, vb, ks, vs, weight, kx, vx, mask, out)
    assert ops.forecast_attention is original
