"""Triton CAT token selection (docs/design.md section 4): one program per sample, all N tokens in registers.

Every ordering of the reference (cat_kernels.reference.select_tokens) is a lexicographic sort on
(group, float value, token index), done with a bitonic sort (_sort_keys) of packed unique int32
keys, so ties break by the lower index exactly as the reference's stable sorts do. Two launches,
no host sync: _rank_tokens_kernel turns each float order (by -d, by staleness) into a rank table,
sorting (value, index) as two radix passes of (16-bit half, 14-bit index or rank) keys; then
_select_tokens_kernel sorts (group << 14 | rank) keys. 32-bit keys (not int64) are what let
N = 16384 fit in registers. Per-group counts come from tl.histogram; permutations are inverted
through global scratch rows with a barrier between the store and the load (a program owns its rows).
"""

from __future__ import annotations

import warnings

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from . import launch

__all__ = ["select_tokens"]

# Largest token count one program holds (token indices are packed in 14 bits; keys of 4 bytes:
# 64 KiB of registers at 16384); ptxas numbers in tests/kernels/test_aot_compile.py. Larger N
# use the reference.
MAX_BLOCK_N = 16384
_KEY_MAX = tl.constexpr(0x7FFFFFFFFFFFFFFF)  # padding lanes sort after every real key
# 32-bit keys stay below 2^30 so that the sort's pair sums do not overflow int32 either.
_KEY32_MAX = tl.constexpr((1 << 30) - 1)


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
def _halves(v, descending):
    """(hi, lo) 16-bit halves of a 32-bit unsigned key ordered as v (or -v), -0.0 equal to +0.0."""
    v = tl.where(v == 0.0, 0.0, v)
    bits = v.to(tl.int32, bitcast=True)
    # Negative floats order backwards as integers: flip their non-sign bits (signed order),
    # then flip the sign bit of the high half (unsigned order).
    bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    hi = ((bits >> 16) & 0xFFFF) ^ 0x8000
    lo = bits & 0xFFFF
    hi = tl.where(descending, 0xFFFF - hi, hi)
    lo = tl.where(descending, 0xFFFF - lo, lo)
    return hi, lo


@triton.jit
def _rank_tokens_kernel(
    d_ptr, stale_ptr, scratch_ptr, N, scratch_stride, s_db, s_dn, s_sb, s_sn,
    BLOCK_N: tl.constexpr,
):
    """tok[m] = the token of rank m in (-d, index) order (program (b, 0)) or in (staleness,
    index) order (program (b, 1), which also writes rank[tok[m]] = m).

    d, staleness: (B, N) fp32, any strides. scratch: (B, 6, scratch_stride) int32, rows as in
    _select_tokens_kernel. Grid (B, 1) for the first selection, else (B, 2).
    The 46-bit key (value, index) is sorted as two least-significant-digit radix passes of 30-bit
    keys: (lo16(value), index), then (hi16(value), rank in the first pass). The bitonic sort is
    not stable, but every key is unique, so no order is lost.
    """
    tl.static_assert(BLOCK_N <= 16384, "token indices are packed in 14 bits")
    IBITS: tl.constexpr = 14
    IMASK: tl.constexpr = (1 << IBITS) - 1
    b = tl.program_id(0).to(tl.int64)
    w = tl.program_id(1)
    if w == 0:
        v_ptr = d_ptr + b * s_db
        s_n = s_dn
    else:
        v_ptr = stale_ptr + b * s_sb
        s_n = s_sn
    scr = scratch_ptr + b * 6 * scratch_stride
    tmp_ptr = scr + (1 + w) * scratch_stride
    tok_ptr = scr + (3 + w) * scratch_stride
    rank_ptr = scr + 5 * scratch_stride
    descending = w == 0
    i = tl.arange(0, BLOCK_N)
    ok = i < N
    _, lo = _halves(tl.load(v_ptr + i.to(tl.int64) * s_n, mask=ok, other=0.0), descending)
    tok_a = _sort_keys(tl.where(ok, (lo << IBITS) | i, _KEY32_MAX)) & IMASK
    tl.store(tmp_ptr + i, tok_a, mask=ok)
    hi, _ = _halves(tl.load(v_ptr + tok_a.to(tl.int64) * s_n, mask=ok, other=0.0), descending)
    lane_a = _sort_keys(tl.where(ok, (hi << IBITS) | i, _KEY32_MAX)) & IMASK
    tl.debug_barrier()
    tok = tl.load(tmp_ptr + lane_a, mask=ok, other=0)
    tl.store(tok_ptr + i, tok, mask=ok)
    tl.store(rank_ptr + tok, i, mask=ok & (w == 1))


@triton.jit
def _select_tokens_kernel(
    score_ptr, labels_ptr, stale_ptr, idx_ptr, scratch_ptr,
    N, nc, k, first_quota, base, budget, decay, scratch_stride,
    s_cb, s_cc, s_lb, s_ln, s_sb, s_sn,
    FIRST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_NC: tl.constexpr,
):
    """idx[b] = the k tokens of the CAT policy, ascending; staleness[b] = decay * s + [i in idx].

    Runs after _rank_tokens_kernel, which fills the rank tables. Cluster score: (B, nc) fp32;
    labels: (B, N) int32/int64; staleness: (B, N) fp32; all any strides. idx: (B, k) int64
    contiguous. scratch: (B, 6, scratch_stride) int32, rows: cluster id -> rank; radix pass
    scratch of d, later the selection mask; radix pass scratch of staleness; d rank -> token;
    staleness rank -> token; token -> staleness rank. Grid (B,).
    FIRST selects the first-step policy (first_quota = k // 10 per cluster), else the later one
    (base = int(0.05 k), budget = int(importance_fraction k)). Source: docs/design.md section 4 and
    cat_kernels/reference.py select_tokens, step by step.
    """
    tl.static_assert(BLOCK_N <= 16384, "token indices are packed in 14 bits")
    IBITS: tl.constexpr = 14
    IMASK: tl.constexpr = (1 << IBITS) - 1
    b = tl.program_id(0).to(tl.int64)
    scr_rank = scratch_ptr + b * 6 * scratch_stride
    scr_sel = scr_rank + scratch_stride
    scr_tok_d = scr_rank + 3 * scratch_stride
    scr_tok_s = scr_rank + 4 * scratch_stride
    scr_rank_s = scr_rank + 5 * scratch_stride

    # --- cluster rank: score descending, ties by lower id (sort then invert via scratch).
    c = tl.arange(0, BLOCK_NC)
    c_ok = c < nc
    sc = tl.load(score_ptr + b * s_cb + c * s_cc, mask=c_ok, other=0.0)
    ckey = tl.where(c_ok, (_descending(sc) << 10) | c.to(tl.int64), _KEY_MAX)
    c_sorted = (_sort_keys(ckey) & 1023).to(tl.int32)
    tl.store(scr_rank + c_sorted, c, mask=c_ok)
    tl.debug_barrier()

    # --- token order 1: (cluster rank, -d, index) = (cluster rank, d rank); p1 = position in
    # the cluster. The keys are built in d-rank order (lane m holds the token of d rank m).
    j = tl.arange(0, BLOCK_N)
    ok = j < N
    tok = tl.load(scr_tok_d + j, mask=ok, other=0)
    lab = tl.load(labels_ptr + b * s_lb + tok.to(tl.int64) * s_ln, mask=ok, other=0).to(tl.int32)
    # Unchecked on the GPU (a host sync): an out-of-range label is clamped rather than faulting.
    lab = tl.minimum(tl.maximum(lab, 0), nc - 1)
    r = tl.load(scr_rank + lab, mask=ok, other=0)
    size = tl.histogram(r, BLOCK_NC, mask=ok)  # tokens per rank
    start = tl.cumsum(size, 0) - size
    k1 = _sort_keys(tl.where(ok, (r << IBITS) | j, _KEY32_MAX))
    r1 = tl.where(ok, k1 >> IBITS, 0)
    m1 = k1 & IMASK  # d rank
    p1 = j - tl.gather(start, r1, 0)

    if FIRST:
        # Walk clusters by rank taking each one's top k // 10 by d, stop at k; fill with the
        # largest d: key 3 is (not taken, d rank).
        cand = ok & (p1 < first_quota)
        take = cand & (tl.cumsum(cand.to(tl.int32), 0) <= k)
        k3 = _sort_keys(tl.where(ok, ((1 - take.to(tl.int32)) << IBITS) | m1, _KEY32_MAX))
        sel_tok = tl.load(scr_tok_d + (k3 & IMASK), mask=ok, other=0)
    else:
        # Quota m_r * base (m = 3, 2, 1, ...) capped by the cluster size; tier 0 = top by d,
        # ordered by d rank; tier 1 by staleness rank. Within a group all ranks are of one kind,
        # so the keys stay unique.
        mult1 = tl.where(r1 == 0, 3, tl.where(r1 == 1, 2, 1))
        quota1 = tl.minimum(mult1 * base, tl.gather(size, r1, 0))
        tier = (p1 >= quota1).to(tl.int32)
        group = 2 * r1 + tier
        tok1 = tl.load(scr_tok_d + m1, mask=ok & (tier != 0), other=0)
        rank_s1 = tl.load(scr_rank_s + tok1, mask=ok & (tier != 0), other=0)
        v1 = tl.where(tier == 0, m1, rank_s1)
        gsize = tl.histogram(group, 2 * BLOCK_NC, mask=ok)
        gstart = tl.cumsum(gsize, 0) - gsize
        k2 = _sort_keys(tl.where(ok, (group << IBITS) | v1, _KEY32_MAX))
        g2 = tl.where(ok, k2 >> IBITS, 0)
        v2 = k2 & IMASK
        p2 = j - tl.gather(gstart, g2, 0)
        r2 = g2 >> 1
        mult2 = tl.where(r2 == 0, 3, tl.where(r2 == 1, 2, 1))
        quota2 = tl.minimum(mult2 * base, tl.gather(size, r2, 0))
        # Candidates: tier 0, plus the quota // 2 stalest of tier 1 in clusters of rank >= 1.
        tier0 = (g2 & 1) == 0
        cand = ok & (tier0 | ((r2 >= 1) & (p2 < quota2 // 2)))
        take = cand & (tl.cumsum(cand.to(tl.int32), 0) <= budget)
        # Fill with the stalest: key 3 is (not taken, staleness rank).
        tok2 = tl.load(scr_tok_d + v2, mask=ok & tier0, other=0)
        v2s = tl.where(tier0, tl.load(scr_rank_s + tok2, mask=ok & tier0, other=0), v2)
        k3 = _sort_keys(tl.where(ok, ((1 - take.to(tl.int32)) << IBITS) | v2s, _KEY32_MAX))
        sel_tok = tl.load(scr_tok_s + (k3 & IMASK), mask=ok, other=0)

    # --- the first k of order 3 win.
    tl.store(scr_sel + sel_tok, (j < k).to(tl.int32), mask=ok)
    tl.debug_barrier()
    i = tl.arange(0, BLOCK_N)
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
    # About 8 keys per thread up to 16 warps: at BLOCK_N = 4096, sm_90, 16 warps use 128
    # registers and no spills where 8 warps hit 255 registers and spill. 32 warps cap a thread
    # at 64 registers: at BLOCK_N = 16384 the selection then spills more than with 16 warps
    # (and ptxas, left alone, even picks 32 registers), so 16 warps hold 32 keys per thread.
    return max(4, min(16, block_n // 256))


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

    Same contract as reference.select_tokens (validated by cat_kernels.ops). Two launches, no host sync.
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
    scratch = torch.empty((B, 6, scratch_stride), device=d.device, dtype=torch.int32)
    num_warps = _num_warps(block_n)
    # Two launches, no host sync: the float orders become rank tables first (d and staleness
    # in parallel programs), so the selection sorts only 32-bit (group, rank) keys.
    launch.kernel(_rank_tokens_kernel)[(B, 1 if first else 2)](
        d, staleness, scratch, N, scratch_stride, d.stride(0), d.stride(1), staleness.stride(0), staleness.stride(1),
        BLOCK_N=block_n, num_warps=num_warps,
    )
    # The integer budgets are computed in Python exactly as the reference does.
    launch.kernel(_select_tokens_kernel)[(B,)](
        cluster_score, labels, staleness, idx, scratch,
        N, nc, k, k // 10, int(0.05 * k), int(importance_fraction * k), float(staleness_decay), scratch_stride,
        cluster_score.stride(0), cluster_score.stride(1),
        labels.stride(0), labels.stride(1), staleness.stride(0), staleness.stride(1),
        FIRST=bool(first), BLOCK_N=block_n, BLOCK_NC=block_nc,
        num_warps=num_warps, enable_fp_fusion=False,
    )
    return idx


select_tokens = select_tokens_triton
