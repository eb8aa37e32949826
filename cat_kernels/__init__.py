"""cat_kernels: the tensor ops behind CAT Pruning (token statistics, selection, gather, scatter,
forecast of cached rows, attention over forecast caches, k-means), each as a Triton kernel, an
optional compiled extension and a pure-torch reference.

Knows nothing of diffusers. ``from cat_kernels import ops`` or the names re-exported here.
"""

from .ops import (
    forecast_attention,
    forecast_kv_,
    forecast_tokens_,
    gather_tokens,
    kmeans,
    scatter_kv_,
    scatter_tokens_,
    select_tokens,
    token_stats,
)

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
]
__version__ = "0.1.0"
