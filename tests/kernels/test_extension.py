"""The compiled extension cat_kernels._C (C++ on CPU, CUDA on GPU) against cat_kernels.reference.

Skipped as a whole when the extension is not built (``make ext``). Fresh random inputs in every
test, awkward sizes, non-contiguous views made by slicing wider tensors, indices compared exactly.

Tolerances: token_stats upcasts every input to fp32 exactly as the reference does and does all
arithmetic in fp32, so the only difference is the order of the channel sum; the same bound holds
for every input dtype. Gather, scatter and k-means labels are compared exactly.
"""

from __future__ import annotations

import pytest
import torch

from cat_kernels import reference

ext = pytest.importorskip(
    "cat_kernels.extension", reason="cat_kernels._C is not built (make ext)", exc_type=ImportError
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {  # d and cluster_score (fp32 outputs), per input dtype: fp32 math, summation order only
    torch.float32: dict(rtol=1e-5, atol=1e-5),
    torch.float16: dict(rtol=1e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=1e-5, atol=1e-5),
}
NS = [1, 77, 4097]
CS = [64, 111]
BS = [1, 3]


def ks(n: int) -> list[int]:
    return sorted({1, max(1, n // 3), n})


def randn_strided(*shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A non-contiguous view: every other element of the last dim of a wider tensor."""
    wide = torch.randn(*shape[:-1], 2 * shape[-1] + 1, device=device).to(dtype)
    return wide[..., 1::2]


def rand_idx(b: int, n: int, k: int, dtype=torch.int64, device="cpu") -> torch.Tensor:
    """Unique indices per row, in random order (the ops accept any order)."""
    return torch.stack([torch.randperm(n, device=device)[:k] for _ in range(b)]).to(dtype)


# ----------------------------------------------------------------------------- gather / scatter


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("b", BS)
def test_gather_scatter_bnc(dtype, n, c, b):
    for k in ks(n):
        idx = rand_idx(b, n, k, dtype=torch.int32 if k % 2 else torch.int64)
        x = randn_strided(b, n, c, dtype=dtype)
        torch.testing.assert_close(ext.gather_tokens(x, idx, 1), reference.gather_tokens(x, idx, 1), rtol=0, atol=0)
        src = randn_strided(b, k, c, dtype=dtype)
        dst = randn_strided(b, n, c, dtype=dtype)
        expected = reference.scatter_tokens_(dst.clone(), idx, src, 1)
        out = ext.scatter_tokens_(dst, idx, src, 1)
        assert out is dst and not dst.is_contiguous()
        torch.testing.assert_close(dst, expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b", BS)
def test_gather_scatter_kv_bhnd(dtype, n, b):
    h, dh = 3, 64
    for k in ks(n):
        idx = rand_idx(b, n, k)
        x = torch.randn(b, n, h, dh).to(dtype).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
        torch.testing.assert_close(ext.gather_tokens(x, idx, 2), reference.gather_tokens(x, idx, 2), rtol=0, atol=0)
        kc = torch.randn(b, n, h, dh).to(dtype).transpose(1, 2)
        vc = randn_strided(b, h, n, dh, dtype=dtype)
        kn = torch.randn(b, h, k, dh, dtype=torch.float32)  # other dtype: cast to the cache's
        vn = randn_strided(b, h, k, dh, dtype=dtype)
        ek, ev = kc.clone(), vc.clone()
        reference.scatter_kv_(ek, ev, idx, kn, vn, 2)
        ext.scatter_kv_(kc, vc, idx, kn, vn, 2)
        torch.testing.assert_close(kc, ek, rtol=0, atol=0)
        torch.testing.assert_close(vc, ev, rtol=0, atol=0)


def test_bad_arguments_name_the_argument():
    x = torch.randn(2, 10, 8)
    with pytest.raises(RuntimeError, match="idx must lie in"):
        ext.gather_tokens(x, torch.tensor([[0, 10], [1, 2]]), 1)
    with pytest.raises(RuntimeError, match="idx must be int32/int64"):
        ext.gather_tokens(x, torch.rand(2, 2), 1)
    with pytest.raises(RuntimeError, match="src must have shape"):
        ext.scatter_tokens_(x, torch.tensor([[0], [1]]), torch.randn(2, 2, 8), 1)
    with pytest.raises(RuntimeError, match="labels must lie in"):
        ext.token_stats(x, x, torch.full((2, 10), 4), 3)
    with pytest.raises(RuntimeError, match="k must lie in"):
        labels = torch.ones(2, 10, dtype=torch.long)
        ext.select_tokens(torch.rand(2, 10), torch.rand(2, 3), labels, torch.rand(2, 10), 11, True)


# ----------------------------------------------------------------------------- token_stats


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("c", CS)
@pytest.mark.parametrize("b", BS)
def test_token_stats(dtype, n, c, b):
    nc = 20
    out, anchor = randn_strided(b, n, c, dtype=dtype), randn_strided(b, n, c, dtype=dtype)
    labels = torch.randint(0, nc - 3, (b, n), dtype=torch.int32 if c == 111 else torch.int64)  # some empty clusters
    d_ref, s_ref = reference.token_stats(out, anchor, labels, nc)
    d, s = ext.token_stats(out, anchor, labels, nc)
    assert d.dtype == s.dtype == torch.float32
    torch.testing.assert_close(d, d_ref, **TOL[dtype])
    torch.testing.assert_close(s, s_ref, **TOL[dtype])  # -inf where empty, on both sides


# ----------------------------------------------------------------------------- select_tokens


def _select_inputs(b, n, nc, ties):
    labels = torch.randint(0, nc, (b, n))
    if ties:  # many equal values everywhere, including -0.0 next to 0.0
        d = torch.randint(1, 4, (b, n)).float()
        score = torch.randint(1, 3, (b, nc)).float()
        score[:, -1] = float("-inf")  # an "empty" cluster
        s = torch.randint(1, 3, (b, n)).float() * 0.5
        d[:, ::7] = 0.0
        d[:, 3::7] = -0.0
    else:
        d, score, s = torch.rand(b, n) + 0.1, torch.rand(b, nc) + 0.1, torch.rand(b, n) + 0.1
    return d, score, labels, s


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b", BS)
def test_select_tokens(first, ties, n, b):
    nc = 20
    for k in ks(n):
        d, score, labels, s = _select_inputs(b, n, nc, ties)
        s_ref, s_ext = s.clone(), s.clone()
        idx_ref = reference.select_tokens(d, score, labels, s_ref, k, first)
        idx = ext.select_tokens(d, score, labels.int() if k % 2 else labels, s_ext, k, first)
        assert idx.dtype == torch.int64 and idx.shape == (b, k)
        assert torch.equal(idx, idx_ref), f"k={k}"
        assert torch.equal(s_ext, s_ref)  # the same two roundings: s * decay, then + 1


def test_select_tokens_fractions_and_strided_staleness():
    b, n, nc, k = 3, 4097, 20, 1229
    d, score, labels, _ = _select_inputs(b, n, nc, ties=True)
    for fraction, decay in ((0.25, 0.5), (0.3, 0.9), (0.0, 1.0), (1.0, 0.25)):
        wide = torch.rand(b, 2 * n) + 0.1
        s_ext = wide[:, ::2]  # written in place through its strides
        s_ref = s_ext.clone()
        idx_ref = reference.select_tokens(d, score, labels, s_ref, k, False, fraction, decay)
        idx = ext.select_tokens(d.t().contiguous().t(), score, labels, s_ext, k, False, fraction, decay)
        assert torch.equal(idx, idx_ref)
        assert torch.equal(s_ext, s_ref)


def test_select_after_token_stats_round_trip():
    b, n, c, nc = 2, 4096, 64, 20
    out, anchor = torch.randn(b, n, c), torch.randn(b, n, c)
    labels = ext.kmeans(torch.randn(b, n, 4), nc, 3)
    d, score = ext.token_stats(out, anchor, labels, nc)
    s_ref = torch.rand(b, n) + 0.1
    s_ext = s_ref.clone()
    for first in (True, False, False):
        assert torch.equal(
            ext.select_tokens(d, score, labels, s_ext, 1229, first),
            reference.select_tokens(d, score, labels, s_ref, 1229, first),
        )
    assert torch.equal(s_ext, s_ref)


# ----------------------------------------------------------------------------- kmeans


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b", BS)
def test_kmeans(dtype, n, b):
    features = randn_strided(b, n, 4, dtype=dtype)
    for nc in (1, 20):
        assert torch.equal(ext.kmeans(features, nc, 5), reference.kmeans(features, nc, 5))


# ----------------------------------------------------------------------------- torch.compile


def test_torch_compile_traces_extension_ops():
    """Meta implementations let torch.compile(fullgraph=True) trace the ops (aot_eager: no codegen)."""

    def step(out, anchor, labels, staleness, x, cache):
        d, score = ext.token_stats(out, anchor, labels, 5)
        idx = ext.select_tokens(d, score, labels, staleness, 7, False)
        rows = ext.gather_tokens(x, idx, 1) * 2
        ext.scatter_tokens_(cache, idx, rows, 1)
        return idx, ext.kmeans(x[..., :2], 3, 2)

    b, n, c = 2, 33, 16
    labels = torch.randint(0, 5, (b, n))
    args = [torch.randn(b, n, c), torch.randn(b, n, c), labels, torch.rand(b, n) + 0.1, torch.randn(b, n, c)]
    cache_c = torch.randn(b, n, c)
    cache_e = cache_c.clone()
    s_e = args[3].clone()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    idx_c, lab_c = compiled(*args, cache_c)
    idx_e, lab_e = step(*args[:3], s_e, args[4], cache_e)
    # eager ran after compiled on a fresh staleness copy taken before: compare the two paths
    assert torch.equal(idx_c, idx_e) and torch.equal(lab_c, lab_e)
    assert torch.equal(cache_c, cache_e)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("b", BS)
def test_cuda_matches_reference(dtype, n, b):
    if not ext.WITH_CUDA:
        pytest.skip("cat_kernels._C was built without CUDA")
    dev, nc, c = "cuda", 20, 111
    out, anchor = randn_strided(b, n, c, dtype=dtype, device=dev), randn_strided(b, n, c, dtype=dtype, device=dev)
    labels = torch.randint(0, nc - 3, (b, n), device=dev)
    d_ref, s_ref = reference.token_stats(out, anchor, labels, nc)
    d, s = ext.token_stats(out, anchor, labels.int(), nc)
    torch.testing.assert_close(d, d_ref, **TOL[dtype])
    torch.testing.assert_close(s, s_ref, **TOL[dtype])
    for k in ks(n):
        idx = rand_idx(b, n, k, device=dev)
        x = torch.randn(b, n, 3, 64, device=dev).to(dtype).transpose(1, 2)
        torch.testing.assert_close(ext.gather_tokens(x, idx, 2), reference.gather_tokens(x, idx, 2), rtol=0, atol=0)
        kc, vc = x.clone(), randn_strided(b, 3, n, 64, dtype=dtype, device=dev)
        kn, vn = torch.randn(b, 3, k, 64, device=dev), randn_strided(b, 3, k, 64, dtype=dtype, device=dev)
        ek, ev = kc.clone(), vc.clone()
        reference.scatter_kv_(ek, ev, idx, kn, vn, 2)
        ext.scatter_kv_(kc, vc, idx.int(), kn, vn, 2)
        assert torch.equal(kc, ek) and torch.equal(vc, ev)
        for first in (True, False):
            for ties in (False, True):
                dd, sc, lab, st = (t.to(dev) for t in _select_inputs(b, n, nc, ties))
                st_ref = st.clone()
                assert torch.equal(
                    ext.select_tokens(dd, sc, lab, st, k, first), reference.select_tokens(dd, sc, lab, st_ref, k, first)
                )
                assert torch.equal(st, st_ref)
    features = randn_strided(b, n, 4, dtype=dtype, device=dev)
    assert torch.equal(ext.kmeans(features, nc, 5), reference.kmeans(features, nc, 5))
