"""The public ops reject bad arguments with errors that name them; backend choice; torch.compile."""

import pytest
import torch

from cat_kernels import backend, ops


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _stats_args(B=2, N=10, C=8, nc=4, seed=0):
    g = _gen(seed)
    out, anchor = torch.randn(B, N, C, generator=g), torch.randn(B, N, C, generator=g)
    return out, anchor, torch.randint(0, nc, (B, N), generator=g)


def _select_args(B=2, N=10, nc=4, seed=1):
    g = _gen(seed)
    return (
        torch.rand(B, N, generator=g) + 0.01,
        torch.rand(B, nc, generator=g) + 0.01,
        torch.randint(0, nc, (B, N), generator=g),
        torch.rand(B, N, generator=g) + 0.01,
    )


def test_token_stats_errors():
    out, anchor, labels = _stats_args()
    with pytest.raises(ValueError, match="out"):
        ops.token_stats(out[0], anchor, labels, 4)
    with pytest.raises(ValueError, match="anchor"):
        ops.token_stats(out, anchor.double(), labels, 4)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels.float(), 4)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels + 4, 4)  # outside [0, num_clusters)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels - 1 - labels.max(), 4)
    with pytest.raises(ValueError, match="labels"):
        ops.token_stats(out, anchor, labels[:1], 4)  # batch mismatch
    with pytest.raises(ValueError, match="anchor"):
        ops.token_stats(out, anchor.to("meta"), labels, 4)  # device mismatch
    with pytest.raises(ValueError, match="num_clusters"):
        ops.token_stats(out, anchor, labels, 0)


def test_select_tokens_errors():
    d, score, labels, stale = _select_args()
    with pytest.raises(ValueError, match="k must"):
        ops.select_tokens(d, score, labels, stale, 0, first=True)
    with pytest.raises(ValueError, match="k must"):
        ops.select_tokens(d, score, labels, stale, 11, first=True)
    with pytest.raises(ValueError, match="d must"):
        ops.select_tokens(d[0], score, labels, stale, 3, first=True)
    with pytest.raises(ValueError, match="staleness"):
        ops.select_tokens(d, score, labels, stale.half(), 3, first=True)
    with pytest.raises(ValueError, match="batch sizes"):
        ops.select_tokens(d, score[:1], labels, stale, 3, first=True)
    with pytest.raises(ValueError, match="labels"):
        ops.select_tokens(d, score, labels + 4, stale, 3, first=True)
    with pytest.raises(ValueError, match="staleness"):
        ops.select_tokens(d, score, labels, stale.to("meta"), 3, first=True)


def test_gather_scatter_errors():
    g = _gen(2)
    x = torch.randn(2, 10, 8, generator=g)
    idx = torch.randint(0, 10, (2, 4), generator=g)
    with pytest.raises(ValueError, match="idx"):
        ops.gather_tokens(x, idx.float())
    with pytest.raises(ValueError, match="idx"):
        ops.gather_tokens(x, idx + 10)
    with pytest.raises(ValueError, match="dim"):
        ops.gather_tokens(x, idx, dim=2)
    with pytest.raises(ValueError, match="batch sizes"):
        ops.gather_tokens(x, idx[:1])
    with pytest.raises(ValueError, match="idx"):
        ops.gather_tokens(x, idx.to("meta"))
    src = torch.randn(2, 4, 8, generator=g)
    with pytest.raises(ValueError, match="src"):
        ops.scatter_tokens_(x, idx, src[:, :3])
    with pytest.raises(ValueError, match="dst"):
        ops.scatter_tokens_(x.int(), idx, src)
    kc = torch.randn(2, 3, 10, 8, generator=g)
    k = torch.randn(2, 3, 4, 8, generator=g)
    with pytest.raises(ValueError, match="v_cache"):
        ops.scatter_kv_(kc, kc[:, :2], idx, k, k[:, :2])
    with pytest.raises(ValueError, match="v must|v "):
        ops.scatter_kv_(kc, kc.clone(), idx, k, k[:, :, :3])
    with pytest.raises(ValueError, match="features"):
        ops.kmeans(torch.randn(10, 3, generator=g), 4)


def test_backend_errors(monkeypatch):
    out, anchor, labels = _stats_args()
    with pytest.raises(ValueError, match="backend"):
        ops.token_stats(out, anchor, labels, 4, backend="nope")
    if not backend.extension_available():
        with pytest.raises(RuntimeError, match="extension"):
            ops.token_stats(out, anchor, labels, 4, backend="cuda")
    monkeypatch.setattr(backend, "_EXTENSION", None)
    with pytest.raises(RuntimeError, match="extension"):
        ops.token_stats(out, anchor, labels, 4, backend="cuda")


def test_torch_compile_fullgraph_matches_eager():
    out, anchor, labels = _stats_args(B=2, N=40, C=16, nc=5, seed=3)
    g = _gen(4)
    stale = torch.rand(2, 40, generator=g) + 0.01
    k_cache = torch.randn(2, 3, 40, 8, generator=g)
    v_cache = torch.randn(2, 3, 40, 8, generator=g)
    k_new = torch.randn(2, 3, 12, 8, generator=g)
    v_new = torch.randn(2, 3, 12, 8, generator=g)

    def step(out, anchor, labels, stale, k_cache, v_cache):
        d, score = ops.token_stats(out, anchor, labels, 5, backend="torch")
        idx = ops.select_tokens(d, score, labels, stale, 12, first=False, backend="torch")
        rows = ops.gather_tokens(out, idx, 1, backend="torch")
        ops.scatter_kv_(k_cache, v_cache, idx, k_new, v_new, 2, backend="torch")
        return idx, rows

    args = (out, anchor, labels, stale, k_cache, v_cache)
    eager_args = [a.clone() for a in args]
    compiled_args = [a.clone() for a in args]
    torch._dynamo.reset()
    idx_c, rows_c = torch.compile(step, fullgraph=True, backend="eager")(*compiled_args)
    idx_e, rows_e = step(*eager_args)
    assert torch.equal(idx_c, idx_e) and torch.equal(rows_c, rows_e)
    for a, b in zip(compiled_args, eager_args, strict=True):
        assert torch.equal(a, b)  # staleness and both caches updated alike
