"""Triton kernels against the torch reference: awkward shapes, strides, dtypes and ties.

Runs the kernels on CUDA when present, else in Triton's CPU interpreter (conftest sets
TRITON_INTERPRET=1), so shapes stay small except for one N = 4097 case per op.
"""

import pytest
import torch
from tolerances import assert_close

import cat_kernels.triton as tk
from cat_kernels import ops, reference

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture
def device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _randn(shape, gen, dtype, device, contiguous=True):
    """Random data; non-contiguous means a slice of a wider tensor (last-dim and token strides)."""
    if contiguous:
        return torch.randn(shape, generator=gen).to(dtype).to(device)
    wide = list(shape)
    wide[-1] += 7
    wide[-2] = 2 * wide[-2]
    return torch.randn(wide, generator=gen).to(dtype).to(device)[..., ::2, 3 : 3 + shape[-1]]


def _idx(B, N, K, gen, dtype, device):
    """K unique token indices per row, in random order (the kernels must not assume sorted)."""
    return torch.stack([torch.randperm(N, generator=gen)[:K] for _ in range(B)]).to(dtype).to(device)


# ----------------------------------------------------------------------------- token_stats

TOKEN_STATS_CASES = [
    # B, N, C, dtype, contiguous, label dtype
    (1, 1, 64, "fp32", True, torch.int64),
    (3, 77, 111, "fp16", True, torch.int32),
    (3, 77, 64, "bf16", False, torch.int64),
    (1, 77, 111, "fp32", False, torch.int32),
    (3, 300, 200, "fp32", True, torch.int64),  # C > 128: the channel loop
    (1, 4097, 64, "fp32", True, torch.int64),
]


@pytest.mark.parametrize("B,N,C,dt,contiguous,ldtype", TOKEN_STATS_CASES)
def test_token_stats(B, N, C, dt, contiguous, ldtype, device):
    gen = torch.Generator().manual_seed(1000 + N + C)
    dtype = DTYPES[dt]
    nc = 20
    out = _randn((B, N, C), gen, dtype, device, contiguous)
    anchor = _randn((B, N, C), gen, dtype, device, contiguous)
    # Clusters nc-3 .. nc-1 stay empty: their score must be -inf (ranks last).
    labels = torch.randint(0, nc - 3, (B, N), generator=gen).to(ldtype).to(device)
    d, score = tk.token_stats(out, anchor, labels, nc)
    d_ref, score_ref = reference.token_stats(out, anchor, labels, nc)
    assert d.dtype == score.dtype == torch.float32
    assert d.shape == (B, N) and score.shape == (B, nc)
    assert_close(d, d_ref, dtype)
    assert torch.equal(score.isneginf().cpu(), score_ref.isneginf().cpu())
    assert_close(score, score_ref, dtype)


# ----------------------------------------------------------------------------- select_tokens


def _select_inputs(B, N, nc, gen, device, ties=False, ldtype=torch.int64):
    if ties:
        # Few distinct values everywhere, and -0.0 mixed with 0.0 (they must compare equal).
        d = torch.randint(0, 4, (B, N), generator=gen).float()
        d = torch.where(torch.rand(B, N, generator=gen) < 0.5, -d, d).abs()
        d[torch.rand(B, N, generator=gen) < 0.3] = -0.0
        score = torch.randint(0, 2, (B, nc), generator=gen).float()
        score[:, -1] = float("-inf")  # an empty cluster
        stale = torch.randint(0, 3, (B, N), generator=gen).float() * 0.5
    else:
        d = torch.rand(B, N, generator=gen) + 0.01
        score = torch.rand(B, nc, generator=gen) + 0.01
        stale = torch.rand(B, N, generator=gen) * 3 + 0.01
    labels = torch.randint(0, nc, (B, N), generator=gen).to(ldtype)
    return d.to(device), score.to(device), labels.to(device), stale.to(device)


def _check_select(d, score, labels, stale, k, first, frac=0.25, decay=0.5):
    s_kernel, s_ref = stale.clone(), stale.clone()
    idx = tk.select_tokens(d, score, labels, s_kernel, k, first, frac, decay)
    idx_ref = reference.select_tokens(d, score, labels, s_ref, k, first, frac, decay)
    assert idx.dtype == torch.int64 and idx.shape == (d.shape[0], k)
    assert torch.equal(idx.cpu(), idx_ref.cpu())
    assert torch.equal(s_kernel.cpu(), s_ref.cpu())  # same two fp32 roundings: exact


SELECT_CASES = [
    # B, N, nc
    (1, 1, 1),
    (3, 77, 20),
    (1, 77, 5),
    (1, 4097, 20),
    (1, 16384, 20),  # Flux at 2048x2048: the largest N one program holds, token index 2^14 - 1
]


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("B,N,nc", SELECT_CASES)
def test_select_tokens(B, N, nc, first, device):
    gen = torch.Generator().manual_seed(2000 + N + nc + first)
    d, score, labels, stale = _select_inputs(B, N, nc, gen, device)
    for k in sorted({1, max(1, N // 3), N}):
        _check_select(d, score, labels, stale, k, first)


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("B,N,nc,k", [(3, 77, 6, 25), (2, 200, 20, 100), (1, 64, 3, 64)])
def test_select_tokens_ties(B, N, nc, k, first, device):
    gen = torch.Generator().manual_seed(3000 + N + nc + first)
    d, score, labels, stale = _select_inputs(B, N, nc, gen, device, ties=True, ldtype=torch.int32)
    _check_select(d, score, labels, stale, k, first)


def test_select_tokens_strided_and_options(device):
    gen = torch.Generator().manual_seed(4000)
    B, N, nc = 3, 150, 9
    wide = [t.to(device) for t in (torch.rand(B, 2 * N, generator=gen), torch.rand(B, 3 * nc, generator=gen))]
    d, score = wide[0][:, ::2], wide[1][:, 1::3]
    labels = torch.randint(0, nc, (B, 2 * N), generator=gen).int().to(device)[:, 1::2]
    stale_wide = (torch.rand(B, N, 2, generator=gen) * 2).to(device)
    for frac, decay in [(0.25, 0.5), (0.6, 0.3), (1.0, 1.0), (0.0, 0.0)]:
        # In place on a strided view: the kernel must write through the strides.
        st_k, st_r = stale_wide.clone()[..., 0], stale_wide.clone()[..., 0]
        idx = tk.select_tokens(d, score, labels, st_k, 100, False, frac, decay)
        idx_ref = reference.select_tokens(d, score, labels, st_r, 100, False, frac, decay)
        assert torch.equal(idx.cpu(), idx_ref.cpu()) and torch.equal(st_k.cpu(), st_r.cpu())


def test_select_tokens_over_steps(device):
    """A generation: first selection, then later ones with the staleness carried along."""
    gen = torch.Generator().manual_seed(5000)
    B, N, nc, k = 2, 256, 12, 80
    d, score, labels, stale = _select_inputs(B, N, nc, gen, device)
    s_k, s_r = stale.clone(), stale.clone()
    for step in range(5):
        idx = tk.select_tokens(d, score, labels, s_k, k, step == 0)
        idx_ref = reference.select_tokens(d, score, labels, s_r, k, step == 0)
        assert torch.equal(idx.cpu(), idx_ref.cpu()) and torch.equal(s_k.cpu(), s_r.cpu()), step
        d = (torch.rand(B, N, generator=gen) + 0.01).to(device)


def test_select_tokens_through_ops(device):
    gen = torch.Generator().manual_seed(6000)
    d, score, labels, stale = _select_inputs(2, 77, 7, gen, device)
    st_k, st_r = stale.clone(), stale.clone()
    idx = ops.select_tokens(d, score, labels, st_k, 30, first=False, backend="triton")
    idx_ref = ops.select_tokens(d, score, labels, st_r, 30, first=False, backend="torch")
    assert torch.equal(idx.cpu(), idx_ref.cpu()) and torch.equal(st_k.cpu(), st_r.cpu())


# ----------------------------------------------------------------------------- gather / scatter

GATHER_CASES = [
    # shape, dim, dtype, contiguous, idx dtype
    ((3, 77, 111), 1, "fp32", False, torch.int64),
    ((1, 1, 64), 1, "bf16", True, torch.int32),
    ((3, 5, 77, 64), 2, "fp16", False, torch.int32),
    ((1, 3, 77, 111), 2, "bf16", True, torch.int64),
    ((1, 4097, 64), 1, "fp32", True, torch.int64),
]


def _ks(N):
    return sorted({1, max(1, N // 3), N})


@pytest.mark.parametrize("shape,dim,dt,contiguous,idtype", GATHER_CASES)
def test_gather_tokens(shape, dim, dt, contiguous, idtype, device):
    gen = torch.Generator().manual_seed(7000 + sum(shape))
    x = _randn(shape, gen, DTYPES[dt], device, contiguous)
    for K in _ks(shape[dim]):
        idx = _idx(shape[0], shape[dim], K, gen, idtype, device)
        y = tk.gather_tokens(x, idx, dim)
        assert y.is_contiguous()
        assert torch.equal(y.cpu(), reference.gather_tokens(x, idx, dim).cpu())


@pytest.mark.parametrize("shape,dim,dt,contiguous,idtype", GATHER_CASES)
def test_scatter_tokens(shape, dim, dt, contiguous, idtype, device):
    gen = torch.Generator().manual_seed(8000 + sum(shape))
    dst = _randn(shape, gen, DTYPES[dt], device, contiguous)
    for K in _ks(shape[dim]):
        idx = _idx(shape[0], shape[dim], K, gen, idtype, device)
        src_shape = list(shape)
        src_shape[dim] = K
        # An fp32 source into a low-precision cache: the cast must round as torch does.
        src = _randn(src_shape, gen, torch.float32, device, not contiguous)
        a, b = dst.clone(), dst.clone()
        assert tk.scatter_tokens_(a, idx, src, dim) is a
        reference.scatter_tokens_(b, idx, src, dim)
        assert torch.equal(a.cpu(), b.cpu())


@pytest.mark.parametrize("shape,dim,dt,contiguous,idtype", GATHER_CASES[:4])
def test_scatter_kv(shape, dim, dt, contiguous, idtype, device):
    gen = torch.Generator().manual_seed(9000 + sum(shape))
    k_cache = _randn(shape, gen, DTYPES[dt], device, contiguous)
    v_cache = _randn(shape, gen, torch.float32, device, not contiguous)  # caches may differ in dtype
    K = max(1, shape[dim] // 3)
    idx = _idx(shape[0], shape[dim], K, gen, idtype, device)
    src_shape = list(shape)
    src_shape[dim] = K
    k = _randn(src_shape, gen, DTYPES[dt], device, not contiguous)
    v = _randn(src_shape, gen, torch.bfloat16, device, contiguous)
    kc, vc = k_cache.clone(), v_cache.clone()
    tk.scatter_kv_(kc, vc, idx, k, v, dim)
    kr, vr = k_cache.clone(), v_cache.clone()
    reference.scatter_kv_(kr, vr, idx, k, v, dim)
    assert torch.equal(kc.cpu(), kr.cpu()) and torch.equal(vc.cpu(), vr.cpu())


# ----------------------------------------------------------------------------- kmeans


@pytest.mark.parametrize("B,N,F,nc,dt,contiguous", [(3, 77, 3, 5, "fp32", False), (1, 200, 66, 20, "bf16", True)])
def test_kmeans(B, N, F, nc, dt, contiguous, device):
    gen = torch.Generator().manual_seed(10000 + N + F)
    x = _randn((B, N, F), gen, DTYPES[dt], device, contiguous)
    labels = tk.kmeans(x, nc, 3)
    assert labels.dtype == torch.int64
    assert torch.equal(labels.cpu(), reference.kmeans(x, nc, 3).cpu())


def test_kmeans_assign_ties(device):
    """Points equidistant from two centroids take the lower id, as torch.argmin."""
    gen = torch.Generator().manual_seed(11000)
    cent = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0]]]).to(device)
    x = torch.stack([torch.zeros(50), torch.randn(50, generator=gen)], -1)[None].to(device)
    labels = tk.kmeans_assign(x, cent)
    assert torch.equal(labels.cpu(), reference.kmeans_assign(x, cent).cpu())
    assert int(labels.max()) <= 1  # the duplicate centroid 2 never wins


# ----------------------------------------------------------------------------- launch grids


class _Launch:
    """Stands in for a @triton.jit kernel: records the grid it is launched on."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_video_sized_launches_keep_every_grid_axis_within_its_limit(monkeypatch):
    """A video's flat (B, N, C) caches run in blocks of 4 rows (C = 5120: 256 columns a program),
    so the forecast's row blocks pass the 65,535 of grid axes 1 and 2 above 262,140 rows (a
    million rows: 250,000 blocks); they go on axis 0 (2^31 - 1). Shapes only: meta tensors."""
    import cat_kernels.triton.forecast as forecast
    import cat_kernels.triton.gather_scatter as gather_scatter

    B, N, C, K = 2, 1_000_000, 5120, 1_000_000
    meta = dict(device="meta")
    cache = torch.empty(B, N, C, dtype=torch.bfloat16, **meta)
    rows = torch.empty(B, K, C, dtype=torch.bfloat16, **meta)
    per_token = torch.empty(B, N, **meta)
    pos = torch.empty(B, N, dtype=torch.int64, **meta)
    idx = torch.empty(B, K, dtype=torch.int64, **meta)
    launches = _Launch()
    monkeypatch.setattr(forecast, "_forecast_kernel", launches)
    monkeypatch.setattr(gather_scatter, "_gather_tokens_kernel", launches)
    monkeypatch.setattr(gather_scatter, "_scatter_rows_kernel", launches)
    forecast.forecast_kv_triton(cache, cache, cache, cache, cache, cache, pos, rows, rows, per_token, per_token, 1)
    gather_scatter.gather_tokens_triton(cache, idx, 1)
    gather_scatter.scatter_kv_triton(cache, cache, idx, rows, rows, 1)
    assert len(launches.grids) == 3
    assert launches.grids[0] == (250_000, 2, 20)  # row blocks, B*H, column blocks
    for grid in launches.grids:
        assert grid[0] <= 2**31 - 1 and max(grid[1:]) <= 65535
    with pytest.raises(ValueError, match="65535"):
        forecast.row_grid(70_000, N, 4, C, 256)
