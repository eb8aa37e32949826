"""Triton token statistics: per-token change d and per-cluster scores in one pass over the data."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch

__all__ = ["token_stats"]

BLOCK_N = 32  # token rows per program of the main pass
BLOCK_NC = 16  # clusters per program of the finishing pass


def _block_c(C: int) -> int:
    # BLOCK_C follows the channel count C (a model dimension), capped so a tile stays in registers.
    return min(triton.next_power_of_2(C), 128)


def _num_warps(block_c: int) -> int:
    # About 8 tile elements per thread. With runtime strides every element carries its own
    # 64-bit address; ptxas -v on the AOT build (SD3: C = 64, bf16/fp32, sm_80/sm_90): 64 rows
    # x 64 with 4 warps spilled 128-172 bytes at 255 registers; 32 rows with 8 warps uses
    # 114-121 registers (58-62 for contiguous inputs) and no spills.
    return max(4, min(8, BLOCK_N * block_c // 256))


@triton.jit
def _token_stats_kernel(
    out_ptr, anchor_ptr, labels_ptr, d_ptr, cmax_ptr,
    N, C, num_clusters,
    s_ob, s_on, s_oc, s_ab, s_an, s_ac, s_lb, s_ln,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """d[b,i] = sqrt(sum_c (out-anchor)[b,i,c]^2); cmax[b,l,c] = max over tokens i of cluster l of (out-anchor)[b,i,c].

    out, anchor: (B, N, C) any float dtype and strides; labels: (B, N) int32/int64;
    d: (B, N) fp32 contiguous; cmax: (B, num_clusters, C) fp32 contiguous, pre-filled with -inf.
    Grid (B, cdiv(N, BLOCK_N)). Source: docs/design.md section 4 (token change, cluster score).
    """
    # int64 batch offsets: B * N * C can pass 2^31 for large caches.
    b = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    lab = tl.load(labels_ptr + b * s_lb + rows64 * s_ln, mask=row_ok, other=-1).to(tl.int32)
    # Out-of-range labels are not checked on the GPU (a host sync): such rows join no cluster
    # rather than writing out of bounds.
    lab_ok = row_ok & (lab >= 0) & (lab < num_clusters)
    lab = tl.where(lab_ok, lab, -1)
    # Cluster ids present in this tile bound the cluster loop: absent ones would issue no
    # atomics anyway (labels are spatially compact, so a tile usually spans one or two).
    lo = tl.min(tl.where(lab_ok, lab, num_clusters), axis=0)
    hi = tl.max(lab, axis=0)
    sumsq = tl.zeros([BLOCK_N], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        col_ok = cols < C
        m = row_ok[:, None] & col_ok[None, :]
        o = tl.load(out_ptr + b * s_ob + rows64[:, None] * s_on + cols[None, :] * s_oc, mask=m, other=0.0)
        a = tl.load(anchor_ptr + b * s_ab + rows64[:, None] * s_an + cols[None, :] * s_ac, mask=m, other=0.0)
        # fp32 arithmetic whatever the storage dtype, as the reference does.
        diff = o.to(tl.float32) - a.to(tl.float32)
        sumsq += tl.sum(diff * diff, axis=1)
        for cl in range(lo, hi + 1):
            # Rows out of range carry lab = -1, so in_cl needs no 2-D mask; padded columns
            # are dropped by the atomic's col_ok (keeping m live here cost registers).
            in_cl = (lab == cl)[:, None]
            cmax = tl.max(tl.where(in_cl, diff, float("-inf")), axis=0)
            present = tl.max(in_cl.to(tl.int32), axis=0) > 0
            # max is order-independent, so concurrent atomics from other tiles stay deterministic.
            tl.atomic_max(cmax_ptr + (b * num_clusters + cl) * C + cols, cmax, mask=col_ok & present)
    tl.store(d_ptr + b * N + rows64, tl.sqrt(sumsq), mask=row_ok)


@triton.jit
def _cluster_score_kernel(cmax_ptr, score_ptr, C, num_clusters, BLOCK_NC: tl.constexpr, BLOCK_C: tl.constexpr):
    """score[b,l] = sqrt(sum_c cmax[b,l,c]^2), or -inf when cluster l is empty (cmax[b,l,0] = -inf).

    cmax: (B, num_clusters, C) fp32 contiguous; score: (B, num_clusters) fp32.
    Grid (B, cdiv(num_clusters, BLOCK_NC)). Source: docs/design.md section 4 (cluster score).
    """
    b = tl.program_id(0).to(tl.int64)
    cl = tl.program_id(1) * BLOCK_NC + tl.arange(0, BLOCK_NC)
    cl_ok = cl < num_clusters
    base = (b * num_clusters + cl.to(tl.int64)) * C
    acc = tl.zeros([BLOCK_NC], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        cols = c0 + tl.arange(0, BLOCK_C)
        m = cl_ok[:, None] & (cols < C)[None, :]
        v = tl.load(cmax_ptr + base[:, None] + cols[None, :], mask=m, other=0.0)
        acc += tl.sum(v * v, axis=1)
    first = tl.load(cmax_ptr + base, mask=cl_ok, other=0.0)
    # An empty cluster kept the -inf fill; it must rank last, as in the reference.
    score = tl.where(first == float("-inf"), float("-inf"), tl.sqrt(acc))
    tl.store(score_ptr + b * num_clusters + cl, score, mask=cl_ok)


def token_stats_triton(out: Tensor, anchor: Tensor, labels: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """Launches the two passes; inputs were validated by cat_kernels.ops. Returns (d, score) fp32."""
    B, N, C = out.shape
    d = torch.empty((B, N), device=out.device, dtype=torch.float32)
    score = torch.empty((B, num_clusters), device=out.device, dtype=torch.float32)
    cmax = torch.full((B, num_clusters, C), float("-inf"), device=out.device, dtype=torch.float32)
    if N == 0:
        return d, score.fill_(float("-inf"))
    block_c = _block_c(C)
    launch.kernel(_token_stats_kernel)[(B, triton.cdiv(N, BLOCK_N))](
        out, anchor, labels, d, cmax, N, C, num_clusters,
        out.stride(0), out.stride(1), out.stride(2), anchor.stride(0), anchor.stride(1), anchor.stride(2),
        labels.stride(0), labels.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_C=block_c, num_warps=_num_warps(block_c),
    )
    launch.kernel(_cluster_score_kernel)[(B, triton.cdiv(num_clusters, BLOCK_NC))](
        cmax, score, C, num_clusters, BLOCK_NC=BLOCK_NC, BLOCK_C=block_c, num_warps=4,
    )
    return d, score


token_stats = token_stats_triton
