"""Triton backend of cat_kernels: the same functions and signatures as cat_kernels.reference.

The launchers assume arguments already validated by cat_kernels.ops (shapes, dtypes, devices);
they accept any strides (the forecast caches: contiguous), int32 or int64 labels/indices and
fp32/fp16/bf16 data. CUDA tensors,
or CPU tensors under TRITON_INTERPRET=1.
"""

from .attention import forecast_attention
from .forecast import forecast_kv_, forecast_tokens_
from .gather_scatter import gather_tokens, scatter_kv_, scatter_tokens_
from .kmeans import kmeans, kmeans_assign
from .select import select_tokens
from .token_stats import token_stats

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
