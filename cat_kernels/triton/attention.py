"""Triton attention of a pruned step over forecast K/V caches, formed on the fly (issue 21 item 2).

On a pruned step M query rows attend over all N image tokens plus T extra (text) rows. The
unfused path first writes every skipped token's forecast key/value into a buffer
(forecast_kv_), appends the text rows (torch.cat) and runs SDPA over the result: bf16 caches
with fp32 slopes move about 14 bytes per cached element. Here each program forms its key and
value tiles from base + weight * slope while it attends, so it reads 4-6 bytes per cached
element (base and slope) and the buffer and the cat disappear.

Layout: one program per (BLOCK_M query rows, b, h); it walks the N image keys in BLOCK_N tiles,
then the T extra rows, with an online softmax (flash-attention style) and fp32 accumulators.
Adjacent programs share (b, h), so the query blocks of one head read its caches while they are
in L2.

Head dims that are not a power of two (72 in PixArt-alpha/sigma and DiT-XL) are split into a
power-of-two part and a 16-wide remainder, each its own tl.dot: D = 72 runs as 64 + 16 (8 of the
80 MMA columns masked: 11% more tensor-core work on both products, no extra bytes: the masked
lanes are never loaded or stored). Padding to 128 instead would cost 78% more MMA work and the
registers of a 128-wide accumulator. tl.dot needs every dimension >= 16, so an 8-wide remainder
cannot be its own dot; D = 96 runs as 64 + 32 with nothing wasted.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import launch
from .forecast import _cast_to

__all__ = ["forecast_attention"]

LOG2E = 1.4426950408889634  # exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 128  # above, the accumulators and the formed tiles spill (checked for 256)
# The online softmax's starting maximum (log2 units): below any logit a model makes, finite so that
# exp2(MIN_LOGIT - MIN_LOGIT) is 1 while every key so far was left out
MIN_LOGIT = tl.constexpr(-1.0e30)


@triton.jit
def _form_tile(base_ptr, slope_ptr, off, mask, w, HAS_SLOPE: tl.constexpr, ROUND_BF16: tl.constexpr):
    """base + w * slope for a (BLOCK_N, BLOCK_D) tile, rounded to base's dtype (forecast_kv_'s
    out rows). The launcher turns fp fusion off: product and sum round separately, like torch."""
    base = tl.load(base_ptr + off, mask=mask, other=0.0)
    if HAS_SLOPE:
        slope = tl.load(slope_ptr + off, mask=mask, other=0.0).to(tl.float32)
        base = _cast_to(base.to(tl.float32) + w[:, None] * slope, base_ptr, ROUND_BF16)
    return base


@triton.jit
def _operand(x, like_ptr, LOWP: tl.constexpr, INTERPRET: tl.constexpr):
    """A dot operand: the call's 16-bit dtype when every input is in it (exact: the tile is
    already in it), else fp32. The CPU interpreter multiplies bf16 tiles as their raw uint16
    bits, so there bf16 operands go in as fp32 (exact, and products of bf16 are exact in fp32)."""
    y = x.to(tl.float32)
    if LOWP:
        y = x.to(like_ptr.dtype.element_ty)
        if INTERPRET:
            if like_ptr.dtype.element_ty == tl.bfloat16:
                y = x.to(tl.float32)
    return y


@triton.jit
def _dot(a, b, LOWP: tl.constexpr):
    # fp32 operands: 3xTF32 on the tensor cores (each operand split in two TF32 parts, three
    # products), about fp32's accuracy; plain TF32 (the default) keeps 10 mantissa bits, and IEEE
    # FMA dots hold a whole row of K per thread and spill at every tile size tried.
    if LOWP:
        c = tl.dot(a, b)
    else:
        c = tl.dot(a, b, input_precision="tf32x3")
    return c


@triton.jit
def _online_update(
    s, key_ok, m_i, l_i, acc0, acc1, v0, v1, v_like_ptr,
    SPLIT: tl.constexpr, LOWP: tl.constexpr, INTERPRET: tl.constexpr,
):
    """One key tile of the online softmax: s = logits * log2(e) (BLOCK_M, BLOCK_N), fp32."""
    s = tl.where(key_ok[None, :], s, float("-inf"))
    # m_i starts at MIN_LOGIT, not -inf: a tile whose keys are all left out (negative weights, the
    # extra mask) then gives alpha 1 and p 0, not NaN
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # P in the values' 16-bit dtype (flash attention's rounding) or fp32; the sum above is fp32.
    pv = p
    if LOWP:
        pv = _operand(_cast_to(p, v_like_ptr, INTERPRET), v_like_ptr, LOWP, INTERPRET)
    acc0 = acc0 * alpha[:, None] + _dot(pv, v0, LOWP)
    if SPLIT:
        acc1 = acc1 * alpha[:, None] + _dot(pv, v1, LOWP)
    return m_new, l_i, acc0, acc1


@triton.jit
def _image_tile(base_ptr, slope_ptr, off, mask, w, like_ptr,
                HAS_SLOPE: tl.constexpr, LOWP: tl.constexpr, INTERPRET: tl.constexpr):
    """Formed keys or values at offsets `off` of a cache (unit stride along D), as a dot operand."""
    return _operand(_form_tile(base_ptr, slope_ptr, off, mask, w, HAS_SLOPE, INTERPRET), like_ptr, LOWP, INTERPRET)


@triton.jit
def _strided_tile(ptr, rows, s_row, cols, s_col, mask, like_ptr, LOWP: tl.constexpr, INTERPRET: tl.constexpr):
    """Rows of q or of the extra keys/values (any strides) as a dot operand; zeros where masked."""
    x = tl.load(ptr + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask, other=0.0)
    return _operand(x, like_ptr, LOWP, INTERPRET)


@triton.jit
def _forecast_attention_kernel(
    q_ptr, kb_ptr, vb_ptr, ks_ptr, vs_ptr, w_ptr, kx_ptr, vx_ptr, xm_ptr, o_ptr,
    H, M, N, T, qk_scale,
    s_qb, s_qh, s_qm, s_qd,
    s_cb, s_ch,
    s_wb, s_wn,
    s_kxb, s_kxh, s_kxt, s_kxd,
    s_vxb, s_vxh, s_vxt, s_vxd,
    s_xmb, s_xmt,
    HAS_SLOPE: tl.constexpr, HAS_XMASK: tl.constexpr, LOWP: tl.constexpr, INTERPRET: tl.constexpr,
    SPLIT: tl.constexpr, D: tl.constexpr, S_CN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
):
    """out[b,h,m] = sum_j softmax_j(q[b,h,m] . key_j * scale) value_j over the N image tokens,
    key_n = round(k_base[b,h,n] + weight[b,n] * k_slope[b,h,n]) (value likewise), then the T
    extra rows k_extra/v_extra[b,h,t] as given; with HAS_SLOPE an image token of negative weight
    is left out, with HAS_XMASK an extra row whose extra_mask[b,t] is 0. fp32 logits, softmax
    and accumulators.

    q: (B, H, M, D) any strides; k_base, v_base, k_slope, v_slope: (B, H, N, D) sharing strides
    (s_cb, s_ch, S_CN, 1), any float dtypes (slopes unused without HAS_SLOPE); weight: (B, N)
    fp32 any strides; extra_mask: (B, T) uint8 (a bool tensor's bytes) any strides; k_extra,
    v_extra: (B, H, T, D) any strides; out: (B, H, M, D) contiguous, q's dtype. qk_scale = scale *
    log2(e). Channels [0, BLOCK_D0) and, with SPLIT, [BLOCK_D0, BLOCK_D0 + BLOCK_D1) masked to D.
    LOWP: q and every key/value input share one 16-bit dtype, the dots' operand type. Grid
    (cdiv(M, BLOCK_M), B * H). Source: issue 21 item 2; docs/design.md section 7.

    D, the head dim, and S_CN, the caches' token stride (D, or H * D for a (B, N, H * D) cache),
    are constexprs: fixed per model and layout (one compile each), and knowing them lets the
    compiler prove that a D = 72 row (144 bytes) starts 16-byte aligned; as runtime values
    Triton only tracks divisibility by 16, and D = 72 rows then load 2 bytes at a time.
    """
    # Offsets of a (b, h) slice in int64 scalars (B*H*N*D passes 2^31 for video-sized caches);
    # offsets inside it in int32 tensors (the launcher checks they fit): 64-bit tiles of
    # addresses for four cache streams would cost more registers than the accumulators.
    bh = tl.program_id(1).to(tl.int64)
    b = bh // H
    h = bh % H
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    c0 = tl.arange(0, BLOCK_D0)
    c1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
    c0_ok = c0 < D
    c1_ok = c1 < D
    j = tl.arange(0, BLOCK_N)

    q_bh = q_ptr + b * s_qb + h * s_qh
    q0 = _strided_tile(q_bh, rows, s_qm, c0, s_qd, row_ok[:, None] & c0_ok[None, :], q_ptr, LOWP, INTERPRET)
    q1 = q0  # never read without SPLIT
    if SPLIT:
        q1 = _strided_tile(q_bh, rows, s_qm, c1, s_qd, row_ok[:, None] & c1_ok[None, :], q_ptr, LOWP, INTERPRET)

    m_i = tl.full((BLOCK_M,), MIN_LOGIT, tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc0 = tl.zeros((BLOCK_M, BLOCK_D0), tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_D1), tl.float32)  # never touched without SPLIT

    # Image keys and values, formed from the caches tile by tile (never written anywhere). The
    # four caches share one layout, so one offset tile serves them all.
    head = b * s_cb + h * s_ch
    kb_h, vb_h, ks_h, vs_h = kb_ptr + head, vb_ptr + head, ks_ptr + head, vs_ptr + head
    w_b = w_ptr + b * s_wb
    tile0 = j[:, None] * S_CN + c0[None, :]
    tile1 = j[:, None] * S_CN + c1[None, :]
    for start in range(0, N, BLOCK_N):
        n = start + j
        n_ok = n < N
        key_ok = n_ok
        w = tl.zeros((BLOCK_N,), tl.float32)  # unused without slopes
        if HAS_SLOPE:
            w = tl.load(w_b + n * s_wn, mask=n_ok, other=0.0)
            key_ok = n_ok & (w >= 0.0)  # negative: a token this step computed, among the extra rows
        off0 = start * S_CN + tile0
        m0 = n_ok[:, None] & c0_ok[None, :]
        k0 = _image_tile(kb_h, ks_h, off0, m0, w, q_ptr, HAS_SLOPE, LOWP, INTERPRET)
        v0 = _image_tile(vb_h, vs_h, off0, m0, w, q_ptr, HAS_SLOPE, LOWP, INTERPRET)
        s = _dot(q0, tl.trans(k0), LOWP)
        v1 = v0
        if SPLIT:
            off1 = start * S_CN + tile1
            m1 = n_ok[:, None] & c1_ok[None, :]
            k1 = _image_tile(kb_h, ks_h, off1, m1, w, q_ptr, HAS_SLOPE, LOWP, INTERPRET)
            v1 = _image_tile(vb_h, vs_h, off1, m1, w, q_ptr, HAS_SLOPE, LOWP, INTERPRET)
            s += _dot(q1, tl.trans(k1), LOWP)
        m_i, l_i, acc0, acc1 = _online_update(
            s * qk_scale, key_ok, m_i, l_i, acc0, acc1, v0, v1, q_ptr, SPLIT, LOWP, INTERPRET
        )

    # Extra (text) rows, as given.
    kx_bh = kx_ptr + b * s_kxb + h * s_kxh
    vx_bh = vx_ptr + b * s_vxb + h * s_vxh
    for start in range(0, T, BLOCK_N):
        t = start + j
        t_ok = t < T
        key_ok = t_ok
        if HAS_XMASK:
            key_ok = t_ok & (tl.load(xm_ptr + b * s_xmb + t * s_xmt, mask=t_ok, other=0) != 0)
        m0 = t_ok[:, None] & c0_ok[None, :]
        k0 = _strided_tile(kx_bh, t, s_kxt, c0, s_kxd, m0, q_ptr, LOWP, INTERPRET)
        v0 = _strided_tile(vx_bh, t, s_vxt, c0, s_vxd, m0, q_ptr, LOWP, INTERPRET)
        s = _dot(q0, tl.trans(k0), LOWP)
        v1 = v0
        if SPLIT:
            m1 = t_ok[:, None] & c1_ok[None, :]
            k1 = _strided_tile(kx_bh, t, s_kxt, c1, s_kxd, m1, q_ptr, LOWP, INTERPRET)
            v1 = _strided_tile(vx_bh, t, s_vxt, c1, s_vxd, m1, q_ptr, LOWP, INTERPRET)
            s += _dot(q1, tl.trans(k1), LOWP)
        m_i, l_i, acc0, acc1 = _online_update(
            s * qk_scale, key_ok, m_i, l_i, acc0, acc1, v0, v1, q_ptr, SPLIT, LOWP, INTERPRET
        )

    inv_l = 1.0 / l_i
    o_row = o_ptr + bh * M * D + rows[:, None] * D
    tl.store(o_row + c0[None, :], _cast_to(acc0 * inv_l[:, None], o_ptr, INTERPRET),
             mask=row_ok[:, None] & c0_ok[None, :])  # fmt: skip
    if SPLIT:
        tl.store(o_row + c1[None, :], _cast_to(acc1 * inv_l[:, None], o_ptr, INTERPRET),
                 mask=row_ok[:, None] & c1_ok[None, :])  # fmt: skip


def head_dim_split(D: int) -> tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1): a power-of-two part and a power-of-two remainder >= 16 (0: none).

    64 -> (64, 0), 72 -> (64, 16), 96 -> (64, 32), 128 -> (128, 0), 8 -> (16, 0) (tl.dot needs
    >= 16 on every dimension; sizes under 16 are padded).
    """
    if D <= 16:
        return 16, 0
    d0 = 1 << (D.bit_length() - 1)  # the largest power of two <= D
    rest = D - d0
    if rest == 0:
        return d0, 0
    return d0, max(16, triton.next_power_of_2(rest))


def config(D: int, lowp: bool, slope_bytes: int) -> dict[str, int | bool]:
    """Block sizes, warps and stages for head dim D.

    Chosen so that ptxas reports no spills for sm_80 and sm_90 (tests/kernels/test_aot_compile.py;
    untimed: no GPU was at hand, bench/kernel_bench.py times them). Each program forms its K/V
    tiles in registers (base and slope loaded, fp32 math), so the key tile shrinks as D and the
    slopes' width grow. lowp: 16-bit operands (tensor cores); fp32 inputs take 3xTF32 dots,
    whose split operands need smaller tiles. slope_bytes: 4 for fp32 slopes, 2 for 16-bit, 0 none.
    """
    d0, d1 = head_dim_split(D)
    width = d0 + d1
    cfg: dict[str, int | bool] = {"BLOCK_D0": d0, "BLOCK_D1": max(d1, 16), "SPLIT": d1 > 0, "num_stages": 2}
    if lowp:
        # 128 query rows per program: each program forms the whole N, so fewer, taller programs
        # read the caches fewer times.
        block_n = 64 if width <= 64 else (16 if slope_bytes > 2 else 32)
        cfg.update(BLOCK_M=128, BLOCK_N=block_n, num_warps=8)
    elif width <= 80:
        cfg.update(BLOCK_M=64, BLOCK_N=16, num_warps=4)
    else:
        # fp32 at D = 128 spills a little whatever the tile (measured: 220-396 B per thread,
        # SPILL_LIMITS in the AOT test); fp32 attention on a GPU is off the models' path.
        cfg.update(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
    return cfg


def _lowp(q: Tensor, *others: Tensor | None) -> bool:
    """True when q and every key/value input share one 16-bit dtype: the dots then run on it."""
    return q.dtype in (torch.float16, torch.bfloat16) and all(t is None or t.dtype == q.dtype for t in others)


def forecast_attention_triton(
    q: Tensor,
    k_base: Tensor,
    v_base: Tensor,
    k_slope: Tensor | None,
    v_slope: Tensor | None,
    weight: Tensor | None,
    k_extra: Tensor | None = None,
    v_extra: Tensor | None = None,
    extra_mask: Tensor | None = None,
    scale: float | None = None,
) -> Tensor:
    """Attention over forecast K/V caches formed on the fly; see reference.forecast_attention.

    Validated by cat_kernels.ops (shapes, dtypes, devices, the caches' shared strides, D <= 128).
    """
    B, H, M, D = q.shape
    N = k_base.shape[2]
    T = 0 if k_extra is None else k_extra.shape[2]
    out = torch.empty((B, H, M, D), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    if scale is None:
        scale = D**-0.5
    if D > MAX_HEAD_DIM:
        raise ValueError(f"forecast_attention (triton): head dim {D} > {MAX_HEAD_DIM}")
    if B * H > 65535:
        raise ValueError(f"forecast_attention (triton): B * H = {B * H} exceeds the grid's 65535")
    for name, t in (("q", q), ("k_base", k_base), ("k_extra", k_extra), ("v_extra", v_extra)):
        # Offsets inside one (b, h) slice are int32 in the kernel.
        if t is not None and (t.shape[2] - 1) * t.stride(2) + (D - 1) * t.stride(3) >= 2**31:
            raise ValueError(f"forecast_attention (triton): {name}'s strides {t.stride()} span 2^31 elements "
                             "within one head; pass a contiguous tensor")  # fmt: skip
    has_slope = k_slope is not None
    # Placeholders (never read) for absent inputs: the kernel compiles their loads away.
    ks, vs = (k_slope, v_slope) if has_slope else (k_base, v_base)
    w = weight if has_slope else torch.empty((1, 1), dtype=torch.float32, device=q.device)
    kx, vx = (k_extra, v_extra) if T > 0 else (q, q)
    kxs = k_extra.stride() if T > 0 else (0, 0, 0, 0)
    vxs = v_extra.stride() if T > 0 else (0, 0, 0, 0)
    has_xmask = extra_mask is not None and T > 0
    xm = extra_mask.view(torch.uint8) if has_xmask else w  # a bool's bytes; a placeholder never read
    lowp = _lowp(q, k_base, v_base, kx if T else None, vx if T else None)
    cfg = config(D, lowp, max(k_slope.element_size(), v_slope.element_size()) if has_slope else 0)
    grid = (triton.cdiv(M, cfg["BLOCK_M"]), B * H)
    launch.kernel(_forecast_attention_kernel)[grid](
        q, k_base, v_base, ks, vs, w, kx, vx, xm, out,
        H, M, N, T, float(scale) * LOG2E,
        *q.stride(), *k_base.stride()[:2], w.stride(0), w.stride(1), *kxs, *vxs, xm.stride(0), xm.stride(1),
        D=D, S_CN=k_base.stride(2), HAS_SLOPE=has_slope, HAS_XMASK=has_xmask, LOWP=lowp,
        INTERPRET=os.environ.get("TRITON_INTERPRET") == "1", enable_fp_fusion=False, **cfg,
    )  # fmt: skip
    return out


forecast_attention = forecast_attention_triton
