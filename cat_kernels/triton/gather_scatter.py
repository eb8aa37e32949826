"""Triton row gather and scatter along the token dimension of (B, N, C) or (B, H, N, D) tensors.

Both layouts are handled as (B, H, N, D) with H = 1 for (B, N, C); every tensor is addressed
through its own strides, so sliced (non-contiguous) inputs need no copy.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .forecast import _strides4, row_grid

__all__ = ["gather_tokens", "scatter_tokens_", "scatter_kv_"]

BLOCK_K = 16  # rows per program


@triton.jit
def _gather_tokens_kernel(
    x_ptr, idx_ptr, y_ptr,
    H, N, K, D,
    s_xb, s_xh, s_xn, s_xd, s_ib, s_ik,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """y[b,h,j,:] = x[b,h,idx[b,j],:]; rows with idx outside [0, N) are written as zeros.

    x: (B, H, N, D) any strides; idx: (B, K) int32/int64 any strides; y: (B, H, K, D) contiguous.
    Grid row_grid(B*H, K, BLOCK_K, D, BLOCK_D). Source: docs/design.md section 3 (gather).
    """
    # int64 offsets: B*H*N*D passes 2^31 for video-sized K/V caches.
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    j = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    j_ok = j < K
    col_ok = cols < D
    src = tl.load(idx_ptr + b * s_ib + j.to(tl.int64) * s_ik, mask=j_ok, other=0).to(tl.int64)
    # No host-side range check on the GPU: out-of-range rows are masked instead of faulting.
    src_ok = j_ok & (src >= 0) & (src < N)
    x_rows = x_ptr + b * s_xb + h * s_xh + src * s_xn
    v = tl.load(x_rows[:, None] + cols[None, :] * s_xd, mask=src_ok[:, None] & col_ok[None, :], other=0.0)
    y_rows = y_ptr + (bh * K + j) * D
    tl.store(y_rows[:, None] + cols[None, :], v, mask=j_ok[:, None] & col_ok[None, :])


@triton.jit
def _scatter_rows_kernel(
    dst_ptr, src_ptr, dst2_ptr, src2_ptr, idx_ptr,
    H, N, K, D,
    s_db, s_dh, s_dn, s_dd, s_sb, s_sh, s_sk, s_sd,
    s_d2b, s_d2h, s_d2n, s_d2d, s_s2b, s_s2h, s_s2k, s_s2d,
    s_ib, s_ik,
    TWO: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dst[b,h,idx[b,j],:] = src[b,h,j,:] (and dst2 from src2 when TWO), cast to dst's dtype.

    dst, dst2: (B, H, N, D); src, src2: (B, H, K, D); idx: (B, K) int32/int64; all any strides.
    Rows with idx outside [0, N) are skipped. Grid row_grid(B*H, K, BLOCK_K, D, BLOCK_D).
    TWO writes the K and V caches in one launch. Source: docs/design.md section 5 (scatter).
    """
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    j = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    j_ok = j < K
    col_ok = cols < D
    j64 = j.to(tl.int64)
    dst_row = tl.load(idx_ptr + b * s_ib + j64 * s_ik, mask=j_ok, other=0).to(tl.int64)
    m = (j_ok & (dst_row >= 0) & (dst_row < N))[:, None] & col_ok[None, :]
    v = tl.load(src_ptr + b * s_sb + h * s_sh + j64[:, None] * s_sk + cols[None, :] * s_sd, mask=m)
    tl.store(
        dst_ptr + b * s_db + h * s_dh + dst_row[:, None] * s_dn + cols[None, :] * s_dd,
        v.to(dst_ptr.dtype.element_ty), mask=m,
    )
    if TWO:
        v2 = tl.load(src2_ptr + b * s_s2b + h * s_s2h + j64[:, None] * s_s2k + cols[None, :] * s_s2d, mask=m)
        tl.store(
            dst2_ptr + b * s_d2b + h * s_d2h + dst_row[:, None] * s_d2n + cols[None, :] * s_d2d,
            v2.to(dst2_ptr.dtype.element_ty), mask=m,
        )


def _block_d(D: int) -> int:
    # Follows the row width D (a model dimension), capped at 256 so one program moves a few KiB.
    return max(16, min(triton.next_power_of_2(D), 256))


def _heads(t: Tensor, dim: int) -> int:
    return 1 if dim == 1 else t.shape[1]


def gather_tokens_triton(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """Rows of x at idx along `dim` (1 or 2) into a new contiguous tensor; validated by ops."""
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    y = torch.empty(shape, device=x.device, dtype=x.dtype)
    B, K = idx.shape
    H, N, D = _heads(x, dim), x.shape[dim], x.shape[-1]
    if y.numel() == 0:
        return y
    block_d = _block_d(D)
    grid = row_grid(B * H, K, BLOCK_K, D, block_d)
    launch.kernel(_gather_tokens_kernel)[grid](
        x, idx, y, H, N, K, D, *_strides4(x, dim), idx.stride(0), idx.stride(1),
        BLOCK_K=BLOCK_K, BLOCK_D=block_d, num_warps=4,
    )
    return y


def _scatter(dst: Tensor, src: Tensor, dst2: Tensor | None, src2: Tensor | None, idx: Tensor, dim: int) -> None:
    B, K = idx.shape
    H, N, D = _heads(dst, dim), dst.shape[dim], dst.shape[-1]
    if src.numel() == 0:
        return
    two = dst2 is not None
    if not two:
        dst2, src2 = dst, src  # unused placeholders; TWO=False compiles the second copy away
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter truncates fp32 -> bf16 where the GPU (and torch) round to nearest
        # even; cast with torch there so CPU tests see the GPU's numbers.
        src = src.to(dst.dtype)
        src2 = src2.to(dst2.dtype)
    block_d = _block_d(D)
    grid = row_grid(B * H, K, BLOCK_K, D, block_d)
    launch.kernel(_scatter_rows_kernel)[grid](
        dst, src, dst2, src2, idx, H, N, K, D,
        *_strides4(dst, dim), *_strides4(src, dim), *_strides4(dst2, dim), *_strides4(src2, dim),
        idx.stride(0), idx.stride(1),
        TWO=two, BLOCK_K=BLOCK_K, BLOCK_D=block_d, num_warps=4,
    )


def scatter_tokens_triton(dst: Tensor, idx: Tensor, src: Tensor, dim: int) -> Tensor:
    """dst's rows at idx along `dim` overwritten by src's rows, in place; returns dst."""
    _scatter(dst, src, None, None, idx, dim)
    return dst


def scatter_kv_triton(k_cache: Tensor, v_cache: Tensor, idx: Tensor, k: Tensor, v: Tensor, dim: int) -> None:
    """Both caches' rows at idx overwritten by k and v, in one launch."""
    _scatter(k_cache, k, v_cache, v, idx, dim)


gather_tokens = gather_tokens_triton
scatter_tokens_ = scatter_tokens_triton
scatter_kv_ = scatter_kv_triton
