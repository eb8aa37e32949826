"""Pure-torch reference implementations of the cat_kernels ops.

These are the oracle that every kernel is tested against and the fallback backend. They take
the same arguments as the public ops in :mod:`cat_kernels.ops` (already validated there) and
are written for clarity: static shapes, no host synchronisation, stable sorts for every
ordering so that ties always break by the lower index.

Orderings used by the selection policy (docs/design.md section 4):
- clusters rank by score, highest first, ties by lower cluster id; empty clusters score -inf;
- "largest change" orders tokens by d descending, ties by lower token index;
- "stalest" orders tokens by staleness ascending (the count decays by `decay` per pruned step
  and grows by one when a token is recomputed, so a low count means not recomputed lately),
  ties by lower token index.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "token_stats",
    "select_tokens",
    "gather_tokens",
    "scatter_tokens_",
    "scatter_kv_",
    "forecast_tokens_",
    "forecast_kv_",
    "forecast_rows",
    "forecast_attention",
    "kmeans",
    "kmeans_assign",
]


def token_stats(out: Tensor, anchor: Tensor, labels: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """d[b,i] = ||out[b,i] - anchor[b,i]||_2 and score[b,c] = ||max_{i in c} (out - anchor)[b,i]||_2.

    out, anchor: (B, N, C) floating; labels: (B, N) integer in [0, num_clusters).
    Returns d (B, N) float32 and cluster_score (B, num_clusters) float32 (-inf for an empty
    cluster, so it ranks last). All arithmetic in fp32.
    """
    diff = out.float() - anchor.float()
    d = diff.square().sum(-1).sqrt()
    B, N, C = diff.shape
    cmax = diff.new_full((B, num_clusters, C), float("-inf"))
    cmax = cmax.scatter_reduce(1, labels.long()[..., None].expand(B, N, C), diff, "amax", include_self=True)
    score = cmax.square().sum(-1).sqrt()
    empty = cmax[..., 0] == float("-inf")
    score = torch.where(empty, torch.full_like(score, float("-inf")), score)
    return d, score


def _lex_order(group: Tensor, key: Tensor) -> Tensor:
    """Permutation (B, N) sorting each row by (group asc, key asc, index asc)."""
    by_key = torch.sort(key, dim=1, stable=True).indices
    by_group = torch.sort(group.gather(1, by_key), dim=1, stable=True).indices
    return by_key.gather(1, by_group)


def _position_in_group(group: Tensor, perm: Tensor, num_groups: int) -> Tensor:
    """For each token, its 0-based position inside its group in the order `perm`."""
    B, N = group.shape
    counts = torch.zeros(B, num_groups, dtype=torch.long, device=group.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    start = counts.cumsum(1) - counts
    arange = torch.arange(N, device=group.device).expand(B, N)
    pos_sorted = arange - start.gather(1, group.gather(1, perm))
    return torch.empty_like(group).scatter_(1, perm, pos_sorted)


def _take_in_order(candidate: Tensor, perm: Tensor, budget: int) -> Tensor:
    """Mask of the first `budget` candidates in the order `perm`."""
    cand_sorted = candidate.gather(1, perm)
    take_sorted = cand_sorted & (cand_sorted.long().cumsum(1) <= budget)
    return torch.zeros_like(candidate).scatter_(1, perm, take_sorted)


def _fill_and_sort(chosen: Tensor, key: Tensor, k: int) -> Tensor:
    """The chosen tokens plus the lowest-`key` others (ties by index) up to k, sorted ascending."""
    order = _lex_order((~chosen).long(), key)
    return torch.sort(order[:, :k], dim=1).values


def cluster_rank(cluster_score: Tensor) -> Tensor:
    """rank[b,c]: position of cluster c when sorted by score descending, ties by lower id."""
    order = torch.sort(cluster_score, dim=1, descending=True, stable=True).indices
    arange = torch.arange(order.shape[1], device=order.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, arange)


def select_tokens(
    d: Tensor,
    cluster_score: Tensor,
    labels: Tensor,
    staleness: Tensor,
    k: int,
    first: bool,
    importance_fraction: float = 0.25,
    staleness_decay: float = 0.5,
) -> Tensor:
    """CAT selection (docs/design.md section 4): k unique token indices per sample, sorted ascending.

    d: (B, N) float32 token change; cluster_score: (B, nc) float32; labels: (B, N) integer;
    staleness: (B, N) float32, updated in place afterwards as s = decay * s; s[idx] += 1.
    first=True: walk clusters by rank taking each one's top floor(k/10) tokens by d, stop at k,
    fill with the largest d. first=False: importance part of floor(importance_fraction*k) slots
    (per-cluster quota m_r * floor(0.05 k), m = 3, 2, 1, ..., by d; plus floor(q_r/2) stalest
    tokens in clusters of rank >= 1; taken in rank order), the rest filled with the stalest.
    """
    B, N = d.shape
    nc = cluster_score.shape[1]
    labels = labels.long()
    d = d.float()
    rank = cluster_rank(cluster_score.float())
    r = rank.gather(1, labels)
    size_by_rank = torch.zeros_like(rank).scatter_add_(1, r, torch.ones_like(r))
    perm_d = _lex_order(r, -d)
    p_d = _position_in_group(r, perm_d, nc)

    if first:
        chosen = _take_in_order(p_d < k // 10, perm_d, k)
        idx = _fill_and_sort(chosen, -d, k)
    else:
        s = staleness.float()
        base = int(0.05 * k)
        budget = int(importance_fraction * k)
        multiplier = torch.where(r == 0, 3, torch.where(r == 1, 2, 1))
        quota = torch.minimum(multiplier * base, size_by_rank.gather(1, r))
        cand_d = p_d < quota
        # Within each cluster: its top tokens by d first (tier 0), then the rest by staleness.
        tier = (~cand_d).long()
        group = 2 * r + tier
        perm = _lex_order(group, torch.where(cand_d, -d, s))
        p_group = _position_in_group(group, perm, 2 * nc)
        cand_s = (tier == 1) & (r >= 1) & (p_group < quota // 2)
        chosen = _take_in_order(cand_d | cand_s, perm, budget)
        idx = _fill_and_sort(chosen, s, k)

    staleness.mul_(staleness_decay)
    staleness.scatter_add_(1, idx, torch.ones_like(idx, dtype=staleness.dtype))
    return idx


def gather_tokens(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """out[b, ..., j, :] = x[b, ..., idx[b, j], :] along `dim` (1 for (B,N,C), 2 for (B,H,N,D))."""
    index = idx.long().view(idx.shape[0], *([1] * (dim - 1)), idx.shape[1], 1)
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    return x.gather(dim, index.expand(shape))


def scatter_tokens_(dst: Tensor, idx: Tensor, src: Tensor, dim: int) -> Tensor:
    """dst[b, ..., idx[b, j], :] = src[b, ..., j, :] in place along `dim`; returns dst."""
    index = idx.long().view(idx.shape[0], *([1] * (dim - 1)), idx.shape[1], 1)
    dst.scatter_(dim, index.expand(src.shape), src.to(dst.dtype))
    return dst


def scatter_kv_(k_cache: Tensor, v_cache: Tensor, idx: Tensor, k: Tensor, v: Tensor, dim: int) -> None:
    """Both caches' rows at idx overwritten with the new K and V rows (one launch in kernels)."""
    scatter_tokens_(k_cache, idx, k, dim)
    scatter_tokens_(v_cache, idx, v, dim)


def forecast_tokens_(
    base: Tensor, slope: Tensor, out: Tensor | None, pos: Tensor, rows: Tensor, weight: Tensor, inv_dt: Tensor,
    dim: int,
) -> None:
    """First-order forecast of one cache: computed tokens refresh base and slope, the others are
    read as base + weight * slope. All math in fp32, one rounding per stored value.

    base, out: (B, N, C) with dim=1 or (B, H, N, D) with dim=2, one float dtype (out None: only
    base and slope are updated, a step that reads the new rows themselves); slope: same
    shape, any float dtype; rows: the new rows, N replaced by K; pos: (B, N) integer, the row of
    each token in `rows` or -1 (values outside [0, K) count as -1); weight, inv_dt: (B, N) fp32.
    For pos[b, n] = j >= 0, with new = rows[b, ..., j, :] rounded to base's dtype:
        slope[n] = (new - base[n]) * inv_dt[b, n];  base[n] = new;  out[n] = new.
    For pos[b, n] = -1: base, slope unchanged;  out[n] = base[n] + weight[b, n] * slope[n].
    Source: issue 10 (CAT-F); docs/design.md section 5 (forecasting the skipped rows).
    """
    B, N = pos.shape
    K = rows.shape[dim]
    shape = (B, *([1] * (dim - 1)), N, 1)  # per-token values broadcast over heads and channels
    p = pos.long().view(shape)
    computed = (p >= 0) & (p < K)
    b_old = base.float()
    s_old = slope.float()
    if K > 0:
        index = torch.where(computed, p, 0).expand(base.shape)
        new = rows.to(base.dtype).gather(dim, index).float()
    else:
        new = b_old
    w = weight.float().view(shape)
    idt = inv_dt.float().view(shape)
    # Two roundings (product, then sum), never a fused multiply-add: the kernels do the same.
    forecast = b_old + w * s_old
    new_slope = (new - b_old) * idt
    if out is not None:
        out.copy_(torch.where(computed, new, forecast))
    slope.copy_(torch.where(computed, new_slope, s_old))
    base.copy_(torch.where(computed, new, b_old))


def forecast_kv_(
    k_base: Tensor,
    v_base: Tensor,
    k_slope: Tensor,
    v_slope: Tensor,
    k_out: Tensor | None,
    v_out: Tensor | None,
    pos: Tensor,
    k: Tensor,
    v: Tensor,
    weight: Tensor,
    inv_dt: Tensor,
    dim: int,
) -> None:
    """:func:`forecast_tokens_` for the K and the V cache of one layer (one launch in kernels)."""
    forecast_tokens_(k_base, k_slope, k_out, pos, k, weight, inv_dt, dim)
    forecast_tokens_(v_base, v_slope, v_out, pos, v, weight, inv_dt, dim)


def forecast_rows(base: Tensor, slope: Tensor | None, weight: Tensor | None) -> Tensor:
    """The value a skipped token's row is read as: base + weight * slope, in base's dtype.

    base: (B, H, N, D) float; slope: its shape, any float dtype, or None (plain reuse: base
    itself); weight: (B, N) float32. fp32 math, product then sum, two roundings (never a fused
    multiply-add), rounded once to base's dtype: exactly `out` of :func:`forecast_tokens_` for a
    token with pos = -1. weight 0 gives base unchanged (for finite slopes).
    """
    if slope is None:
        return base
    w = weight.float()[:, None, :, None]  # per token, broadcast over heads and channels
    return (base.float() + w * slope.float()).to(base.dtype)


def forecast_attention(
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
    """softmax(q k^T * scale) v over N forecast image keys and T extra keys, in fp32.

    q: (B, H, M, D); k_base, v_base: (B, H, N, D) caches; k_slope, v_slope: their slopes or None;
    weight: (B, N) float32 (None only without slopes); k_extra, v_extra: (B, H, T, D) or None;
    extra_mask: (B, T) bool, the extra rows attended (True), or None: all of them.
    Image keys/values are :func:`forecast_rows` (rounded to the caches' dtypes, as forecast_kv_
    stores them), extra rows are taken as given; everything is upcast to fp32, the softmax and
    both products run in fp32, and the output is rounded once to q's dtype. With slopes, an
    image token of negative weight is left out (a token the step computed, whose new key and
    value come among the extra rows). scale defaults to 1/sqrt(D). The keys' order does not
    change the result. Source: issue 21 item 2.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    keys = [forecast_rows(k_base, k_slope, weight).float()]
    values = [forecast_rows(v_base, v_slope, weight).float()]
    if k_extra is not None:
        keys.append(k_extra.float())
        values.append(v_extra.float())
    k = torch.cat(keys, dim=2)
    v = torch.cat(values, dim=2)
    logits = (q.float() @ k.transpose(-1, -2)) * scale
    n = k_base.shape[2]
    left_out = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool, device=k.device)
    if k_slope is not None:  # image keys of negative weight
        left_out[:, :n] = weight < 0
    if extra_mask is not None:
        left_out[:, n:] = ~extra_mask
    logits = logits.masked_fill(left_out[:, None, None, :], float("-inf"))
    return (torch.softmax(logits, dim=-1) @ v).to(q.dtype)


# Elements of the (B, n, nc, F) differences kmeans_assign forms at once: a chunk of the tokens at a
# time (the whole of them at the tests' sizes), so clustering a video on its hidden states (Wan
# 14B: N = 32,760, F = 5,123, 20 clusters, 27 GB at once) holds about 256 MB more than its inputs.
KMEANS_CHUNK_ELEMENTS = 1 << 26


def kmeans_assign(features: Tensor, centroids: Tensor) -> Tensor:
    """labels[b,i] = argmin_c ||features[b,i] - centroids[b,c]||^2, ties by lower c. (B, N) int64."""
    f, c = features.float(), centroids.float()[:, None, :, :]
    rows = max(1, KMEANS_CHUNK_ELEMENTS // (f.shape[0] * c.shape[2] * f.shape[2]))
    return torch.cat([(part[:, :, None, :] - c).square().sum(-1).argmin(-1) for part in f.split(rows, 1)], 1)


def kmeans_update(features: Tensor, labels: Tensor, centroids: Tensor) -> Tensor:
    """Mean of each cluster's points; an empty cluster keeps its centroid. Deterministic (bmm)."""
    one_hot = torch.nn.functional.one_hot(labels, centroids.shape[1]).float()  # (B, N, nc)
    sums = one_hot.transpose(1, 2) @ features.float()
    counts = one_hot.sum(1)[..., None]
    return torch.where(counts > 0, sums / counts.clamp_min(1), centroids)


def kmeans_init(features: Tensor, num_clusters: int) -> Tensor:
    """Deterministic start: the points at evenly spaced token indices (centres of equal spans)."""
    N = features.shape[1]
    pick = ((torch.arange(num_clusters, device=features.device) * 2 + 1) * N) // (2 * num_clusters)
    return features.float()[:, pick.clamp_max(N - 1)]


def kmeans(features: Tensor, num_clusters: int, iters: int) -> Tensor:
    """Lloyd's k-means with a deterministic start and a fixed number of iterations.

    features: (B, N, F) floating. Returns labels (B, N) int64 in [0, num_clusters).
    """
    centroids = kmeans_init(features, num_clusters)
    for _ in range(iters):
        centroids = kmeans_update(features, kmeans_assign(features, centroids), centroids)
    return kmeans_assign(features, centroids)
