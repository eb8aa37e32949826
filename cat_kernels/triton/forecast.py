"""Triton first-order forecast of token caches: one pass over the N cache rows.

Each program takes BLOCK_N tokens of one (b, h) and BLOCK_D channels. A computed token
(pos[b, n] = j >= 0) refreshes its base and slope from new row j; every token writes `out`,
the buffer attention reads (its rows may sit in a larger one, beside the text rows): the new
value, or base + weight * slope for a skipped token. The inverse map `pos` (token -> new row)
replaces a scatter by idx, so every cache row is read and written by exactly one program: no
ordering hazard, and the forecast of the skipped rows comes in the same pass. Both layouts
are handled as (B, H, N, D) with H = 1 for (B, N, C).
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from torch import Tensor

from . import launch

__all__ = ["forecast_tokens_", "forecast_kv_"]

TILE = 1024  # elements per program and cache (BLOCK_N * BLOCK_D): 8 per thread at 4 warps
NUM_WARPS = 4


@triton.jit
def _cast_to(x, ptr, ROUND_BF16: tl.constexpr):
    """x (fp32) in the element type of ptr, rounded to nearest even.

    ROUND_BF16 (the CPU interpreter only) rounds to bf16 by hand: the interpreter truncates
    fp32 -> bf16 where the GPU and torch round to nearest even (NaN kept as it is).
    """
    if ROUND_BF16:
        if ptr.dtype.element_ty == tl.bfloat16:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
            x = tl.where(x != x, x, bits.to(tl.float32, bitcast=True))
    return x.to(ptr.dtype.element_ty)


@triton.jit
def _forecast_rows(
    base_ptr, slope_ptr, out_ptr, rows_ptr, off, out_off, j, s_rk, s_rd, cols, new_ok, m_all, m_new, m_old, w, idt,
    HAS_OUT: tl.constexpr, ROUND_BF16: tl.constexpr,
):
    """One cache's tile: out = new or base + w * slope; base, slope refreshed where new_ok.
    off: the tile's offsets in base and slope (contiguous), out_off: in out (rows of stride 1).
    Without out (HAS_OUT False) skipped rows are not even read."""
    m_base = m_new  # computed rows read their old value for the slope
    if HAS_OUT:
        m_base = m_all  # and skipped ones for their forecast
    base = tl.load(base_ptr + off, mask=m_base, other=0.0).to(tl.float32)
    new = tl.load(rows_ptr + j[:, None] * s_rk + cols[None, :] * s_rd, mask=m_new, other=0.0)
    # The new value is what base stores: rounded to base's dtype first (exact when equal).
    new = _cast_to(new.to(tl.float32), base_ptr, ROUND_BF16).to(tl.float32)
    if HAS_OUT:
        # The old slope only matters for skipped tokens: computed rows do not read it.
        slope = tl.load(slope_ptr + off, mask=m_old, other=0.0).to(tl.float32)
        # The launcher turns fp fusion off, so base + w * slope rounds twice, like torch.
        forecast = base + w[:, None] * slope
        value = _cast_to(tl.where(new_ok[:, None], new, forecast), out_ptr, ROUND_BF16)
        tl.store(out_ptr + out_off, value, mask=m_all)
    tl.store(base_ptr + off, new.to(base_ptr.dtype.element_ty), mask=m_new)
    tl.store(slope_ptr + off, _cast_to((new - base) * idt[:, None], slope_ptr, ROUND_BF16), mask=m_new)


@triton.jit
def _forecast_kernel(
    base_ptr, slope_ptr, out_ptr, rows_ptr,
    base2_ptr, slope2_ptr, out2_ptr, rows2_ptr,
    pos_ptr, w_ptr, idt_ptr,
    H, N, K, D,
    s_rb, s_rh, s_rk, s_rd, s_r2b, s_r2h, s_r2k, s_r2d,
    s_ob, s_oh, s_on, s_o2b, s_o2h, s_o2n,
    s_pb, s_pn, s_wb, s_wn, s_tb, s_tn,
    TWO: tl.constexpr, HAS_OUT: tl.constexpr, ROUND_BF16: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """For pos[b,n] = j in [0, K): slope = (new - base) * inv_dt; base = out = new := rows[b,h,j,:];
    else out = base + weight[b,n] * slope (base, slope kept). fp32 math, one rounding per store.

    base, slope (and base2, slope2 when TWO): (B, H, N, D) contiguous, slope of any float dtype;
    out, out2: base's shape and dtype, rows of stride 1 (strides s_o*: a slice of a larger
    buffer, e.g. beside the text rows attention reads), written only if HAS_OUT; rows, rows2:
    (B, H, K, D) any strides; pos: (B, N) int32/int64; weight, inv_dt: (B, N) fp32; all (B, N)
    any strides. pos outside [0, K) is a skipped token (no fault). Grid row_grid(B*H, N,
    BLOCK_N, D, BLOCK_D). TWO does the K and V caches of a layer in one launch. Source: issue
    10 (CAT-F), docs/design.md section 5.
    """
    # int64 offsets: B*H*N*D passes 2^31 for video-sized K/V caches.
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    n_ok = n < N
    col_ok = cols < D
    n64 = n.to(tl.int64)
    j = tl.load(pos_ptr + b * s_pb + n64 * s_pn, mask=n_ok, other=-1).to(tl.int64)
    w = tl.load(w_ptr + b * s_wb + n64 * s_wn, mask=n_ok, other=0.0)
    idt = tl.load(idt_ptr + b * s_tb + n64 * s_tn, mask=n_ok, other=0.0)
    new_ok = n_ok & (j >= 0) & (j < K)
    j = tl.where(new_ok, j, 0)
    m_all = n_ok[:, None] & col_ok[None, :]
    m_new = new_ok[:, None] & col_ok[None, :]
    m_old = m_all & ~new_ok[:, None]
    off = (bh * N + n64)[:, None] * D + cols[None, :]
    out_off = (b * s_ob + h * s_oh + n64 * s_on)[:, None] + cols[None, :]
    _forecast_rows(
        base_ptr, slope_ptr, out_ptr, rows_ptr + b * s_rb + h * s_rh, off, out_off, j, s_rk, s_rd, cols,
        new_ok, m_all, m_new, m_old, w, idt, HAS_OUT, ROUND_BF16,
    )
    if TWO:
        _forecast_rows(
            base2_ptr, slope2_ptr, out2_ptr, rows2_ptr + b * s_r2b + h * s_r2h, off,
            (b * s_o2b + h * s_o2h + n64 * s_o2n)[:, None] + cols[None, :], j, s_r2k, s_r2d, cols,
            new_ok, m_all, m_new, m_old, w, idt, HAS_OUT, ROUND_BF16,
        )


def row_grid(bh: int, rows: int, block_rows: int, cols: int, block_cols: int) -> tuple[int, int, int]:
    """The launch grid of a kernel over (B*H, rows, cols) tiles: the row blocks on axis 0, whose
    limit is 2^31 - 1 (axes 1 and 2 stop at 65,535, which a video's rows in blocks of 4 pass
    above 262,140 rows), then B*H, then the column blocks."""
    grid = (triton.cdiv(rows, block_rows), bh, triton.cdiv(cols, block_cols))
    if grid[1] > 65535 or grid[2] > 65535:
        raise ValueError(f"cat_kernels (triton): B*H = {bh} or {grid[2]} column blocks exceed the grid's 65535")
    return grid


def _strides4(t: Tensor, dim: int) -> tuple[int, int, int, int]:
    """Strides (b, h, n, d) of t seen as (B, H, N, D); H = 1 (stride 0) when dim == 1."""
    if dim == 1:
        return (t.stride(0), 0, t.stride(1), t.stride(2))
    return (t.stride(0), t.stride(1), t.stride(2), t.stride(3))


def _blocks(D: int) -> tuple[int, int]:
    # BLOCK_D follows the row width (a model dimension, <= 256 per program); BLOCK_N fills the tile.
    block_d = max(16, min(triton.next_power_of_2(D), 256))
    return TILE // block_d, block_d


def _forecast(caches: list[tuple[Tensor, Tensor, Tensor | None, Tensor]], pos: Tensor, weight: Tensor,
              inv_dt: Tensor, dim: int) -> None:
    base = caches[0][0]
    has_out = caches[0][2] is not None
    caches = [(b, s, b if o is None else o, r) for b, s, o, r in caches]  # no out: base as a placeholder
    B, N = pos.shape
    H, D, K = (1 if dim == 1 else base.shape[1]), base.shape[-1], caches[0][3].shape[dim]
    if base.numel() == 0:
        return
    two = len(caches) == 2
    (b1, s1, o1, r1), (b2, s2, o2, r2) = caches[0], caches[-1]  # TWO=False: placeholders compiled away
    block_n, block_d = _blocks(D)
    launch.kernel(_forecast_kernel)[row_grid(B * H, N, block_n, D, block_d)](
        b1, s1, o1, r1, b2, s2, o2, r2, pos, weight, inv_dt,
        H, N, K, D,
        *_strides4(r1, dim), *_strides4(r2, dim), *_strides4(o1, dim)[:3], *_strides4(o2, dim)[:3],
        pos.stride(0), pos.stride(1), weight.stride(0), weight.stride(1), inv_dt.stride(0), inv_dt.stride(1),
        TWO=two, HAS_OUT=has_out, ROUND_BF16=os.environ.get("TRITON_INTERPRET") == "1",
        BLOCK_N=block_n, BLOCK_D=block_d, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )


def forecast_tokens_triton(
    base: Tensor, slope: Tensor, out: Tensor | None, pos: Tensor, rows: Tensor, weight: Tensor, inv_dt: Tensor, dim: int
) -> None:
    """One cache's forecast step in one pass; see reference.forecast_tokens_. Validated by ops."""
    _forecast([(base, slope, out, rows)], pos, weight, inv_dt, dim)


def forecast_kv_triton(
    k_base: Tensor, v_base: Tensor, k_slope: Tensor, v_slope: Tensor, k_out: Tensor | None, v_out: Tensor | None,
    pos: Tensor, k: Tensor, v: Tensor, weight: Tensor, inv_dt: Tensor, dim: int,
) -> None:
    """The K and V caches' forecast step in one launch; see reference.forecast_kv_."""
    _forecast([(k_base, k_slope, k_out, k), (v_base, v_slope, v_out, v)], pos, weight, inv_dt, dim)


forecast_tokens_ = forecast_tokens_triton
forecast_kv_ = forecast_kv_triton
