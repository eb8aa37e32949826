"""Properties of the selection policy (docs/design.md section 4), checked on the torch reference."""

import pytest
import torch

from cat_kernels import reference


def _inputs(B, N, nc, gen):
    d = torch.rand(B, N, generator=gen) + 0.01
    score = torch.rand(B, nc, generator=gen) + 0.01
    labels = torch.randint(0, nc, (B, N), generator=gen)
    stale = torch.rand(B, N, generator=gen) * 2 + 0.01
    return d, score, labels, stale


@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("k", [1, 13, 40, 99, 100])
def test_k_unique_sorted(k, first):
    gen = torch.Generator().manual_seed(k + 100 * first)
    d, score, labels, stale = _inputs(3, 100, 7, gen)
    idx = reference.select_tokens(d, score, labels, stale, k, first)
    assert idx.shape == (3, k) and idx.dtype == torch.int64
    for row in idx:
        assert torch.equal(row, torch.sort(row).values)
        assert row.unique().numel() == k
        assert 0 <= int(row.min()) and int(row.max()) < 100


@pytest.mark.parametrize("first", [True, False])
def test_k_equals_n_selects_all(first):
    gen = torch.Generator().manual_seed(7 + first)
    d, score, labels, stale = _inputs(2, 50, 4, gen)
    before = stale.clone()
    idx = reference.select_tokens(d, score, labels, stale, 50, first, staleness_decay=0.5)
    assert torch.equal(idx, torch.arange(50).expand(2, 50))
    assert torch.equal(stale, before * 0.5 + 1)


def _top_cluster_setup(gen, N=200, nc=5):
    """Cluster 0 has by far the largest change, so it ranks first."""
    d, score, labels, stale = _inputs(1, N, nc, gen)
    score[0, 0] = 10.0
    d[labels == 0] += 1.0
    return d, score, labels, stale


def test_first_takes_top_changes_of_top_cluster():
    gen = torch.Generator().manual_seed(11)
    d, score, labels, stale = _top_cluster_setup(gen)
    k = 100
    idx = reference.select_tokens(d, score, labels, stale, k, first=True)
    members = (labels[0] == 0).nonzero().flatten()
    top = members[torch.argsort(d[0, members], descending=True)[: k // 10]]
    assert set(top.tolist()) <= set(idx[0].tolist())


def test_later_takes_top_changes_of_top_cluster():
    gen = torch.Generator().manual_seed(12)
    d, score, labels, stale = _top_cluster_setup(gen)
    k = 100
    idx = reference.select_tokens(d, score, labels, stale, k, first=False)
    members = (labels[0] == 0).nonzero().flatten()
    quota = min(3 * int(0.05 * k), members.numel())
    top = members[torch.argsort(d[0, members], descending=True)[:quota]]
    assert set(top.tolist()) <= set(idx[0].tolist())


def test_no_change_picks_stalest():
    """d == 0 everywhere (zeros are the point here) and equal scores: the importance part takes
    cluster tops by index, the rest are the globally stalest tokens."""
    gen = torch.Generator().manual_seed(13)
    N, k = 120, 40
    d = torch.zeros(1, N)
    score = torch.zeros(1, 4)
    labels = torch.randint(0, 4, (1, N), generator=gen)
    stale = torch.randperm(N, generator=gen).float()[None]  # distinct counts
    idx = reference.select_tokens(d, score, labels, stale.clone(), k, first=False, importance_fraction=0.0)
    stalest = torch.argsort(stale[0])[:k]
    assert torch.equal(idx[0], torch.sort(stalest).values)


def test_ties_by_index_and_deterministic():
    gen = torch.Generator().manual_seed(14)
    N, k = 60, 20
    d = torch.ones(1, N)  # every token changed equally
    score = torch.ones(1, 3)
    labels = torch.randint(0, 3, (1, N), generator=gen)
    stale = torch.ones(1, N)
    a = reference.select_tokens(d, score, labels, stale.clone(), k, first=True)
    b = reference.select_tokens(d, score, labels, stale.clone(), k, first=True)
    assert torch.equal(a, b)
    # k // 10 = 2 lowest indices of cluster 0 (rank 0 on the tie), then 1, then 2, then lowest indices.
    expect = []
    for c in range(3):
        expect += (labels[0] == c).nonzero().flatten()[:2].tolist()
    rest = [i for i in range(N) if i not in expect][: k - len(expect)]
    assert a[0].tolist() == sorted(expect + rest)
    s1 = reference.select_tokens(d, score, labels, stale.clone(), k, first=False)
    assert torch.equal(s1, reference.select_tokens(d, score, labels, stale.clone(), k, first=False))


def test_staleness_update():
    gen = torch.Generator().manual_seed(15)
    d, score, labels, stale = _inputs(2, 40, 3, gen)
    before = stale.clone()
    idx = reference.select_tokens(d, score, labels, stale, 10, first=False, staleness_decay=0.25)
    hit = torch.zeros_like(before).scatter_(1, idx, 1.0)
    assert torch.equal(stale, before * 0.25 + hit)


def test_empty_clusters_rank_last():
    gen = torch.Generator().manual_seed(16)
    out = torch.randn(2, 30, 8, generator=gen)
    anchor = torch.randn(2, 30, 8, generator=gen)
    labels = torch.randint(0, 3, (2, 30), generator=gen)  # clusters 3 and 4 empty
    _, score = reference.token_stats(out, anchor, labels, 5)
    assert torch.isneginf(score[:, 3:]).all() and torch.isfinite(score[:, :3]).all()
    rank = reference.cluster_rank(score)
    assert (rank[:, 3:] >= 3).all()


@pytest.mark.parametrize(("B", "N", "F", "nc", "chunk"),
                         [(2, 97, 5, 7, 3 * 7 * 5), (1, 64, 33, 20, 1), (3, 50, 4, 1, 600)])
def test_kmeans_assign_in_chunks_equals_at_once(monkeypatch, B, N, F, nc, chunk):
    """The reference assigns a chunk of tokens at a time (so a video's hidden states need not
    form all (B, N, clusters, F) differences at once); the labels are those of one chunk."""
    gen = torch.Generator().manual_seed(N + F)
    x = torch.randn(B, N, F, generator=gen)
    cent = torch.randn(B, nc, F, generator=gen)
    cent[:, -1] = x[:, 3]  # a point on a centroid, and a tie: two equal centroids
    if nc > 2:
        cent[:, 1] = cent[:, 0]
    want = reference.kmeans_assign(x, cent)
    monkeypatch.setattr(reference, "KMEANS_CHUNK_ELEMENTS", chunk)
    got = reference.kmeans_assign(x, cent)
    assert torch.equal(got, want)
    dist = ((x[:, :, None] - cent[:, None]) ** 2).sum(-1)
    assert torch.equal(dist.gather(2, got[..., None]), dist.min(-1, keepdim=True).values)
    assert bool((got != 1).all()) or nc <= 2  # of two equal centroids the lower index wins
