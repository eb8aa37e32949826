"""forecast_attention (issue 21 item 2) on every backend against cat_kernels.reference.

The op attends M queries over N image keys/values formed from forecast caches (base + weight *
slope, rounded to the cache's dtype) plus T extra rows. Backends: the torch reference, Triton
(on CUDA when present, else the CPU interpreter that conftest turns on) and the compiled
extension's blocked ATen implementation on CPU tensors; both GPU paths in a `gpu` test.

Numbers are compared with tolerances.py's attention rule: against an fp32 oracle (the
reference with q in fp32: the same formed rows, fp32 softmax), a backend's largest error is at
most twice that of plain torch in the same dtype (the unfused path: forecast rows, torch.cat,
SDPA) plus a small per-dtype atol. The reference is tied to today's unfused path: the rows it
forms are bit for bit the `out` rows forecast_kv_ writes, and its attention equals SDPA over
them. Fresh random inputs (never zero), awkward shapes (N not a multiple of a key tile, M = 1,
M over one query tile, T = 0 as None and as an empty tensor, N = 0, B*H > 1), head dims 16, 24,
64, 72 and 128, every dtype, fp32 slopes next to 16-bit caches, no slopes, weights with zeros,
q as a transposed (B, M, H, D) view, extra rows as sliced views.
"""

from __future__ import annotations

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from tolerances import assert_attention_close

from cat_kernels import backend, ops, reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
BLOCK_SPAN = 64  # at least one key tile of every backend (Triton's are 16-64 keys)
HAS_EXT = backend.extension_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="no triton")),
    pytest.param("ext", marks=pytest.mark.skipif(not HAS_EXT, reason="cat_kernels._C is not built (make ext)")),
]


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _module(name: str):
    if name == "torch":
        return reference
    if name == "triton":
        return importlib.import_module("cat_kernels.triton")
    return importlib.import_module("cat_kernels.extension")


def _randn(shape, gen, dtype, device, layout="contiguous"):
    """Random data, never zero. layout: "contiguous"; "transposed", (B, M, H, D) viewed as
    (B, H, M, D) as attention processors make q; "sliced", a slice of a wider tensor."""

    def draw(s):
        x = torch.randn(s, generator=gen)
        return torch.where(x == 0, torch.ones_like(x), x).to(dtype).to(device)

    B, H, L, D = shape
    if layout == "transposed":
        return draw((B, L, H, D)).transpose(1, 2)
    if layout == "sliced":
        return draw((B, H, 2 * L, D + 5))[:, :, ::2, 2 : 2 + D]
    return draw(shape)


def _weight(B, N, gen, device, kind="mixed"):
    """Forecast horizons in (0.05, 3.05], every third token 0 (computed tokens, plain reuse)."""
    w = torch.rand(B, N, generator=gen) * 3 + 0.05
    if kind == "mixed":
        w[:, ::3] = 0.0
    elif kind == "zeros":
        w.zero_()
    return w.to(device)


def _inputs(case, gen, device):
    """Keyword arguments of forecast_attention for one CASES entry (scale left to the caller)."""
    B, H, M, N, T, D, qdt, cdt, sdt, q_layout = case
    qdt, cdt = DTYPES[qdt], DTYPES[cdt]
    has_slope = sdt is not None
    a = {
        "q": _randn((B, H, M, D), gen, qdt, device, q_layout),
        "k_base": _randn((B, H, N, D), gen, cdt, device),
        "v_base": _randn((B, H, N, D), gen, cdt, device),
        "k_slope": _randn((B, H, N, D), gen, DTYPES[sdt], device) if has_slope else None,
        "v_slope": _randn((B, H, N, D), gen, DTYPES[sdt], device) if has_slope else None,
        "weight": _weight(B, N, gen, device) if has_slope else None,
        "k_extra": None,
        "v_extra": None,
    }
    if T is not None:  # T = 0 given as empty tensors
        a["k_extra"] = _randn((B, H, T, D), gen, qdt, device, "sliced")
        a["v_extra"] = _randn((B, H, T, D), gen, qdt, device, "sliced")
    return a


def _call(fn, a, scale=None):
    return fn(a["q"], a["k_base"], a["v_base"], a["k_slope"], a["v_slope"], a["weight"], a["k_extra"], a["v_extra"],
              a.get("extra_mask"), scale)  # fmt: skip


def _oracle(a, scale=None):
    """The reference with q in fp32: the same formed rows and extras, fp32 throughout, no rounding."""
    return _call(reference.forecast_attention, {**a, "q": a["q"].float()}, scale)


def _plain(a, scale=None):
    """Plain torch in q's dtype, the unfused path: forecast rows, torch.cat, SDPA (with a boolean
    key mask where tokens are left out: negative weights, extra_mask)."""
    q = a["q"]
    keys = [reference.forecast_rows(a["k_base"], a["k_slope"], a["weight"]).to(q.dtype)]
    values = [reference.forecast_rows(a["v_base"], a["v_slope"], a["weight"]).to(q.dtype)]
    B, N = q.shape[0], a["k_base"].shape[2]
    attend = [a["weight"] >= 0 if a["k_slope"] is not None else torch.ones(B, N, dtype=torch.bool, device=q.device)]
    if a["k_extra"] is not None:
        keys.append(a["k_extra"].to(q.dtype))
        values.append(a["v_extra"].to(q.dtype))
        mask = a.get("extra_mask")
        attend.append(torch.ones(B, a["k_extra"].shape[2], dtype=torch.bool, device=q.device) if mask is None else mask)
    mask = torch.cat(attend, 1)[:, None, None, :]
    return F.scaled_dot_product_attention(q, torch.cat(keys, 2), torch.cat(values, 2), attn_mask=mask, scale=scale)


def _check(out, a, scale=None):
    q = a["q"]
    assert out.shape == q.shape and out.dtype == q.dtype and out.is_contiguous()
    assert_attention_close(out, _oracle(a, scale), _plain(a, scale), q.dtype)


# B, H, M, N, T (None: no extra rows), D, q dtype, cache dtype, slope dtype (None: no slopes), q layout
CASES = [
    (2, 3, 1, 77, None, 64, "bf16", "bf16", "fp32", "transposed"),  # M = 1, no text, fp32 slopes
    (1, 2, 37, 130, 21, 72, "bf16", "bf16", "bf16", "transposed"),  # 72 = 64 + 16 split
    (3, 1, 9, 65, 7, 128, "fp16", "fp16", "fp16", "contiguous"),
    (2, 2, 19, 50, 11, 16, "fp32", "fp32", "fp32", "sliced"),
    (1, 2, 130, 33, 5, 24, "bf16", "bf16", None, "contiguous"),  # two query tiles, 24 = 16 + 16, reuse
    (2, 1, 6, 40, 3, 64, "fp32", "bf16", "fp32", "transposed"),  # fp32 q over a bf16 cache
    (1, 2, 4, 0, 9, 16, "fp16", "fp16", "fp16", "contiguous"),  # N = 0: extra rows only
    (2, 2, 5, 70, 0, 72, "fp16", "fp16", "fp32", "contiguous"),  # T = 0 as empty tensors
]


def _case_id(case):
    B, H, M, N, T, D, qdt, cdt, sdt, layout = case
    return f"B{B}H{H}M{M}N{N}T{T}D{D}-q{qdt}-cache{cdt}-slope{sdt}-{layout}"


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forecast_attention(case, name, device):
    device = "cpu" if name == "ext" else device  # the extension's CUDA path has its gpu test
    gen = torch.Generator().manual_seed(1000 + sum(x for x in case[:6] if x))
    a = _inputs(case, gen, device)
    _check(_call(_module(name).forecast_attention, a), a)


@pytest.mark.parametrize("name", BACKENDS)
def test_scale_and_mixed_dtypes(name, device):
    """A scale of its own; K and V caches of different dtypes, extras in another dtype than q."""
    device = "cpu" if name == "ext" else device
    gen = torch.Generator().manual_seed(1100)
    a = _inputs((2, 2, 11, 45, 6, 64, "bf16", "bf16", "fp32", "transposed"), gen, device)
    a["v_base"] = a["v_base"].float()
    a["v_extra"] = a["v_extra"].float()
    _check(_call(_module(name).forecast_attention, a, 0.3), a, 0.3)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_zero_weight_is_reuse(dt, name, device):
    """weight 0 with slopes attends the bases as they are: bit equal to passing no slopes. (At
    D = 64 the Triton kernel's tiles do not depend on the slopes' width; at 72 and 128 they do,
    and a different tiling rounds the online softmax differently.)"""
    device = "cpu" if name == "ext" else device
    gen = torch.Generator().manual_seed(1200 + len(dt))
    a = _inputs((2, 2, 7, 70, 5, 64, dt, dt, "fp32", "contiguous"), gen, device)
    a["weight"] = torch.zeros_like(a["weight"])
    fn = _module(name).forecast_attention
    assert torch.equal(_call(fn, a), _call(fn, {**a, "k_slope": None, "v_slope": None, "weight": None}))


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_negative_weight_leaves_tokens_out(dt, name, device):
    """With slopes, image tokens of negative weight are not attended (a pruned step's computed
    tokens, passed among the extra rows): the same as the op over the other tokens alone, within
    the attention rule. Every token of the first key tiles is left out (the online softmax starts
    on a tile with no key: no NaN), then every third one; different tokens per sample."""
    device = "cpu" if name == "ext" else device
    gen = torch.Generator().manual_seed(1250 + len(dt))
    B, H, M, N, T, D = 2, 2, 9, 150, 6, 72
    a = _inputs((B, H, M, N, T, D, dt, dt, "fp32", "transposed"), gen, device)
    left_out = torch.zeros(B, N, dtype=torch.bool)
    left_out[0, :70] = True
    left_out[1, 3::3] = True
    left_out[1, :40] = True
    a["weight"] = torch.where(left_out.to(device), -1.0, a["weight"])
    out = _call(_module(name).forecast_attention, a)
    _check(out, a)
    for b in range(B):  # the reference over the attended tokens only
        keep = (~left_out[b]).nonzero().squeeze(1).to(device)
        kept = {k: (v[b : b + 1].index_select(2, keep) if k in ("k_base", "v_base", "k_slope", "v_slope")
                    else v[b : b + 1, keep] if k == "weight" else v[b : b + 1]) for k, v in a.items()}  # fmt: skip
        assert_attention_close(out[b : b + 1], _oracle(kept), _plain(kept), DTYPES[dt])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_extra_mask_leaves_rows_out(dt, name, device):
    """extra_mask (B, T) leaves the extra rows marked False out (a padded prompt's text): the
    same as the op over the other rows alone; with every image token left out too (negative
    weights), the first attended key comes in the extras' second tile. An all-True mask is no
    mask, bit for bit."""
    device = "cpu" if name == "ext" else device
    gen = torch.Generator().manual_seed(1270 + len(dt))
    B, H, M, N, T, D = 2, 2, 5, 40, 90, 64
    a = _inputs((B, H, M, N, T, D, dt, dt, "fp32", "contiguous"), gen, device)
    fn = _module(name).forecast_attention
    ones = torch.ones(B, T, dtype=torch.bool, device=device)
    assert torch.equal(_call(fn, {**a, "extra_mask": ones}), _call(fn, a))
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 60:80] = False
    mask[1, ::2] = False
    a["extra_mask"] = mask.to(device)
    out = _call(fn, a)
    _check(out, a)
    for b in range(B):  # the reference over the attended rows only
        keep = mask[b].nonzero().squeeze(1).to(device)
        kept = {k: (v[b : b + 1].index_select(2, keep) if k in ("k_extra", "v_extra") else v[b : b + 1])
                for k, v in a.items() if k != "extra_mask"}  # fmt: skip
        assert_attention_close(out[b : b + 1], _oracle(kept), _plain(kept), DTYPES[dt])
    a["weight"] = torch.full_like(a["weight"], -1.0)
    a["extra_mask"][:, :BLOCK_SPAN] = False
    _check(_call(fn, a), a)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_caches_as_heads_views(dt, name, device):
    """(B, N, H * D) caches (Flux's, Wan's: the flat layout) attended through their (B, H, N, D)
    views: the same as the contiguous copies, bit for bit, with and without slopes."""
    device = "cpu" if name == "ext" else device
    gen = torch.Generator().manual_seed(1260 + len(dt))
    B, H, M, N, T, D = 2, 3, 7, 70, 5, 64
    a = _inputs((B, H, M, N, T, D, dt, dt, "bf16" if dt == "bf16" else "fp32", "transposed"), gen, device)
    flat = {k: a[k].transpose(1, 2).contiguous().transpose(1, 2) for k in ("k_base", "v_base", "k_slope", "v_slope")}
    assert flat["k_base"].stride() == (N * H * D, D, H * D, 1)
    fn = _module(name).forecast_attention
    assert torch.equal(_call(fn, {**a, **flat}), _call(fn, a))
    reuse = {"k_slope": None, "v_slope": None, "weight": None}
    assert torch.equal(_call(fn, {**a, **flat, **reuse}), _call(fn, {**a, **reuse}))


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_reference_is_the_unfused_path(dt):
    """The fused op on the refreshed caches is today's path: forecast_kv_ (refresh the computed
    tokens, forecast the skipped ones into k_out/v_out), torch.cat with the text rows, SDPA.

    The rows it forms are exactly forecast_kv_'s out rows (with weight 0 on the computed tokens,
    whose bases forecast_kv_ has just refreshed), and its output equals SDPA over them within
    the attention rule.
    """
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(1300 + len(dt))
    B, H, M, N, T, D, K = 2, 3, 17, 90, 13, 64, 30
    idx = torch.stack([torch.randperm(N, generator=gen)[:K].sort().values for _ in range(B)])
    pos = torch.full((B, N), -1, dtype=torch.int64).scatter_(1, idx, torch.arange(K).expand(B, K).contiguous())
    kb, vb = (_randn((B, H, N, D), gen, dtype, "cpu") for _ in range(2))
    ks, vs = (_randn((B, H, N, D), gen, torch.float32, "cpu") for _ in range(2))
    k_out, v_out = (_randn((B, H, N, D), gen, dtype, "cpu") for _ in range(2))
    k_new, v_new = (_randn((B, H, K, D), gen, dtype, "cpu", "transposed") for _ in range(2))
    weight = _weight(B, N, gen, "cpu", "none")
    inv_dt = torch.rand(B, N, generator=gen) + 0.25
    reference.forecast_kv_(kb, vb, ks, vs, k_out, v_out, pos, k_new, v_new, weight, inv_dt, 2)

    w = torch.where(pos >= 0, 0.0, weight)  # computed tokens: their refreshed base as it is
    assert torch.equal(reference.forecast_rows(kb, ks, w), k_out)
    assert torch.equal(reference.forecast_rows(vb, vs, w), v_out)

    q = _randn((B, H, M, D), gen, dtype, "cpu", "transposed")
    kx, vx = (_randn((B, H, T, D), gen, dtype, "cpu", "sliced") for _ in range(2))
    unfused = F.scaled_dot_product_attention(q, torch.cat([k_out, kx], 2), torch.cat([v_out, vx], 2))
    a = {"q": q, "k_base": kb, "v_base": vb, "k_slope": ks, "v_slope": vs, "weight": w, "k_extra": kx, "v_extra": vx}
    fused = _call(reference.forecast_attention, a)
    assert_attention_close(fused, _oracle(a), unfused, dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)


def test_reference_matches_per_query_loop():
    """The reference against the definition written out per query, in float64."""
    gen = torch.Generator().manual_seed(1400)
    B, H, M, N, T, D = 2, 2, 3, 11, 4, 8
    a = _inputs((B, H, M, N, T, D, "fp32", "bf16", "fp32", "contiguous"), gen, "cpu")
    out = _call(reference.forecast_attention, a, 0.7)
    for b in range(B):
        for h in range(H):
            keys, values = [], []
            for n in range(N):
                w = float(a["weight"][b, n])
                for base, slope, dst in (("k_base", "k_slope", keys), ("v_base", "v_slope", values)):
                    x = a[base][b, h, n].float()
                    step = w * a[slope][b, h, n]  # fp32 product, then fp32 sum, then bf16
                    dst.append((x + step).to(torch.bfloat16).double())
            keys += list(a["k_extra"][b, h].double())
            values += list(a["v_extra"][b, h].double())
            kmat, vmat = torch.stack(keys), torch.stack(values)
            for m in range(M):
                p = torch.softmax(kmat @ a["q"][b, h, m].double() * 0.7, 0)
                torch.testing.assert_close(out[b, h, m].double(), p @ vmat, rtol=1e-5, atol=1e-6)


def test_through_ops_every_backend_agrees(device):
    """The public op with each available backend, default scale 1/sqrt(D)."""
    gen = torch.Generator().manual_seed(1500)
    a = _inputs((2, 3, 10, 45, 8, 64, "bf16", "bf16", "fp32", "transposed"), gen, device)
    expect = ops.forecast_attention(**a, backend="torch")
    assert torch.equal(expect, ops.forecast_attention(**a, scale=64**-0.5, backend="torch"))
    names = ["auto"] + (["triton"] if HAS_TRITON else []) + (["cuda"] if HAS_EXT else [])
    for name in names:
        _check(ops.forecast_attention(**a, backend=name), a)


# ----------------------------------------------------------------------------- validation


def _valid(gen, B=2, H=3, M=4, N=10, T=5, D=8):
    return _inputs((B, H, M, N, T, D, "fp32", "fp32", "fp32", "contiguous"), gen, "cpu")


def test_errors_name_the_argument():
    a = _valid(torch.Generator().manual_seed(1600))
    contiguous_not = torch.randn(2, 3, 8, 10).transpose(2, 3)
    bad = [
        ("q must have 4 dimensions", {"q": a["q"][0]}),
        ("q must have dtype", {"q": a["q"].double()}),
        ("k_base must have shape", {"k_base": a["k_base"][:, :2]}),
        ("k_base must have shape", {"k_base": a["k_base"][..., :4]}),
        ("v_base must have the shape", {"v_base": a["v_base"][:, :, :9]}),
        ("k_base must have unit stride along D", {"k_base": contiguous_not}),
        ("v_slope must have unit stride along D and k_base's strides", {"v_slope": contiguous_not}),
        ("v_base must have unit stride along D and k_base's strides",
         {"v_base": torch.randn(2, 10, 3, 8).transpose(1, 2)}),
        ("k_slope must have the shape", {"k_slope": a["k_slope"][:, :, :9]}),
        ("v_slope must have dtype", {"v_slope": a["v_slope"].int()}),
        ("k_slope and v_slope go together", {"v_slope": None}),
        ("v_slope and k_slope go together", {"k_slope": None}),
        ("weight must be given", {"weight": None}),
        ("weight must have shape", {"weight": a["weight"][:, :9]}),
        ("weight must have dtype", {"weight": a["weight"].half()}),
        ("k_extra and v_extra go together", {"v_extra": None}),
        ("k_extra must have shape", {"k_extra": a["k_extra"][..., :4]}),
        ("v_extra must have the shape", {"v_extra": a["v_extra"][:, :, :3]}),
        ("head dim", {"q": torch.randn(2, 3, 4, 136), "k_base": torch.randn(2, 3, 10, 136)}),
        ("at least one key", {"k_base": torch.randn(2, 3, 0, 8), "v_base": torch.randn(2, 3, 0, 8),
                              "k_slope": None, "v_slope": None, "weight": None, "k_extra": None, "v_extra": None}),
        ("k_extra is on", {"k_extra": a["k_extra"].to("meta")}),
        ("extra_mask must have dtype", {"extra_mask": torch.ones(2, 5)}),
        ("extra_mask must have shape", {"extra_mask": torch.ones(2, 4, dtype=torch.bool)}),
        ("extra_mask was given without", {"extra_mask": torch.ones(2, 0, dtype=torch.bool), "k_extra": None,
                                          "v_extra": None}),
        ("weight is on", {"weight": a["weight"].to("meta")}),
    ]  # fmt: skip
    for match, change in bad:
        with pytest.raises(ValueError, match=match):
            ops.forecast_attention(**{**a, **change})
    for scale in (float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="scale"):
            ops.forecast_attention(**a, scale=scale)
    with pytest.raises(ValueError, match="backend"):
        ops.forecast_attention(**a, backend="nope")
    # The valid call runs, and the unused weight may be left out without slopes.
    assert ops.forecast_attention(**a).shape == a["q"].shape
    ops.forecast_attention(**{**a, "k_slope": None, "v_slope": None, "weight": None})


@pytest.mark.skipif(not HAS_EXT, reason="cat_kernels._C is not built (make ext)")
def test_extension_errors_name_the_argument():
    ext = importlib.import_module("cat_kernels.extension")
    a = _valid(torch.Generator().manual_seed(1601))
    for match, change in [
        ("k_base must have unit stride along D", {"k_base": torch.randn(2, 3, 8, 10).transpose(2, 3)}),
        ("v_base must have k_base's strides", {"v_base": torch.randn(2, 10, 3, 8).transpose(1, 2)}),
        ("k_slope and v_slope go together", {"v_slope": None}),
        ("weight must have shape", {"weight": a["weight"][:1]}),
        ("v_extra must have the shape", {"v_extra": a["v_extra"][:, :, :2]}),
        ("head dim", {"q": torch.randn(2, 3, 4, 136), "k_base": torch.randn(2, 3, 10, 136)}),
    ]:
        with pytest.raises(RuntimeError, match=match):
            _call(ext.forecast_attention, {**a, **change})


# ----------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_torch_compile_fullgraph_matches_eager(name, device):
    if name == "triton" and not HAS_TRITON:
        pytest.skip("no triton")
    gen = torch.Generator().manual_seed(1700)
    a = _inputs((2, 2, 6, 40, 5, 16, "fp32", "fp32", "fp32", "transposed"), gen, device)

    def step(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra):
        out = ops.forecast_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, backend=name)
        return out.transpose(1, 2) * 2  # the processor's reshape and output projection read it

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="eager")
    assert torch.equal(compiled(**a), step(**a))
    reuse = {**a, "k_slope": None, "v_slope": None, "weight": None, "k_extra": None, "v_extra": None}
    assert torch.equal(compiled(**reuse), step(**reuse))  # the optional inputs absent


@pytest.mark.skipif(not HAS_EXT, reason="cat_kernels._C is not built (make ext)")
def test_torch_compile_traces_extension_op():
    """The Meta implementation lets torch.compile(fullgraph=True) trace the extension's op."""
    ext = importlib.import_module("cat_kernels.extension")
    gen = torch.Generator().manual_seed(1701)
    a = _inputs((2, 2, 6, 40, 5, 16, "bf16", "bf16", "fp32", "transposed"), gen, "cpu")

    def step(a):
        return _call(ext.forecast_attention, a).float().sum(-1)

    torch._dynamo.reset()
    assert torch.equal(torch.compile(step, fullgraph=True, backend="aot_eager")(a), step(a))


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES + [(2, 24, 538, 4096, 333, 64, "bf16", "bf16", "fp32", "transposed")],
                         ids=_case_id)  # fmt: skip
def test_cuda_backends_match_reference(case):
    """Triton and the extension's CUDA path on the GPU (skipped without one); the last case is
    SD3-medium's pruned step at 1024^2 (5% of 4096 image tokens plus 333 text queries)."""
    gen = torch.Generator().manual_seed(1800 + sum(x for x in case[:6] if x))
    a = _inputs(case, gen, "cuda")
    names = ["triton"] + (["ext"] if HAS_EXT and importlib.import_module("cat_kernels.extension").WITH_CUDA else [])
    for name in names:
        _check(_call(_module(name).forecast_attention, a), a)
