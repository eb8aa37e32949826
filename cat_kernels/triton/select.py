"""Triton CAT token selection (DESIGN.md section 4): one program per sample, all N tokens in registers.

Every ordering of the reference (cat_kernels.reference.select_tokens) is a lexicographic sort on
(group, float value, token index). Here each becomes one bitonic sort (_sort_keys) of packed int64 keys:
    group (<= 11 bits) << 52 | orderable(value) (32 bits) << 20 | token index (20 bits),
so ties break by the lower index exactly as the reference's stable sorts do. Per-group counts
come from tl.histogram; permutations are inverted through a small global scratch row with a
barrier between the store and the load (the program owns its row).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference

__all__ = ["select_tokens"]

# Largest token count one program holds (keys of 8 bytes: 128 KiB of registers/shared at 16384);
# see the report in the module README / commit for the ptxas numbers. Larger N use the reference.
MAX_BLOCK_N = 16384
_KEY_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # padding lanes sort after every real key


@triton.constexpr_function
def _log2(n):
    return n.bit_length() - 1


@triton.jit
def _indicator(n_dims: tl.constexpr, j: tl.constexpr):
    """0/1 along the j-th innermost axis of a [2] * n_dims hypercube."""
    return tl.reshape(tl.arange(0, 2), [1] * (n_dims - j - 1) + [2] + [1] * j)


@triton.jit
def _compare_swap(h, flip, i: tl.constexpr, n_dims: tl.constexpr):
    # The partner along axis i is (pair sum) - self: exact for int64 since the wrap-around
    # cancels. A plain sum keeps TRITON_INTERPRET on numpy, where tl.sort's xor_sum reduction
    # falls back to a per-element Python loop (minutes at N = 4096); on the GPU both are a
    # register shuffle.
    y = tl.sum(h, axis=n_dims - 1 - i, keep_dims=True) - h
    return tl.where((h > y) != (flip ^ _indicator(n_dims, i)), y, h)


@triton.jit
def _bitonic_merge(h, stage: tl.constexpr, order: tl.constexpr, n_dims: tl.constexpr):
    # order 0: ascending; 2: alternating direction every 2^stage elements.
    if order == 2:
        flip = _indicator(n_dims, stage)
    else:
        flip = order
    for i in tl.static_range(stage):
        h = _compare_swap(h, flip, stage - 1 - i, n_dims)
    return h


@triton.jit
def _sort_keys(x):
    """Ascending bitonic sort of a 1-D int64 block of keys (same network as tl.sort)."""
    n_dims: tl.constexpr = _log2(x.numel)
    h = tl.reshape(x, [2] * n_dims)
    for stage in tl.static_range(1, n_dims + 1):
        h = _bitonic_merge(h, stage, 2 if stage < n_dims else 0, n_dims)
    return tl.reshape(h, x.shape)


@triton.jit
def _orderable(v):
    """Int64 key in [0, 2^32) ordered as the fp32 value v, with -0.0 and +0.0 equal."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their non-sign bits.
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return bits.to(tl.int64) + 2147483648


@triton.jit
def _descending(v):
    """Int64 key in [0, 2^32) ordered as -v (largest v first), -0.0 equal to +0.0."""
    return 4294967295 - _orderable(v)


@triton.jit
def _select_tokens_kernel(
    d_ptr, score_ptr, labels_ptr, stale_ptr, idx_ptr, scratch_ptr,
    N, nc, k, first_quota, base, budget, decay, scratch_stride,
    s_db, s_dn, s_cb, s_cc, s_lb, s_ln, s_sb, s_sn,
    FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NC: tl.constexpr,
):
    """idx[b] = the k tokens of the CAT policy, ascending; staleness[b] = decay * s + [i in idx].

    d, staleness: (B, N) fp32; cluster score: (B, nc) fp32; labels: (B, N) int32/int64; all any
    strides. idx: (B, k) int64 contiguous. scratch: (B, 3, scratch_stride) int32. Grid (B,).
    FIRST selects the first-step policy (first_quota = k // 10 per cluster), else the later one
    (base = int(0.05 k), budget = int(importance_fraction k)). Source: DESIGN.md section 4 and
    cat_kernels/reference.py select_tokens, step by step.
    """
    b = tl.program_id(0).to(tl.int64)
    scr_rank = scratch_ptr + b * 3 * scratch_stride
    scr_chosen = scr_rank + scratch_stride
    scr_sel = scr_chosen + scratch_stride
    IMASK: tl.constexpr = (1 << 20) - 1

    # --- cluster rank: score descending, ties by lower id (sort then invert via scratch).
    c = tl.arange(0, BLOCK_NC)
    c_ok = c < nc
    sc = tl.load(score_ptr + b * s_cb + c * s_cc, mask=c_ok, other=0.0)
    ckey = tl.where(c_ok, (_descending(sc) << 10) | c.to(tl.int64), _KEY_MAX)
    c_sorted = (_sort_keys(ckey) & 1023).to(tl.int32)
    tl.store(scr_rank + c_sorted, c, mask=c_ok)
    tl.debug_barrier()

    # --- token order 1: (rank, -d, index); p1 = position inside the rank group.
    i = tl.arange(0, BLOCK_N)
    ok = i < N
    lab = tl.load(labels_ptr + b * s_lb + i.to(tl.int64) * s_ln, mask=ok, other=0).to(tl.int32)
    # Unchecked on the GPU (a host sync): an out-of-range label is clamped rather than faulting.
    lab = tl.minimum(tl.maximum(lab, 0), nc - 1)
    r = tl.load(scr_rank + lab, mask=ok, other=0)
    d = tl.load(d_ptr + b * s_db + i.to(tl.int64) * s_dn, mask=ok, other=0.0)
    dkey = _descending(d)
    key1 = tl.where(ok, (r.to(tl.int64) << 52) | (dkey << 20) | i.to(tl.int64), _KEY_MAX)
    size = tl.histogram(r, BLOCK_NC, mask=ok)  # tokens per rank
    start = tl.cumsum(size, 0) - size
    k1 = _sort_keys(key1)
    j = tl.arange(0, BLOCK_N)
    ok1 = j < N
    r1 = tl.where(ok1, (k1 >> 52).to(tl.int32), 0)
    i1 = (k1 & IMASK).to(tl.int32)
    p1 = j - tl.gather(start, r1, 0)

    if FIRST:
        # Walk clusters by rank taking each one's top k // 10 by d, stop at k.
        cand = ok1 & (p1 < first_quota)
        take = cand & (tl.cumsum(cand.to(tl.int32), 0) <= k)
        tl.store(scr_chosen + i1, take.to(tl.int32), mask=ok1)
        tl.debug_barrier()
        chosen = tl.load(scr_chosen + i, mask=ok, other=0)
        fill_key = dkey  # fill with the largest d
    else:
        # Quota m_r * base (m = 3, 2, 1, ...) capped by the cluster size; tier 0 = top by d.
        mult1 = tl.where(r1 == 0, 3, tl.where(r1 == 1, 2, 1))
        quota1 = tl.minimum(mult1 * base, tl.gather(size, r1, 0))
        tier = (p1 >= quota1).to(tl.int32)
        group = 2 * r1 + tier
        s1 = tl.load(stale_ptr + b * s_sb + i1.to(tl.int64) * s_sn, mask=ok1, other=0.0)
        # Tier 0 orders by -d (the 32 bits already in key 1), tier 1 by staleness ascending.
        vkey = tl.where(tier == 0, (k1 >> 20) & 4294967295, _orderable(s1))
        key2 = tl.where(ok1, (group.to(tl.int64) << 52) | (vkey << 20) | i1.to(tl.int64), _KEY_MAX)
        gsize = tl.histogram(group, 2 * BLOCK_NC, mask=ok1)
        gstart = tl.cumsum(gsize, 0) - gsize
        k2 = _sort_keys(key2)
        g2 = tl.where(ok1, (k2 >> 52).to(tl.int32), 0)
        i2 = (k2 & IMASK).to(tl.int32)
        p2 = j - tl.gather(gstart, g2, 0)
        r2 = g2 >> 1
        mult2 = tl.where(r2 == 0, 3, tl.where(r2 == 1, 2, 1))
        quota2 = tl.minimum(mult2 * base, tl.gather(size, r2, 0))
        # Candidates: tier 0, plus the quota // 2 stalest of tier 1 in clusters of rank >= 1.
        cand = ok1 & (((g2 & 1) == 0) | ((r2 >= 1) & (p2 < quota2 // 2)))
        take = cand & (tl.cumsum(cand.to(tl.int32), 0) <= budget)
        tl.store(scr_chosen + i2, take.to(tl.int32), mask=ok1)
        tl.debug_barrier()
        chosen = tl.load(scr_chosen + i, mask=ok, other=0)
        fill_key = _orderable(tl.load(stale_ptr + b * s_sb + i.to(tl.int64) * s_sn, mask=ok, other=0.0))

    # --- fill: chosen first, then the lowest fill key (ties by index); the first k win.
    key3 = tl.where(ok, ((1 - chosen).to(tl.int64) << 52) | (fill_key << 20) | i.to(tl.int64), _KEY_MAX)
    k3 = _sort_keys(key3)
    i3 = (k3 & IMASK).to(tl.int32)
    tl.store(scr_sel + i3, (j < k).to(tl.int32), mask=ok1)
    tl.debug_barrier()
    sel = tl.load(scr_sel + i, mask=ok, other=0)
    # Ascending output without another sort: a token's slot is the count of selected before it.
    pos = tl.cumsum(sel, 0) - 1
    tl.store(idx_ptr + b * k + pos, i.to(tl.int64), mask=ok & (sel != 0))
    # Staleness s = decay * s; s[idx] += 1, rounded as the two separate ops (no FMA: launcher).
    s = tl.load(stale_ptr + b * s_sb + i.to(tl.int64) * s_sn, mask=ok, other=0.0)
    s = s * decay
    s = tl.where(sel != 0, s + 1.0, s)
    tl.store(stale_ptr + b * s_sb + i.to(tl.int64) * s_sn, s, mask=ok)


def _num_warps(block_n: int) -> int:
    # About 8 keys per thread: at BLOCK_N = 4096, sm_90, 16 warps use 128 registers and no
    # spills where 8 warps hit 255 registers and spill (ptxas -v on the AOT build).
    return max(4, min(32, block_n // 256))


def select_tokens_triton(
    d: Tensor,
    cluster_score: Tensor,
    labels: Tensor,
    staleness: Tensor,
    k: int,
    first: bool,
    importance_fraction: float = 0.25,
    staleness_decay: float = 0.5,
) -> Tensor:
    """CAT selection of k tokens per sample, ascending (B, k) int64; updates staleness in place.

    Same contract as reference.select_tokens (validated by cat_kernels.ops). One launch.
    """
    B, N = d.shape
    nc = cluster_score.shape[1]
    # BLOCK sizes follow N and nc (model dimensions: one compile per resolution / cluster count).
    block_n = max(16, triton.next_power_of_2(N))
    block_nc = max(16, triton.next_power_of_2(nc))
    if block_n > MAX_BLOCK_N:
        warnings.warn(
            f"cat_kernels: select_tokens with N={N} exceeds one program's {MAX_BLOCK_N} tokens; using torch",
            RuntimeWarning, stacklevel=2,
        )
        return reference.select_tokens(
            d, cluster_score, labels, staleness, k, first, importance_fraction, staleness_decay
        )
    idx = torch.empty((B, k), device=d.device, dtype=torch.int64)
    scratch_stride = max(block_n, block_nc)
    scratch = torch.empty((B, 3, scratch_stride), device=d.device, dtype=torch.int32)
    # The integer budgets are computed in Python exactly as the reference does.
    _select_tokens_kernel[(B,)](
        d, cluster_score, labels, staleness, idx, scratch,
        N, nc, k, k // 10, int(0.05 * k), int(importance_fraction * k), float(staleness_decay), scratch_stride,
        d.stride(0), d.stride(1), cluster_score.stride(0), cluster_score.stride(1),
        labels.stride(0), labels.stride(1), staleness.stride(0), staleness.stride(1),
        FIRST=bool(first), BLOCK_N=block_n, BLOCK_NC=block_nc,
        num_warps=_num_warps(block_n), enable_fp_fusion=False,
    )
    return idx


select_tokens = select_tokens_triton
