"""The compiled extension cat_kernels._C behind the reference's signatures.

Importing this module imports cat_kernels._C, which registers the ops under
``torch.ops.cat_kernels`` (C++ for CPU tensors, CUDA kernels when built with nvcc, Meta for
tracing). It raises ImportError when the extension is not built, so :mod:`cat_kernels.backend`
treats the backend as missing. Each function has the name and signature of its counterpart in
:mod:`cat_kernels.reference`; see there for the math.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _C  # noqa: F401  (ImportError when not built; loading registers the ops)

__all__ = [
    "token_stats",
    "select_tokens",
    "gather_tokens",
    "scatter_tokens_",
    "scatter_kv_",
    "forecast_tokens_",
    "forecast_kv_",
    "forecast_attention",
    "kmeans",
    "kmeans_assign",
]

WITH_CUDA: bool = bool(_C.WITH_CUDA)
_ops = torch.ops.cat_kernels


def token_stats(out: Tensor, anchor: Tensor, labels: Tensor, num_clusters: int) -> tuple[Tensor, Tensor]:
    """d (B, N) float32 and cluster_score (B, num_clusters) float32; see reference.token_stats."""
    return _ops.token_stats(out, anchor, labels, num_clusters)


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
    """idx (B, k) int64 sorted ascending; updates staleness in place; see reference.select_tokens."""
    return _ops.select_tokens(
        d, cluster_score, labels, staleness, k, bool(first), float(importance_fraction), float(staleness_decay)
    )


def gather_tokens(x: Tensor, idx: Tensor, dim: int) -> Tensor:
    """out[b, ..., j, :] = x[b, ..., idx[b, j], :] along `dim`; see reference.gather_tokens."""
    return _ops.gather_tokens(x, idx, dim)


def scatter_tokens_(dst: Tensor, idx: Tensor, src: Tensor, dim: int) -> Tensor:
    """dst[b, ..., idx[b, j], :] = src[b, ..., j, :] in place (dst's strides kept); returns dst."""
    _ops.scatter_tokens_(dst, idx, src, dim)
    return dst


def scatter_kv_(k_cache: Tensor, v_cache: Tensor, idx: Tensor, k: Tensor, v: Tensor, dim: int) -> None:
    """Both caches' rows at idx overwritten with the new K and V rows (one launch on CUDA)."""
    _ops.scatter_kv_(k_cache, v_cache, idx, k, v, dim)


def forecast_tokens_(
    base: Tensor, slope: Tensor, out: Tensor | None, pos: Tensor, rows: Tensor, weight: Tensor, inv_dt: Tensor, dim: int
) -> None:
    """One cache's forecast step in one pass (base, slope, out in place); see reference.forecast_tokens_."""
    _ops.forecast_tokens_(base, slope, out, pos, rows, weight, inv_dt, dim)


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
    """The K and V caches' forecast step (one launch on CUDA); see reference.forecast_kv_."""
    _ops.forecast_kv_(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim)


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
    """Attention over forecast K/V caches, blocked ATen (CPU and CUDA); see reference.forecast_attention."""
    return _ops.forecast_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask, scale)


def kmeans(features: Tensor, num_clusters: int, iters: int) -> Tensor:
    """labels (B, N) int64: the reference's k-means with the assignment step compiled."""
    return _ops.kmeans(features, num_clusters, iters)


def kmeans_assign(features: Tensor, centroids: Tensor) -> Tensor:
    """labels[b, i] = argmin_c ||features[b, i] - centroids[b, c]||^2, ties by lower c."""
    return _ops.kmeans_assign(features, centroids)
