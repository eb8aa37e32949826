"""Triton k-means: the assignment step as a kernel, the update as the reference's deterministic bmm."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from . import launch

__all__ = ["kmeans", "kmeans_assign"]

BLOCK_N = 64  # points per program
NUM_WARPS = 4


def _block_f(F: int) -> int:
    # Feature chunk, looped over F. ptxas -v on the AOT build (SD3: F = 66, sm_80/sm_90): one
    # 64 x 128 chunk used 168/255 registers and spilled 3-4 KB; chunks of 16 (8 elements per
    # thread) use 72-80 registers and no spills, and pad F = 66 to 80 rather than 128.
    return min(triton.next_power_of_2(max(F, 1)), 16)


@triton.jit
def _kmeans_assign_kernel(
    x_ptr, cent_ptr, labels_ptr,
    N, F, num_clusters,
    s_xb, s_xn, s_xf,
    BLOCK_N: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """labels[b,i] = argmin_c sum_f (x[b,i,f] - cent[b,c,f])^2, ties by the lower c, in fp32.

    x: (B, N, F) any float dtype and strides; cent: (B, nc, F) fp32 contiguous;
    labels: (B, N) int64. Grid (B, cdiv(N, BLOCK_N)). Source: reference.kmeans_assign.
    """
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    x_rows = x_ptr + b * s_xb + rows.to(tl.int64) * s_xn
    best = tl.full([BLOCK_N], float("inf"), dtype=tl.float32)
    best_c = tl.zeros([BLOCK_N], dtype=tl.int64)
    for c in range(num_clusters):
        dist = tl.zeros([BLOCK_N], dtype=tl.float32)
        cent_row = cent_ptr + (b * num_clusters + c) * F
        # fp32 tree sum per chunk, chunks added in order: not torch's grouping (neither was one
        # wide chunk), so only points within rounding of a tie could take another label.
        for f0 in range(0, F, BLOCK_F):
            cols = f0 + tl.arange(0, BLOCK_F)
            col_ok = cols < F
            x = tl.load(x_rows[:, None] + cols[None, :] * s_xf, mask=row_ok[:, None] & col_ok[None, :], other=0.0)
            m = tl.load(cent_row + cols, mask=col_ok, other=0.0)
            diff = x.to(tl.float32) - m[None, :]
            dist += tl.sum(diff * diff, axis=1)
        # Strictly smaller: on equal distances the lower cluster id stays, as torch.argmin.
        better = dist < best
        best = tl.where(better, dist, best)
        best_c = tl.where(better, c, best_c)
    tl.store(labels_ptr + b * N + rows, best_c, mask=row_ok)


def kmeans_assign_triton(features: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid per point, (B, N) int64 (see _kmeans_assign_kernel)."""
    B, N, F = features.shape
    nc = centroids.shape[1]
    labels = torch.empty((B, N), device=features.device, dtype=torch.int64)
    if N == 0:
        return labels
    cent = centroids.float().contiguous()
    block_f = _block_f(F)
    launch.kernel(_kmeans_assign_kernel)[(B, triton.cdiv(N, BLOCK_N))](
        features, cent, labels, N, F, nc, features.stride(0), features.stride(1), features.stride(2),
        BLOCK_N=BLOCK_N, BLOCK_F=block_f, num_warps=NUM_WARPS, enable_fp_fusion=False,
    )
    return labels


def kmeans_triton(features: Tensor, num_clusters: int, iters: int) -> Tensor:
    """Lloyd's k-means as reference.kmeans (same start, same fixed loop), Triton assignment."""
    centroids = reference.kmeans_init(features, num_clusters)
    for _ in range(iters):
        centroids = reference.kmeans_update(features, kmeans_assign_triton(features, centroids), centroids)
    return kmeans_assign_triton(features, centroids)


kmeans_assign = kmeans_assign_triton
kmeans = kmeans_triton
