"""The forecast ops (issue 10, CAT-F) on every backend against cat_kernels.reference.

Backends: the torch reference (itself checked against a per-token loop written from the
semantics), Triton (on CUDA when present, else the CPU interpreter that conftest turns on) and
the compiled extension's CPU implementation when it is built; its CUDA implementation in a
`gpu` test. Fresh random inputs (no zeros), awkward shapes (N not a power of two, C = 111,
B = 3, K = 1 and K = N, D = 64 and 72), every dtype, fp32 slope next to a bf16 base, new rows
as transposed or sliced views. pos comes from a random sorted idx, as select_tokens returns it.

What is compared how: base (the new rows where computed, untouched elsewhere), the out rows of
computed tokens and the slope of skipped ones exactly; the forecast out rows and the new slopes
with tolerances.py's table (every backend does the reference's fp32 roundings, so in practice
they are bit equal too).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from tolerances import assert_close

from cat_kernels import backend, ops, reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
HAS_EXT = backend.extension_available()
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="no triton")),
    pytest.param("ext", marks=pytest.mark.skipif(not HAS_EXT, reason="cat_kernels._C is not built (make ext)")),
]


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _device_for(name: str, device: str) -> str:
    # The extension's CUDA implementation has its own gpu test; here it runs its C++ one.
    return "cpu" if name == "ext" else device


def _randn(shape, gen, dtype, device, layout="contiguous"):
    """Random data, never zero. layout: contiguous; "transposed", (B, K, H, D) viewed as (B, H, K, D)
    as the attention processors build the new rows; "sliced", a slice of a wider tensor."""
    def draw(s):
        x = torch.randn(s, generator=gen)
        return torch.where(x == 0, torch.ones_like(x), x).to(dtype).to(device)

    if layout == "transposed" and len(shape) == 4:
        B, H, K, D = shape
        return draw((B, K, H, D)).transpose(1, 2)
    if layout in ("transposed", "sliced"):
        wide = list(shape)
        wide[-1] += 5
        wide[-2] *= 2
        return draw(wide)[..., ::2, 2 : 2 + shape[-1]]
    return draw(shape)


def _pos(B, N, K, gen, dtype, device):
    """pos (B, N) and idx (B, K): K random tokens per sample, sorted; pos[b, idx[b, j]] = j, else -1."""
    idx = torch.stack([torch.randperm(N, generator=gen)[:K].sort().values for _ in range(B)])
    pos = torch.full((B, N), -1, dtype=torch.int64)
    pos.scatter_(1, idx, torch.arange(K).expand(B, K).contiguous())
    return pos.to(dtype).to(device), idx.to(device)


def _per_token(B, N, gen, device):
    weight = (torch.rand(B, N, generator=gen) * 3 + 0.05).to(device)
    inv_dt = (torch.rand(B, N, generator=gen) + 0.25).to(device)
    return weight, inv_dt


def _cache(shape, gen, dtype, slope_dtype, device):
    """base, slope and out, all random (out too: every row of it must be written)."""
    return [_randn(shape, gen, dt, device) for dt in (dtype, slope_dtype, dtype)]


def _module(name: str):
    if name == "torch":
        return reference
    if name == "triton":
        return importlib.import_module("cat_kernels.triton")
    return importlib.import_module("cat_kernels.extension")


def _computed(pos, shape, dim):
    """Mask of base's shape: True on the rows of computed tokens."""
    B, N = pos.shape
    return (pos >= 0).view(B, *([1] * (dim - 1)), N, 1).expand(shape).cpu()


def _check(got, ref, before, pos, dim, dtype):
    """got/ref/before: (base, slope, out) of one cache after the op, from the reference, before."""
    (base, slope, out), (rb, rs, ro), (b0, s0, _) = [[t.cpu() for t in ts] for ts in (got, ref, before)]
    m = _computed(pos, base.shape, dim)
    assert torch.equal(base, rb)  # new rows where computed, untouched elsewhere
    assert torch.equal(base[~m], b0[~m])
    assert torch.equal(out[m], base[m])  # out = exactly the new value
    assert torch.equal(slope[~m], s0[~m])
    assert_close(slope, rs, dtype)
    assert_close(out, ro, dtype)


# shape, dim, base dtype, slope dtype, K (None: about N/3), new-row layout, pos dtype
CASES = [
    ((3, 2, 77, 72), 2, "fp32", "fp32", None, "transposed", torch.int64),
    ((3, 2, 77, 64), 2, "bf16", "fp32", None, "transposed", torch.int32),
    ((1, 3, 33, 64), 2, "fp16", "fp16", 1, "sliced", torch.int64),
    ((2, 2, 33, 72), 2, "bf16", "bf16", 33, "contiguous", torch.int32),
    ((3, 77, 111), 1, "fp32", "fp32", None, "sliced", torch.int64),
    ((3, 77, 111), 1, "bf16", "fp32", 1, "contiguous", torch.int32),
    ((2, 50, 64), 1, "fp16", "bf16", 50, "transposed", torch.int64),
    ((1, 300, 64), 1, "bf16", "bf16", 100, "sliced", torch.int64),  # several programs along N
]


def _case_id(case):
    shape, dim, dt, sdt, K, layout, pdt = case
    return f"{'x'.join(map(str, shape))}-dim{dim}-{dt}-slope{sdt}-K{K}-{layout}-{str(pdt)[-5:]}"


def _k(K, N):
    return max(1, N // 3) if K is None else K


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forecast_tokens(case, name, device):
    shape, dim, dt, sdt, K, layout, pdt = case
    device = _device_for(name, device)
    dtype, slope_dtype = DTYPES[dt], DTYPES[sdt]
    gen = torch.Generator().manual_seed(100 + sum(shape) + dim + len(dt + sdt))
    B, N = shape[0], shape[dim]
    K = _k(K, N)
    pos, _ = _pos(B, N, K, gen, pdt, device)
    rows_shape = list(shape)
    rows_shape[dim] = K
    rows = _randn(rows_shape, gen, dtype, device, layout)
    weight, inv_dt = _per_token(B, N, gen, device)
    before = _cache(shape, gen, dtype, slope_dtype, device)
    got, ref = [t.clone() for t in before], [t.clone() for t in before]
    reference.forecast_tokens_(*ref, pos, rows, weight, inv_dt, dim)
    assert _module(name).forecast_tokens_(*got, pos, rows, weight, inv_dt, dim) is None
    _check(got, ref, before, pos, dim, dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_forecast_kv(case, name, device):
    shape, dim, dt, sdt, K, layout, pdt = case
    device = _device_for(name, device)
    dtype, slope_dtype = DTYPES[dt], DTYPES[sdt]
    gen = torch.Generator().manual_seed(200 + sum(shape) + dim + len(dt + sdt))
    B, N = shape[0], shape[dim]
    K = _k(K, N)
    pos, _ = _pos(B, N, K, gen, pdt, device)
    rows_shape = list(shape)
    rows_shape[dim] = K
    # V may live in another dtype than K (and its new rows in fp32: cast as base stores them).
    v_dtype = torch.float32 if dtype != torch.float32 else torch.bfloat16
    k = _randn(rows_shape, gen, dtype, device, layout)
    v = _randn(rows_shape, gen, torch.float32, device, "sliced" if layout == "contiguous" else "contiguous")
    weight, inv_dt = _per_token(B, N, gen, device)
    kb = _cache(shape, gen, dtype, slope_dtype, device)
    vb = _cache(shape, gen, v_dtype, slope_dtype, device)
    kg, vg = [t.clone() for t in kb], [t.clone() for t in vb]
    kr, vr = [t.clone() for t in kb], [t.clone() for t in vb]

    def call(fn, kc, vc):
        return fn(kc[0], vc[0], kc[1], vc[1], kc[2], vc[2], pos, k, v, weight, inv_dt, dim)

    call(reference.forecast_kv_, kr, vr)
    assert call(_module(name).forecast_kv_, kg, vg) is None
    _check(kg, kr, kb, pos, dim, dtype)
    _check(vg, vr, vb, pos, dim, v_dtype)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("dim,shape", [(2, (3, 2, 77, 64)), (1, (3, 77, 111))])
@pytest.mark.parametrize("dt", ["fp32", "bf16"])
def test_zero_weight_is_plain_scatter(dim, shape, dt, name, device):
    """weight = 0 reproduces today's reuse: out is base with the new rows scattered in, bit for bit."""
    device = _device_for(name, device)
    dtype = DTYPES[dt]
    gen = torch.Generator().manual_seed(300 + dim + len(dt))
    B, N = shape[0], shape[dim]
    K = N // 3
    pos, idx = _pos(B, N, K, gen, torch.int64, device)
    rows_shape = list(shape)
    rows_shape[dim] = K
    k = _randn(rows_shape, gen, dtype, device, "transposed")
    v = _randn(rows_shape, gen, dtype, device, "sliced")
    _, inv_dt = _per_token(B, N, gen, device)
    weight = torch.zeros(B, N, device=device)
    kc, vc = _cache(shape, gen, dtype, torch.float32, device), _cache(shape, gen, dtype, torch.float32, device)
    k_expect, v_expect = kc[0].clone(), vc[0].clone()
    reference.scatter_kv_(k_expect, v_expect, idx, k, v, dim)
    _module(name).forecast_kv_(kc[0], vc[0], kc[1], vc[1], kc[2], vc[2], pos, k, v, weight, inv_dt, dim)
    assert torch.equal(kc[2].cpu(), k_expect.cpu()) and torch.equal(vc[2].cpu(), v_expect.cpu())
    assert torch.equal(kc[0].cpu(), k_expect.cpu()) and torch.equal(vc[0].cpu(), v_expect.cpu())
    base, slope, out = _cache(shape, gen, dtype, torch.bfloat16, device)
    expect = base.clone()
    reference.scatter_tokens_(expect, idx, k, dim)
    _module(name).forecast_tokens_(base, slope, out, pos, k, weight, inv_dt, dim)
    assert torch.equal(out.cpu(), expect.cpu()) and torch.equal(base.cpu(), expect.cpu())


def _kv_inputs(case, device, seed):
    """A case's random inputs for forecast_kv_: (gen, pos, k, v, weight, inv_dt, K caches, V caches)."""
    shape, dim, dt, sdt, K, layout, pdt = case
    dtype, slope_dtype = DTYPES[dt], DTYPES[sdt]
    gen = torch.Generator().manual_seed(seed + sum(shape) + dim)
    B, N = shape[0], shape[dim]
    K = _k(K, N)
    pos, _ = _pos(B, N, K, gen, pdt, device)
    rows_shape = list(shape)
    rows_shape[dim] = K
    k, v = (_randn(rows_shape, gen, dtype, device, layout) for _ in range(2))
    weight, inv_dt = _per_token(B, N, gen, device)
    kc, vc = _cache(shape, gen, dtype, slope_dtype, device), _cache(shape, gen, dtype, slope_dtype, device)
    return gen, pos, k, v, weight, inv_dt, kc, vc


def _wide_out(shape, dim, gen, dtype, device):
    """A buffer wider than the cache along the token dim (5 rows before, 3 after) and the slice
    of it the ops write: the image rows of [text; image; reference] rows attention reads."""
    wide = list(shape)
    wide[dim] += 8
    buf = _randn(wide, gen, dtype, device)
    return buf, buf.narrow(dim, 5, shape[dim])


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", [CASES[1], CASES[2], CASES[4], CASES[5]], ids=_case_id)
def test_out_in_a_wider_buffer(case, name, device):
    """out as the image rows of a larger buffer (rows of stride 1, batch and head strides of the
    buffer): the same values as a contiguous out, bit for bit, and every other row of the buffer
    untouched, for forecast_kv_ (K and V) and forecast_tokens_."""
    shape, dim, dt, sdt = case[:4]
    device = _device_for(name, device)
    gen, pos, k, v, weight, inv_dt, kc, vc = _kv_inputs(case, device, 250)
    dtype, slope_dtype, N = DTYPES[dt], DTYPES[sdt], shape[dim]
    (kw, k_out), (vw, v_out) = (_wide_out(shape, dim, gen, dtype, device) for _ in range(2))
    assert not k_out.is_contiguous()
    kw0, vw0 = kw.clone(), vw.clone()
    expect = [t.clone() for t in (*kc, *vc)]
    mod = _module(name)
    mod.forecast_kv_(*expect[0::3], *expect[1::3], *expect[2::3], pos, k, v, weight, inv_dt, dim)
    mod.forecast_kv_(kc[0], vc[0], kc[1], vc[1], k_out, v_out, pos, k, v, weight, inv_dt, dim)
    for got, want in zip((kc[0], vc[0], kc[1], vc[1], k_out, v_out), expect[0::3] + expect[1::3] + expect[2::3],
                         strict=True):
        assert torch.equal(got.cpu(), want.cpu())
    for wide, before in ((kw, kw0), (vw, vw0)):
        for start, length in ((0, 5), (5 + N, 3)):
            assert torch.equal(wide.narrow(dim, start, length).cpu(), before.narrow(dim, start, length).cpu())
    base, slope, out = _cache(shape, gen, dtype, slope_dtype, device)
    wide, sliced = _wide_out(shape, dim, gen, dtype, device)
    ref = [t.clone() for t in (base, slope, out)]
    mod.forecast_tokens_(*ref, pos, k, weight, inv_dt, dim)
    mod.forecast_tokens_(base, slope, sliced, pos, k, weight, inv_dt, dim)
    assert torch.equal(sliced.cpu(), ref[2].cpu()) and torch.equal(base.cpu(), ref[0].cpu())


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[5], CASES[6]], ids=_case_id)
def test_without_out_base_and_slope_as_with_it(case, name, device):
    """out=None (a step that computes every row and reads its new rows): base and slope end as
    with an out, bit for bit, for some and for all rows computed (K = N), K/V and one cache."""
    shape, dim, dt, sdt = case[:4]
    device = _device_for(name, device)
    gen, pos, k, v, weight, inv_dt, kc, vc = _kv_inputs(case, device, 260)
    dtype, slope_dtype = DTYPES[dt], DTYPES[sdt]
    with_out = [t.clone() for t in (*kc, *vc)]
    mod = _module(name)
    mod.forecast_kv_(*with_out[0::3], *with_out[1::3], *with_out[2::3], pos, k, v, weight, inv_dt, dim)
    mod.forecast_kv_(kc[0], vc[0], kc[1], vc[1], None, None, pos, k, v, weight, inv_dt, dim)
    for got, want in zip((kc[0], vc[0], kc[1], vc[1]), with_out[0::3] + with_out[1::3], strict=True):
        assert torch.equal(got.cpu(), want.cpu())
    base, slope, out = _cache(shape, gen, dtype, slope_dtype, device)
    ref = [t.clone() for t in (base, slope, out)]
    mod.forecast_tokens_(*ref, pos, k, weight, inv_dt, dim)
    mod.forecast_tokens_(base, slope, None, pos, k, weight, inv_dt, dim)
    assert torch.equal(base.cpu(), ref[0].cpu()) and torch.equal(slope.cpu(), ref[1].cpu())


@pytest.mark.parametrize("dt,sdt", [("fp32", "fp32"), ("bf16", "fp32"), ("fp16", "bf16")])
def test_reference_matches_per_token_loop(dt, sdt):
    """The reference against the semantics written out token by token, with explicit roundings."""
    dtype, slope_dtype = DTYPES[dt], DTYPES[sdt]
    gen = torch.Generator().manual_seed(400 + len(dt + sdt))
    B, H, N, D, K = 2, 3, 9, 5, 4
    pos, _ = _pos(B, N, K, gen, torch.int64, "cpu")
    rows = _randn((B, H, K, D), gen, torch.float32, "cpu", "transposed")  # fp32 rows into `dtype`
    weight, inv_dt = _per_token(B, N, gen, "cpu")
    base, slope, out = _cache((B, H, N, D), gen, dtype, slope_dtype, "cpu")
    eb, es, eo = base.clone(), slope.clone(), out.clone()
    for b in range(B):
        for n in range(N):
            j = int(pos[b, n])
            b_old, s_old = base[b, :, n].float(), slope[b, :, n].float()
            if j >= 0:
                new = rows[b, :, j].to(dtype).float()
                es[b, :, n] = ((new - b_old) * inv_dt[b, n]).to(slope_dtype)
                eb[b, :, n] = new.to(dtype)
                eo[b, :, n] = new.to(dtype)
            else:
                eo[b, :, n] = (b_old + weight[b, n] * s_old).to(dtype)
    reference.forecast_tokens_(base, slope, out, pos, rows, weight, inv_dt, 2)
    assert torch.equal(base, eb) and torch.equal(slope, es) and torch.equal(out, eo)


def test_through_ops_every_backend_agrees(device):
    """The public ops with each available backend, against backend="torch"."""
    gen = torch.Generator().manual_seed(500)
    B, H, N, D, K = 2, 3, 45, 64, 15
    pos, _ = _pos(B, N, K, gen, torch.int32, device)
    k = _randn((B, H, K, D), gen, torch.bfloat16, device, "transposed")
    v = _randn((B, H, K, D), gen, torch.bfloat16, device, "transposed")
    weight, inv_dt = _per_token(B, N, gen, device)
    caches = _cache((B, H, N, D), gen, torch.bfloat16, torch.float32, device)
    caches += _cache((B, H, N, D), gen, torch.bfloat16, torch.float32, device)
    expect = [t.clone() for t in caches]
    ops.forecast_kv_(*expect[0::3], *expect[1::3], *expect[2::3], pos, k, v, weight, inv_dt, backend="torch")
    names = ["auto", "triton"] + (["cuda"] if HAS_EXT else [])
    for name in names:
        got = [t.clone() for t in caches]
        ops.forecast_kv_(*got[0::3], *got[1::3], *got[2::3], pos, k, v, weight, inv_dt, backend=name)
        for a, b in zip(got, expect, strict=True):
            assert torch.equal(a.cpu(), b.cpu()), name
    rows = _randn((B, N // 2, 7), gen, torch.float16, device, "sliced")
    noise = [_randn((B, N, 7), gen, dt, device) for dt in (torch.float16, torch.float16, torch.float32)]
    pos1, _ = _pos(B, N, N // 2, gen, torch.int64, device)
    expect = [t.clone() for t in noise]
    ops.forecast_tokens_(expect[0], expect[2], expect[1], pos1, rows, weight, inv_dt, backend="torch")
    for name in names:
        got = [t.clone() for t in noise]
        ops.forecast_tokens_(got[0], got[2], got[1], pos1, rows, weight, inv_dt, backend=name)
        for a, b in zip(got, expect, strict=True):
            assert torch.equal(a.cpu(), b.cpu()), name


# ----------------------------------------------------------------------------- validation


def _valid(gen, B=2, H=3, N=10, D=8, K=4):
    pos, _ = _pos(B, N, K, gen, torch.int64, "cpu")
    weight, inv_dt = _per_token(B, N, gen, "cpu")
    kc = _cache((B, H, N, D), gen, torch.float32, torch.float32, "cpu")
    vc = _cache((B, H, N, D), gen, torch.float32, torch.float32, "cpu")
    k = _randn((B, H, K, D), gen, torch.float32, "cpu")
    v = _randn((B, H, K, D), gen, torch.float32, "cpu")
    return {
        "k_base": kc[0], "v_base": vc[0], "k_slope": kc[1], "v_slope": vc[1], "k_out": kc[2], "v_out": vc[2],
        "pos": pos, "k": k, "v": v, "weight": weight, "inv_dt": inv_dt,
    }  # fmt: skip


def _kv(args, **changes):
    a = {**args, **changes}
    ops.forecast_kv_(
        a["k_base"], a["v_base"], a["k_slope"], a["v_slope"], a["k_out"], a["v_out"], a["pos"], a["k"], a["v"],
        a["weight"], a["inv_dt"], a.get("dim", 2),
    )  # fmt: skip


def _tokens(args, **changes):
    a = {**args, **changes}
    ops.forecast_tokens_(
        a["k_base"], a["k_slope"], a["k_out"], a["pos"], a["k"], a["weight"], a["inv_dt"], a.get("dim", 2)
    )


def test_forecast_kv_errors():
    a = _valid(torch.Generator().manual_seed(600))
    bad = [
        ("k_base", {"k_base": a["k_base"].int()}),
        ("k_out", {"k_out": a["k_out"].half()}),  # out must share base's dtype
        ("v_slope", {"v_slope": a["v_slope"][:, :2]}),
        ("k_base must be contiguous", {"k_base": a["k_base"].transpose(2, 3).contiguous().transpose(2, 3)}),
        ("v_out must be contiguous", {"v_out": torch.randn(2, 3, 8, 10).transpose(2, 3)}),
        ("k_out must be contiguous", {"k_out": torch.randn(2, 3, 10, 16)[..., ::2]}),  # rows of stride 2
        ("k_out must be contiguous", {"k_out": torch.randn(2, 3, 1, 8).expand(2, 3, 10, 8)}),  # rows overlap
        ("k_out and v_out go together", {"v_out": None}),
        ("v_base must have the shape", {"v_base": torch.randn(2, 2, 10, 8), "v_slope": torch.randn(2, 2, 10, 8),
                                        "v_out": torch.randn(2, 2, 10, 8), "v": torch.randn(2, 2, 4, 8)}),
        ("k must have shape", {"k": a["k"][..., :5]}),
        ("v must have the shape of k", {"v": torch.randn(2, 3, 5, 8)}),
        ("pos must have shape", {"pos": a["pos"][:, :9]}),
        ("pos must have dtype", {"pos": a["pos"].float()}),
        ("pos must lie in", {"pos": torch.where(a["pos"] >= 0, a["pos"] + 1, a["pos"])}),  # K itself: out of range
        ("pos must lie in", {"pos": a["pos"] - 1}),  # -2
        ("weight must have dtype", {"weight": a["weight"].half()}),
        ("inv_dt must have the shape", {"inv_dt": a["inv_dt"][:1]}),
        ("dim", {"dim": 1}),
        ("distinct", {"k_out": a["k_base"]}),
        ("distinct", {"v_slope": a["v_base"]}),
        ("k is on", {"k": a["k"].to("meta")}),
        ("weight is on", {"weight": a["weight"].to("meta")}),
    ]  # fmt: skip
    for match, change in bad:
        with pytest.raises(ValueError, match=match):
            _kv(a, **change)
    _kv(a)  # the valid call still runs
    _kv(a, k_out=None, v_out=None)  # and so does one without out


def test_forecast_tokens_errors():
    a = _valid(torch.Generator().manual_seed(601))
    for match, change in [
        ("base must have 4 dimensions", {"k_base": a["k_base"][0]}),
        ("dim must be 1", {"dim": 3}),
        ("slope must have the shape", {"k_slope": a["k_slope"][..., :4]}),
        ("out must have the dtype", {"k_out": a["k_out"].bfloat16()}),
        ("rows must have shape", {"k": a["k"][:, :2]}),
        ("pos must lie in", {"pos": torch.full_like(a["pos"], 4)}),
        ("inv_dt must have dtype", {"inv_dt": a["inv_dt"].double()}),
        ("distinct", {"k_slope": a["k_out"]}),
    ]:
        with pytest.raises(ValueError, match=match):
            _tokens(a, **change)
    with pytest.raises(ValueError, match="backend"):
        ops.forecast_tokens_(a["k_base"], a["k_slope"], a["k_out"], a["pos"], a["k"], a["weight"], a["inv_dt"], 2,
                             backend="nope")  # fmt: skip


@pytest.mark.skipif(not HAS_EXT, reason="cat_kernels._C is not built (make ext)")
def test_extension_errors_name_the_argument():
    ext = importlib.import_module("cat_kernels.extension")
    a = _valid(torch.Generator().manual_seed(602))
    with pytest.raises(RuntimeError, match="pos must lie in"):
        ext.forecast_tokens_(a["k_base"], a["k_slope"], a["k_out"], a["pos"] + 5, a["k"], a["weight"], a["inv_dt"], 2)
    with pytest.raises(RuntimeError, match="k_slope must be contiguous"):
        ext.forecast_kv_(a["k_base"], a["v_base"], a["k_slope"].transpose(2, 3).contiguous().transpose(2, 3),
                         a["v_slope"], a["k_out"], a["v_out"], a["pos"], a["k"], a["v"], a["weight"], a["inv_dt"], 2)
    with pytest.raises(RuntimeError, match="k_out must be contiguous or a slice"):
        ext.forecast_kv_(a["k_base"], a["v_base"], a["k_slope"], a["v_slope"], torch.randn(2, 3, 10, 16)[..., ::2],
                         a["v_out"], a["pos"], a["k"], a["v"], a["weight"], a["inv_dt"], 2)
    with pytest.raises(RuntimeError, match="k_out and v_out go together"):
        ext.forecast_kv_(a["k_base"], a["v_base"], a["k_slope"], a["v_slope"], a["k_out"], None, a["pos"], a["k"],
                         a["v"], a["weight"], a["inv_dt"], 2)
    with pytest.raises(RuntimeError, match="v must have the shape of k"):
        ext.forecast_kv_(a["k_base"], a["v_base"], a["k_slope"], a["v_slope"], a["k_out"], a["v_out"], a["pos"],
                         a["k"], a["v"][:, :, :3], a["weight"], a["inv_dt"], 2)
    with pytest.raises(RuntimeError, match="distinct"):
        ext.forecast_tokens_(a["k_base"], a["k_slope"], a["k_base"], a["pos"], a["k"], a["weight"], a["inv_dt"], 2)


# ----------------------------------------------------------------------------- torch.compile


def _step(kc, vc, noise, pos, k, v, rows, weight, inv_dt, name):
    ops.forecast_kv_(kc[0], vc[0], kc[1], vc[1], kc[2], vc[2], pos, k, v, weight, inv_dt, backend=name)
    ops.forecast_tokens_(noise[0], noise[1], noise[2], pos, rows, weight, inv_dt, backend=name)
    return kc[2] * 2, noise[2] + 1  # attention and the model output read the out buffers


@pytest.mark.parametrize("name", ["torch", "triton"])
def test_torch_compile_fullgraph_matches_eager(name, device):
    gen = torch.Generator().manual_seed(700)
    B, H, N, D, K, C = 2, 3, 24, 16, 8, 12
    pos, _ = _pos(B, N, K, gen, torch.int64, device)
    k, v = (_randn((B, H, K, D), gen, torch.float32, device, "transposed") for _ in range(2))
    rows = _randn((B, K, C), gen, torch.float32, device, "sliced")
    weight, inv_dt = _per_token(B, N, gen, device)
    state = [*_cache((B, H, N, D), gen, torch.float32, torch.float32, device),
             *_cache((B, H, N, D), gen, torch.float32, torch.float32, device),
             *_cache((B, N, C), gen, torch.float32, torch.float32, device)]  # fmt: skip
    eager, compiled = [t.clone() for t in state], [t.clone() for t in state]
    torch._dynamo.reset()
    fn = torch.compile(_step, fullgraph=True, backend="eager")
    out_c = fn(compiled[0:3], compiled[3:6], compiled[6:9], pos, k, v, rows, weight, inv_dt, name)
    out_e = _step(eager[0:3], eager[3:6], eager[6:9], pos, k, v, rows, weight, inv_dt, name)
    for a, b in zip([*out_c, *compiled], [*out_e, *eager], strict=True):
        assert torch.equal(a, b)  # caches and outputs updated alike


@pytest.mark.skipif(not HAS_EXT, reason="cat_kernels._C is not built (make ext)")
def test_torch_compile_traces_extension_ops():
    """The Meta implementations let torch.compile(fullgraph=True) trace the extension's ops."""
    ext = importlib.import_module("cat_kernels.extension")
    gen = torch.Generator().manual_seed(701)
    B, H, N, D, K = 2, 3, 20, 8, 6
    pos, _ = _pos(B, N, K, gen, torch.int32, "cpu")
    k, v = (_randn((B, H, K, D), gen, torch.bfloat16, "cpu", "transposed") for _ in range(2))
    weight, inv_dt = _per_token(B, N, gen, "cpu")
    state = [*_cache((B, H, N, D), gen, torch.bfloat16, torch.float32, "cpu"),
             *_cache((B, H, N, D), gen, torch.bfloat16, torch.float32, "cpu")]  # fmt: skip

    def step(kc, vc):
        ext.forecast_kv_(kc[0], vc[0], kc[1], vc[1], kc[2], vc[2], pos, k, v, weight, inv_dt, 2)
        ext.forecast_tokens_(kc[0], kc[1], kc[2], pos, k, weight, inv_dt, 2)  # a second step on K
        return kc[2].float().sum(-1)

    eager, compiled = [t.clone() for t in state], [t.clone() for t in state]
    torch._dynamo.reset()
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(compiled[:3], compiled[3:])
    want = step(eager[:3], eager[3:])
    assert torch.equal(got, want)
    for a, b in zip(compiled, eager, strict=True):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_cuda_backends_match_reference(case):
    """Triton and the extension's CUDA implementation on the GPU (skipped without one)."""
    shape, dim, dt, sdt, K, layout, pdt = case
    dtype, slope_dtype = DTYPES[dt], DTYPES[sdt]
    gen = torch.Generator().manual_seed(800 + sum(shape) + dim)
    B, N = shape[0], shape[dim]
    K = _k(K, N)
    pos, _ = _pos(B, N, K, gen, pdt, "cuda")
    rows_shape = list(shape)
    rows_shape[dim] = K
    k = _randn(rows_shape, gen, dtype, "cuda", layout)
    v = _randn(rows_shape, gen, torch.float32, "cuda", "sliced")
    weight, inv_dt = _per_token(B, N, gen, "cuda")
    kb, vb = _cache(shape, gen, dtype, slope_dtype, "cuda"), _cache(shape, gen, dtype, slope_dtype, "cuda")
    kr, vr = [t.clone() for t in kb], [t.clone() for t in vb]
    reference.forecast_kv_(kr[0], vr[0], kr[1], vr[1], kr[2], vr[2], pos, k, v, weight, inv_dt, dim)
    names = ["triton"] + (["ext"] if HAS_EXT and importlib.import_module("cat_kernels.extension").WITH_CUDA else [])
    for name in names:
        kg, vg = [t.clone() for t in kb], [t.clone() for t in vb]
        _module(name).forecast_kv_(kg[0], vg[0], kg[1], vg[1], kg[2], vg[2], pos, k, v, weight, inv_dt, dim)
        _check(kg, kr, kb, pos, dim, dtype)
        _check(vg, vr, vb, pos, dim, dtype)
        # out as the image rows of a wider buffer: the same rows, bit for bit
        (_, k_out), (_, v_out) = (_wide_out(shape, dim, gen, dtype, "cuda") for _ in range(2))
        kw, vw = [t.clone() for t in kb], [t.clone() for t in vb]
        _module(name).forecast_kv_(kw[0], vw[0], kw[1], vw[1], k_out, v_out, pos, k, v, weight, inv_dt, dim)
        assert torch.equal(k_out, kg[2]) and torch.equal(v_out, vg[2]), name
        # without out: the same bases and slopes
        kn, vn = [t.clone() for t in kb], [t.clone() for t in vb]
        _module(name).forecast_kv_(kn[0], vn[0], kn[1], vn[1], None, None, pos, k, v, weight, inv_dt, dim)
        assert all(torch.equal(a, b) for a, b in zip(kn[:2] + vn[:2], kg[:2] + vg[:2], strict=True)), name
