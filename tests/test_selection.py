"""The "regions" token selection (cat_pruning.state.select_regions): whole spatial clusters in
the order of mean score times (1 + mean age), the last one in part as a disc around its
highest-scoring token. Expected picks are built here by brute force in Python."""

from __future__ import annotations

import pytest
import torch

from cat_pruning.state import select_regions


def quadrants(side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A side x side grid cut into four quadrant clusters: (N, 2) positions, (N,) labels."""
    rows = torch.arange(side).repeat_interleave(side)
    cols = torch.arange(side).repeat(side)
    labels = (rows >= side // 2).long() * 2 + (cols >= side // 2).long()
    return torch.stack([rows, cols], -1).float(), labels


def brute_force(d, labels, age, pos, k, c):
    """The same rule written plainly, one row at a time."""
    picks = []
    for b in range(d.shape[0]):
        members = {j: [i for i in range(d.shape[1]) if labels[b, i] == j] for j in range(c)}
        prio = {j: (sum(d[b, i].item() for i in m) / max(len(m), 1)) * (1 + sum(age[b, i].item() for i in m)
                                                                      / max(len(m), 1))
                for j, m in members.items()}
        chosen = []
        for j in sorted(prio, key=lambda j: (-prio[j], j)):
            m = members[j]
            if not m:
                continue
            seed = max(m, key=lambda i: (d[b, i].item(), -i))
            sr, sc = pos[seed].tolist()
            m = sorted(m, key=lambda i: ((pos[i][0].item() - sr) ** 2 + (pos[i][1].item() - sc) ** 2, i))
            chosen += m[: k - len(chosen)]
            if len(chosen) == k:
                break
        picks.append(sorted(chosen))
    return picks


@pytest.mark.parametrize("k", [1, 5, 16, 21, 40, 64])
def test_regions_take_whole_clusters_then_a_disc_of_the_next(k):
    torch.manual_seed(k)
    pos, lab = quadrants(8)
    d = torch.rand(3, 64) + 0.1
    age = torch.randint(0, 3, (3, 64)).float()
    labels = lab.expand(3, -1).contiguous()
    idx = select_regions(d, labels, age, pos, k, 4)
    assert idx.dtype == torch.int64 and idx.shape == (3, k)
    assert idx.tolist() == brute_force(d, labels, age, pos, k, 4)


def test_a_stale_cluster_goes_first_and_empty_clusters_are_skipped():
    pos, lab = quadrants(6)
    labels = lab.expand(1, -1).contiguous()
    d = torch.ones(1, 36)
    age = torch.zeros(1, 36)
    age[0, labels[0] == 3] = 2.0  # same score everywhere: the cluster not computed longest wins
    idx = select_regions(d, labels, age, pos, 9, 5)  # cluster 4 has no token
    assert torch.equal(idx[0], (labels[0] == 3).nonzero().flatten())
    d[0, labels[0] == 1] = 4.0  # a larger score outweighs the age
    assert torch.equal(select_regions(d, labels, age, pos, 9, 5)[0], (labels[0] == 1).nonzero().flatten())


def test_regions_compile_to_the_same_picks():
    torch.manual_seed(0)
    pos, lab = quadrants(10)
    labels = lab.expand(2, -1).contiguous()
    d, age = torch.rand(2, 100), torch.rand(2, 100)
    compiled = torch.compile(select_regions, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(d, labels, age, pos, 30, 4), select_regions(d, labels, age, pos, 30, 4))
