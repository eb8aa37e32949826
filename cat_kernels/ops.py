"""Public ops of cat_kernels: validated, dispatched, and traceable by torch.compile.

Each op checks its arguments (a ``ValueError`` that names the argument), picks a backend
(:mod:`cat_kernels.backend`) and calls a ``torch.library`` custom op in the ``cat_ops``
namespace whose fake implementation gives shapes, so ``torch.compile(fullgraph=True)`` traces
through. In plain eager mode without autograd (nothing traces, no dispatch mode, no tensor
subclass, grad disabled as in a pipeline call) the implementation is called directly, without
the custom op's dispatch (``_run``). The implementations live in :mod:`cat_kernels.reference`
(pure torch), :mod:`cat_kernels.triton` and the optional compiled extension, all with the same
signatures.

Value checks (indices and labels inside their range) read tensor values, which is a host
synchronisation on a GPU. They run only on CPU tensors in eager mode; on CUDA the kernels
mask out-of-range rows instead of faulting. Shape, dtype, device, layout and aliasing checks
always run while tracing (once per graph); in eager mode once per signature (``_signature``:
each tensor's shape, strides, dtype, device and address, and the numbers), since a pruned step
repeats the same calls on the same buffers every step.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import backend as _backend

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

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_INTS = (torch.int32, torch.int64)
# The ops' limits. The Triton selection itself packs token indices into 14 bits (up to 16,384
# tokens; more fall back to the reference, cat_kernels/triton/select.py) and cluster ranks into 10.
MAX_TOKENS = 1 << 20
MAX_CLUSTERS = 1023
# forecast_attention's head dim: every model family here has D <= 128 (SD3 64, PixArt 72, Flux,
# Wan and Qwen-Image 128); the Triton kernel's tiles spill above (cat_kernels/triton/attention.py).
MAX_HEAD_DIM = 128


# --------------------------------------------------------------------------- validation


def _check_tensor(name: str, t: object, ndim: int, dtypes: tuple[torch.dtype, ...]) -> Tensor:
    if not isinstance(t, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise ValueError(f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}")
    return t


def _check_same_device(**tensors: Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on {dev} but {first_name} is on {first}")


def _check_batch(**tensors: Tensor) -> None:
    sizes = {name: t.shape[0] for name, t in tensors.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batch sizes differ: {sizes}")


def _values_checkable(t: Tensor) -> bool:
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_range(name: str, t: Tensor, high: int, low: int = 0, bounds: str | None = None) -> None:
    """t's values (CPU tensors in eager mode only) in [low, high); `bounds` says so in the message."""
    if _values_checkable(t) and t.numel() and (int(t.min()) < low or int(t.max()) >= high):
        bounds = bounds or f"[{low}, {high})"
        raise ValueError(f"{name} must lie in {bounds}, got values in [{int(t.min())}, {int(t.max())}]")


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int):
        raise ValueError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, N={n}], got {k}")


def _check_dim(dim: int, x: Tensor) -> None:
    if dim not in (1, 2) or x.dim() != dim + 2:
        raise ValueError(
            f"dim must be 1 for (B, N, C) or 2 for (B, H, N, D); got dim={dim} with x of shape {tuple(x.shape)}"
        )


# Signatures of eager calls whose arguments passed the structural checks (shapes, dtypes, devices,
# layouts, aliasing): a pruned step repeats the same calls every step, so each is checked once per
# generation's buffers; value checks (indices in range, CPU only) still run every call.
_CHECKED: set[tuple] = set()
_MAX_CHECKED = 4096


def _signature(op: str, *args) -> tuple | None:
    """What an eager call's structural checks depend on: per tensor its shape, strides, dtype,
    device and data pointer (the aliasing checks), numbers and strings as given. None where torch
    traces, a tensor is a subclass (fake tensors have no data) or an argument is anything else:
    the checks then always run (while tracing: once per graph, at trace time)."""
    if torch.compiler.is_compiling():
        return None
    key = [op]
    for a in args:
        if isinstance(a, Tensor):
            if type(a) is not Tensor:
                return None
            a = (a.shape, a.stride(), a.dtype, a.device, a.data_ptr())
        elif not isinstance(a, (int, float, str, type(None))):  # e.g. a list where a number belongs
            return None
        key.append(a)
    return tuple(key)


def _unchecked(key: tuple | None) -> bool:
    """The call's structural checks must run: traced or fake (no key), or not passed before."""
    return key is None or key not in _CHECKED


def _remember(key: tuple | None) -> None:
    if key is not None:
        if len(_CHECKED) >= _MAX_CHECKED:  # bounded: tensors of new shapes or addresses add keys
            _CHECKED.clear()
        _CHECKED.add(key)


def _impl(op: str, backend: str):
    return getattr(_backend.module(backend), op)


def _run(name: str, op, *args):
    """Runs op `name` (args end with the concrete backend). Where torch may look inside the call
    (:func:`cat_kernels.backend.tracing`): the Triton backend's ``triton_op`` when registered
    (Inductor then sees and schedules the kernels), else custom op `op`. In plain eager without
    autograd (a pipeline's call: no_grad) the implementation is called directly: a custom op's
    dispatch alone costs 6-15 us a call on a CPU, as much as a small kernel, and a pruned step
    makes several calls per layer. With grad enabled the custom op keeps its body out of autograd
    (the caches are written in place)."""
    backend = args[-1]
    if not torch.is_grad_enabled() and not _backend.tracing(*args):
        return _impl(name, backend)(*args[:-1])
    if backend == "triton" and name in _TRITON_OPS:
        return _TRITON_OPS[name](*args[:-1])
    return op(*args)


# --------------------------------------------------------------------------- custom ops


@torch.library.custom_op("cat_ops::token_stats", mutates_args=())
def _token_stats_op(
    out: Tensor, anchor: Tensor, labels: Tensor, num_clusters: int, backend: str
) -> tuple[Tensor, Tensor]:
    return _impl("token_stats", backend)(out, anchor, labels, num_clusters)


@_token_stats_op.register_fake
def _(out, anchor, labels, num_clusters, backend):
    B, N, _ = out.shape
    return out.new_empty((B, N), dtype=torch.float32), out.new_empty((B, num_clusters), dtype=torch.float32)


@torch.library.custom_op("cat_ops::select_tokens", mutates_args=("staleness",))
def _select_tokens_op(
    d: Tensor,
    cluster_score: Tensor,
    labels: Tensor,
    staleness: Tensor,
    k: int,
    first: bool,
    importance_fraction: float,
    staleness_decay: float,
    backend: str,
) -> Tensor:
    return _impl("select_tokens", backend)(
        d, cluster_score, labels, staleness, k, first, importance_fraction, staleness_decay
    )


@_select_tokens_op.register_fake
def _(d, cluster_score, labels, staleness, k, first, importance_fraction, staleness_decay, backend):
    return d.new_empty((d.shape[0], k), dtype=torch.int64)


@torch.library.custom_op("cat_ops::gather_tokens", mutates_args=())
def _gather_tokens_op(x: Tensor, idx: Tensor, dim: int, backend: str) -> Tensor:
    return _impl("gather_tokens", backend)(x, idx, dim)


@_gather_tokens_op.register_fake
def _(x, idx, dim, backend):
    shape = list(x.shape)
    shape[dim] = idx.shape[1]
    return x.new_empty(shape)


@torch.library.custom_op("cat_ops::scatter_tokens_", mutates_args=("dst",))
def _scatter_tokens_op(dst: Tensor, idx: Tensor, src: Tensor, dim: int, backend: str) -> None:
    _impl("scatter_tokens_", backend)(dst, idx, src, dim)


@_scatter_tokens_op.register_fake
def _(dst, idx, src, dim, backend):
    return None


@torch.library.custom_op("cat_ops::scatter_kv_", mutates_args=("k_cache", "v_cache"))
def _scatter_kv_op(k_cache: Tensor, v_cache: Tensor, idx: Tensor, k: Tensor, v: Tensor, dim: int, backend: str) -> None:
    _impl("scatter_kv_", backend)(k_cache, v_cache, idx, k, v, dim)


@_scatter_kv_op.register_fake
def _(k_cache, v_cache, idx, k, v, dim, backend):
    return None


@torch.library.custom_op("cat_ops::forecast_tokens_", mutates_args=("base", "slope", "out"))
def _forecast_tokens_op(
    base: Tensor, slope: Tensor, out: Tensor | None, pos: Tensor, rows: Tensor, weight: Tensor, inv_dt: Tensor,
    dim: int, backend: str,
) -> None:
    _impl("forecast_tokens_", backend)(base, slope, out, pos, rows, weight, inv_dt, dim)


@_forecast_tokens_op.register_fake
def _(base, slope, out, pos, rows, weight, inv_dt, dim, backend):
    return None


@torch.library.custom_op(
    "cat_ops::forecast_kv_", mutates_args=("k_base", "v_base", "k_slope", "v_slope", "k_out", "v_out")
)
def _forecast_kv_op(
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
    backend: str,
) -> None:
    _impl("forecast_kv_", backend)(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim)


@_forecast_kv_op.register_fake
def _(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim, backend):
    return None


@torch.library.custom_op("cat_ops::forecast_attention", mutates_args=())
def _forecast_attention_op(
    q: Tensor,
    k_base: Tensor,
    v_base: Tensor,
    k_slope: Tensor | None,
    v_slope: Tensor | None,
    weight: Tensor | None,
    k_extra: Tensor | None,
    v_extra: Tensor | None,
    extra_mask: Tensor | None,
    scale: float,
    backend: str,
) -> Tensor:
    return _impl("forecast_attention", backend)(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra,
                                                extra_mask, scale)  # fmt: skip


@_forecast_attention_op.register_fake
def _(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask, scale, backend):
    return q.new_empty(q.shape)


@torch.library.custom_op("cat_ops::kmeans", mutates_args=())
def _kmeans_op(features: Tensor, num_clusters: int, iters: int, backend: str) -> Tensor:
    return _impl("kmeans", backend)(features, num_clusters, iters)


@_kmeans_op.register_fake
def _(features, num_clusters, iters, backend):
    return features.new_empty(features.shape[:2], dtype=torch.int64)


def _triton_ops() -> dict[str, object]:
    """The Triton backend's ops as ``torch.library.triton_op`` (``cat_ops::triton_<op>``), each
    with its custom op's schema less the backend: under torch.compile Inductor traces into them
    and schedules the kernels themselves (wrapped by :func:`cat_kernels.triton.launch.kernel`)
    in its graph and CUDA graphs, where a custom op is an opaque call. None without Triton,
    under TRITON_INTERPRET=1 (interpreted kernels cannot be traced; the custom ops serve) or
    on a torch without triton_op (before 2.6)."""
    triton_op = getattr(torch.library, "triton_op", None)
    if triton_op is None or not _backend.triton_available() or _backend.interpreting():
        return {}
    registered = {}
    for name in __all__:
        custom = getattr(torch.ops.cat_ops, name).default._schema
        schema = str(custom)[str(custom).index("(") :].replace(", str backend)", ")")
        mutates = tuple(a.name for a in custom.arguments if a.alias_info is not None and a.alias_info.is_write)
        impl = _impl(name, "triton")
        fn = impl if not schema.endswith("-> ()") else _discarding(impl)  # scatter_tokens_ returns dst
        registered[name] = triton_op(f"cat_ops::triton_{name}", fn, mutates_args=mutates, schema=schema)
    return registered


def _discarding(fn):
    def call(*args) -> None:
        fn(*args)

    return call


_TRITON_OPS = _triton_ops()


# --------------------------------------------------------------------------- public ops


def token_stats(
    out: Tensor, anchor: Tensor, labels: Tensor, num_clusters: int, *, backend: str | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token change and per-cluster score in one pass over `out` and `anchor`.

    d[b, i] = ||out[b, i] - anchor[b, i]||_2 over channels; cluster_score[b, c] = L2 norm over
    channels of the channel-wise max of (out - anchor) over the tokens of cluster c, -inf for an
    empty cluster (it ranks last).

    Args:
        out, anchor: (B, N, C) float32/float16/bfloat16, same shape and device.
        labels: (B, N) int32/int64 cluster ids in [0, num_clusters).
        num_clusters: number of clusters, >= 1.
        backend: "auto" (default), "triton", "cuda" or "torch"; see :mod:`cat_kernels.backend`.
    Returns:
        d (B, N) float32 and cluster_score (B, num_clusters) float32.
    """
    key = _signature("token_stats", out, anchor, labels, num_clusters)
    if _unchecked(key):
        _check_tensor("out", out, 3, _FLOATS)
        _check_tensor("anchor", anchor, 3, _FLOATS)
        _check_tensor("labels", labels, 2, _INTS)
        if anchor.shape != out.shape:
            raise ValueError(f"anchor must have the shape of out {tuple(out.shape)}, got {tuple(anchor.shape)}")
        if labels.shape != out.shape[:2]:
            raise ValueError(f"labels must have shape (B, N) = {tuple(out.shape[:2])}, got {tuple(labels.shape)}")
        _check_same_device(out=out, anchor=anchor, labels=labels)
        if not 1 <= num_clusters <= MAX_CLUSTERS:
            raise ValueError(f"num_clusters must lie in [1, {MAX_CLUSTERS}], got {num_clusters}")
        _remember(key)
    _check_range("labels", labels, num_clusters)
    backend = _backend.resolve(out.device, backend)
    return _run("token_stats", _token_stats_op, out, anchor, labels, num_clusters, backend)


def select_tokens(
    d: Tensor,
    cluster_score: Tensor,
    labels: Tensor,
    staleness: Tensor,
    k: int,
    *,
    first: bool,
    importance_fraction: float = 0.25,
    staleness_decay: float = 0.5,
    backend: str | None = None,
) -> Tensor:
    """CAT token selection and staleness update (docs/design.md section 4).

    Returns idx (B, k) int64: k unique token indices per sample, sorted ascending, and updates
    `staleness` in place: s = staleness_decay * s; s[idx] += 1 (a low count means "stale").

    Args:
        d: (B, N) float32 token change (from :func:`token_stats`).
        cluster_score: (B, nc) float32 cluster scores (from :func:`token_stats`).
        labels: (B, N) int32/int64 cluster ids in [0, nc).
        staleness: (B, N) float32, modified in place.
        k: tokens to select per sample, 1 <= k <= N.
        first: True for the first selection (clusters walked by rank, floor(k/10) tokens each,
            then the largest change); False for the later ones (importance part, then staleness).
        importance_fraction: share of k given to the importance part when first=False, in [0, 1].
        staleness_decay: factor applied to staleness before the increment, in [0, 1].
        backend: "auto" (default), "triton", "cuda" or "torch".
    """
    key = _signature("select_tokens", d, cluster_score, labels, staleness, k, first, importance_fraction,
                     staleness_decay)  # fmt: skip
    if _unchecked(key):
        _check_tensor("d", d, 2, (torch.float32,))
        _check_tensor("cluster_score", cluster_score, 2, (torch.float32,))
        _check_tensor("labels", labels, 2, _INTS)
        _check_tensor("staleness", staleness, 2, (torch.float32,))
        _check_batch(d=d, cluster_score=cluster_score, labels=labels, staleness=staleness)
        for name, t in (("labels", labels), ("staleness", staleness)):
            if t.shape != d.shape:
                raise ValueError(f"{name} must have the shape of d {tuple(d.shape)}, got {tuple(t.shape)}")
        _check_same_device(d=d, cluster_score=cluster_score, labels=labels, staleness=staleness)
        N, nc = d.shape[1], cluster_score.shape[1]
        _check_k(k, N)
        if N > MAX_TOKENS:
            raise ValueError(f"d has N={N} tokens; at most {MAX_TOKENS} are supported")
        if not 1 <= nc <= MAX_CLUSTERS:
            raise ValueError(f"cluster_score must have 1 to {MAX_CLUSTERS} clusters, got {nc}")
        if not 0.0 <= importance_fraction <= 1.0:
            raise ValueError(f"importance_fraction must lie in [0, 1], got {importance_fraction}")
        if not 0.0 <= staleness_decay <= 1.0:
            raise ValueError(f"staleness_decay must lie in [0, 1], got {staleness_decay}")
        _remember(key)
    _check_range("labels", labels, cluster_score.shape[1])
    return _run("select_tokens", _select_tokens_op,
        d,
        cluster_score,
        labels,
        staleness,
        k,
        bool(first),
        float(importance_fraction),
        float(staleness_decay),
        _backend.resolve(d.device, backend),
    )


def gather_tokens(x: Tensor, idx: Tensor, dim: int = 1, *, backend: str | None = None) -> Tensor:
    """out[b, ..., j, :] = x[b, ..., idx[b, j], :]: rows of x chosen by idx along `dim`.

    Args:
        x: (B, N, C) with dim=1 or (B, H, N, D) with dim=2; any float dtype; any strides.
        idx: (B, K) int32/int64 in [0, N).
        dim: the token dimension, 1 or 2.
    Returns a new contiguous tensor with N replaced by K.
    """
    key = _signature("gather_tokens", x, idx, dim)
    if _unchecked(key):
        _check_tensor("x", x, x.dim() if x.dim() in (3, 4) else 3, _FLOATS)
        _check_dim(dim, x)
        _check_tensor("idx", idx, 2, _INTS)
        _check_batch(x=x, idx=idx)
        _check_same_device(x=x, idx=idx)
        _remember(key)
    _check_range("idx", idx, x.shape[dim])
    return _run("gather_tokens", _gather_tokens_op, x, idx, dim, _backend.resolve(x.device, backend))


def _check_scatter(dst_name: str, dst: Tensor, idx: Tensor, src_name: str, src: Tensor, dim: int) -> None:
    _check_tensor(dst_name, dst, dst.dim() if dst.dim() in (3, 4) else 3, _FLOATS)
    _check_dim(dim, dst)
    _check_tensor(src_name, src, dst.dim(), _FLOATS)
    _check_tensor("idx", idx, 2, _INTS)
    expected = list(dst.shape)
    expected[dim] = idx.shape[1]
    if list(src.shape) != expected:
        raise ValueError(f"{src_name} must have shape {tuple(expected)}, got {tuple(src.shape)}")
    _check_same_device(**{dst_name: dst, "idx": idx, src_name: src})


def scatter_tokens_(dst: Tensor, idx: Tensor, src: Tensor, dim: int = 1, *, backend: str | None = None) -> Tensor:
    """dst[b, ..., idx[b, j], :] = src[b, ..., j, :] in place; returns dst.

    Args:
        dst: (B, N, C) with dim=1 or (B, H, N, D) with dim=2; the cache, written in place.
        idx: (B, K) int32/int64 in [0, N), unique within each row (duplicates: any one wins).
        src: dst's shape with N replaced by K; cast to dst's dtype.
        dim: the token dimension, 1 or 2.
    """
    key = _signature("scatter_tokens_", dst, idx, src, dim)
    if _unchecked(key):
        _check_scatter("dst", dst, idx, "src", src, dim)
        _remember(key)
    _check_range("idx", idx, dst.shape[dim])
    _run("scatter_tokens_", _scatter_tokens_op, dst, idx, src, dim, _backend.resolve(dst.device, backend))
    return dst


def scatter_kv_(
    k_cache: Tensor, v_cache: Tensor, idx: Tensor, k: Tensor, v: Tensor, dim: int = 2, *, backend: str | None = None
) -> None:
    """Writes the new K and V rows into both caches at idx, in one launch where the backend can.

    Same shapes and rules as :func:`scatter_tokens_`, for the pairs (k_cache, k) and
    (v_cache, v), which must have equal shapes.
    """
    key = _signature("scatter_kv_", k_cache, v_cache, idx, k, v, dim)
    if _unchecked(key):
        _check_scatter("k_cache", k_cache, idx, "k", k, dim)
        _check_scatter("v_cache", v_cache, idx, "v", v, dim)
        if k_cache.shape != v_cache.shape:
            raise ValueError(
                f"v_cache must have the shape of k_cache {tuple(k_cache.shape)}, got {tuple(v_cache.shape)}"
            )
        _remember(key)
    _check_range("idx", idx, k_cache.shape[dim])
    _run("scatter_kv_", _scatter_kv_op, k_cache, v_cache, idx, k, v, dim, _backend.resolve(k_cache.device, backend))


def _check_forecast(
    names: tuple[str, str, str, str], base: Tensor, slope: Tensor, out: Tensor | None, rows: Tensor, pos: Tensor,
    dim: int,
) -> None:
    """One cache (base, slope, out or None) and its new rows against pos (B, N)."""
    base_name, slope_name, out_name, rows_name = names
    if dim not in (1, 2):
        raise ValueError(f"dim must be 1 for (B, N, C) caches or 2 for (B, H, N, D) ones, got {dim}")
    _check_tensor(base_name, base, dim + 2, _FLOATS)
    written = {base_name: base, slope_name: slope, **({out_name: out} if out is not None else {})}
    for name, t in list(written.items())[1:]:  # slope, out
        _check_tensor(name, t, base.dim(), _FLOATS)
        if t.shape != base.shape:
            raise ValueError(f"{name} must have the shape of {base_name} {tuple(base.shape)}, got {tuple(t.shape)}")
    for name, t in ((base_name, base), (slope_name, slope)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous (a cache the caller allocates), got strides {t.stride()}")
    if out is not None and out.dtype != base.dtype:
        raise ValueError(f"{out_name} must have the dtype of {base_name} ({base.dtype}), got {out.dtype}")
    if out is not None and not _rows_view(out):
        raise ValueError(f"{out_name} must be contiguous or a slice of a contiguous buffer along its leading "
                         f"dimensions (rows of stride 1, no overlap), got strides {out.stride()}")
    _check_tensor(rows_name, rows, base.dim(), _FLOATS)
    expected = list(base.shape)
    expected[dim] = rows.shape[dim]
    if list(rows.shape) != expected:
        raise ValueError(f"{rows_name} must have shape {tuple(expected)} (N replaced by K), got {tuple(rows.shape)}")
    if pos.shape != (base.shape[0], base.shape[dim]):
        raise ValueError(f"pos must have shape (B, N) = {(base.shape[0], base.shape[dim])}, got {tuple(pos.shape)}")
    _check_same_device(**written, **{rows_name: rows, "pos": pos})
    # Aliases would break the math (a skipped token's out written over its base). Data pointers
    # do not exist while tracing, on meta tensors or fake and functional ones (subclasses).
    real = all(type(t) is Tensor for t in written.values())
    if not torch.compiler.is_compiling() and base.device.type != "meta" and real:
        ptrs = {name: t.data_ptr() for name, t in written.items()}
        if len(set(ptrs.values())) < len(ptrs) and base.numel():
            raise ValueError(f"{base_name}, {slope_name} and {out_name} must be distinct tensors, got {ptrs}")


def _rows_view(t: Tensor) -> bool:
    """t is laid out as a slice of a contiguous buffer along its leading dimensions: unit stride
    on the last one, and each stride at least the extent of the dimensions inside it (so no two
    elements share memory). The image rows of a (B, T + N, C) buffer are one."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return False
    extent = 1
    for size, stride in zip(reversed(t.shape), reversed(t.stride()), strict=True):
        if size > 1:
            if stride < extent:
                return False
            extent = stride * size
    return True


def _check_forecast_inputs(pos: Tensor, weight: Tensor, inv_dt: Tensor) -> None:
    """pos (checked by the caller), weight and inv_dt: (B, N)."""
    for name, t in (("weight", weight), ("inv_dt", inv_dt)):
        _check_tensor(name, t, 2, (torch.float32,))
        if t.shape != pos.shape:
            raise ValueError(f"{name} must have the shape of pos {tuple(pos.shape)}, got {tuple(t.shape)}")
    _check_same_device(pos=pos, weight=weight, inv_dt=inv_dt)


def _check_pos(pos: Tensor, k_rows: int) -> None:
    """pos's values: in [-1, k_rows), -1 for a token not computed."""
    _check_range("pos", pos, k_rows, -1, f"[-1, K={k_rows}) (-1: not computed)")


def forecast_tokens_(
    base: Tensor,
    slope: Tensor,
    out: Tensor | None,
    pos: Tensor,
    rows: Tensor,
    weight: Tensor,
    inv_dt: Tensor,
    dim: int = 1,
    *,
    backend: str | None = None,
) -> None:
    """First-order forecast of a token cache, in place, in one pass over its N rows.

    Computed tokens (pos[b, n] = j >= 0) take new = rows[b, ..., j, :] (rounded to base's
    dtype): slope[n] = (new - base[n]) * inv_dt[b, n], base[n] = new, out[n] = new. Skipped
    tokens (pos = -1) keep base and slope and read out[n] = base[n] + weight[b, n] * slope[n].
    All math in fp32, one rounding per stored value. With weight = 0, out is the plain scatter of
    rows into base (reuse); see :func:`cat_kernels.reference.forecast_tokens_`. Without out,
    only base and slope are updated (a step that computes every row reads its new rows).

    Args:
        base: (B, N, C) with dim=1 or (B, H, N, D) with dim=2, float32/float16/bfloat16,
            contiguous: each token's value at its last computation. Updated in place.
        slope: base's shape, contiguous, any of those float dtypes (fp32 next to a bf16 base is
            fine): change per unit time between the last two computations. Updated in place.
        out: base's shape and dtype: what the consumer reads. Written in place. Contiguous,
            or a slice of a contiguous buffer along the leading dimensions (rows of stride 1):
            e.g. the image rows of a (B, T + N, C) buffer whose T text rows the caller fills,
            so attention reads one tensor without a concatenation. None: nothing is written
            there (a step that computes every row reads its new rows, not a forecast).
        pos: (B, N) int32/int64, the token's row in `rows` if computed this step, else -1;
            values in [-1, K).
        rows: the new rows, base's shape with N replaced by K (0 <= K); any strides and float dtype.
        weight: (B, N) float32, the forecast horizon of each token (time since its last
            computation times any damping); 0 gives plain reuse.
        inv_dt: (B, N) float32, 1 / (time between a computed token's last two computations).
        dim: the token dimension, 1 or 2.
        backend: "auto" (default), "triton", "cuda" or "torch".
    """
    key = _signature("forecast_tokens_", base, slope, out, pos, rows, weight, inv_dt, dim)
    if _unchecked(key):
        _check_tensor("pos", pos, 2, _INTS)
        _check_forecast(("base", "slope", "out", "rows"), base, slope, out, rows, pos, dim)
        _check_forecast_inputs(pos, weight, inv_dt)
        _check_same_device(base=base, pos=pos, weight=weight)
        _remember(key)
    _check_pos(pos, rows.shape[dim])
    backend = _backend.resolve(base.device, backend)
    _run("forecast_tokens_", _forecast_tokens_op, base, slope, out, pos, rows, weight, inv_dt, dim, backend)


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
    dim: int = 2,
    *,
    backend: str | None = None,
) -> None:
    """:func:`forecast_tokens_` for a layer's K and V caches together, in one launch.

    Same rules for the triples (k_base, k_slope, k_out) with new rows k and (v_base, v_slope,
    v_out) with v; the two caches must have equal shapes (dtypes may differ) and share pos,
    weight and inv_dt; k_out and v_out are both given or both None. dim defaults to 2: caches
    (B, H, N, D), new rows (B, H, K, D), typically a transposed view of attention's (B, K, H, D).
    """
    key = _signature("forecast_kv_", k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim)
    if _unchecked(key):
        _check_tensor("pos", pos, 2, _INTS)
        _check_pair(("k_out", "v_out"), k_out, v_out)
        _check_forecast(("k_base", "k_slope", "k_out", "k"), k_base, k_slope, k_out, k, pos, dim)
        _check_forecast(("v_base", "v_slope", "v_out", "v"), v_base, v_slope, v_out, v, pos, dim)
        if v_base.shape != k_base.shape:
            raise ValueError(f"v_base must have the shape of k_base {tuple(k_base.shape)}, got {tuple(v_base.shape)}")
        if v.shape != k.shape:
            raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
        _check_forecast_inputs(pos, weight, inv_dt)
        _check_same_device(k_base=k_base, v_base=v_base, pos=pos, weight=weight)
        _remember(key)
    _check_pos(pos, k.shape[dim])
    _run("forecast_kv_", _forecast_kv_op,
        k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim,
        _backend.resolve(k_base.device, backend),
    )  # fmt: skip


def _check_pair(names: tuple[str, str], a: Tensor | None, b: Tensor | None) -> bool:
    """Both given (True) or both None (False)."""
    if (a is None) != (b is None):
        given, missing = names if b is None else names[::-1]
        raise ValueError(f"{given} and {missing} go together: {given} was given, {missing} is None")
    return a is not None


def forecast_attention(
    q: Tensor,
    k_base: Tensor,
    v_base: Tensor,
    k_slope: Tensor | None,
    v_slope: Tensor | None,
    weight: Tensor | None,
    k_extra: Tensor | None = None,
    v_extra: Tensor | None = None,
    *,
    extra_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> Tensor:
    """Attention of a pruned step over forecast K/V caches, the forecast formed on the fly.

    out = softmax(q k^T * scale) v over N image keys and T extra keys, where image token n's key
    is round(k_base[n] + weight[b, n] * k_slope[n]) to k_base's dtype (fp32 product, then sum:
    exactly the `k_out` row :func:`forecast_kv_` writes for a skipped token; weight 0 gives the
    base) and its value likewise; the extra rows (the text keys/values) are attended as given.
    With slopes, an image token of negative weight is left out: a pruned step passes the tokens
    it computed among the extra rows and their cache rows with weight -1, so caches that hold
    only the last refresh step's rows (forecast_from="refresh") need no refresh first.
    Logits, softmax and both products in fp32 (16-bit inputs: 16-bit operands, fp32
    accumulation), output rounded once to q's dtype. The keys' order does not matter. It replaces
    forecast_kv_ into a buffer + torch.cat + SDPA (about 14 bytes moved per cached element with
    bf16 caches and fp32 slopes) by one pass that reads base and slope (6 bytes). Computed
    tokens are either in the bases (forecast_kv_ or scatter_kv_ refreshes them) with weight 0,
    or among the extra rows with weight -1. Source: issue 21 item 2; see
    :func:`cat_kernels.reference.forecast_attention`.

    Args:
        q: (B, H, M, D) float32/float16/bfloat16, any strides (a transposed (B, M, H, D) view is
            fine), 1 <= D <= 128.
        k_base, v_base: (B, H, N, D) caches, each of one float dtype (may differ), unit stride
            along D: contiguous, or the (B, H, N, D) view of a (B, N, H * D) cache.
        k_slope, v_slope: the caches' slopes, their bases' shapes, any float dtype (fp32 next to
            a bf16 base is fine); both None for plain reuse (the paper's CAT: the bases are
            attended as they are and no slope is read). All four caches share k_base's strides.
        weight: (B, N) float32, each token's forecast horizon (0: the base as it is; negative:
            the token is left out); may be None only without slopes (it is unused then).
        k_extra, v_extra: (B, H, T, D) extra keys/values, any float dtype, any strides; both None
            or both given (T may be 0).
        extra_mask: (B, T) bool, any strides: the extra rows to attend (True), as SDPA's boolean
            mask over keys (a padded prompt's text); None: every extra row. Only with extras.
        scale: the logits' scale, a finite number; default 1/sqrt(D).
        backend: "auto" (default), "triton", "cuda" or "torch"; see :mod:`cat_kernels.backend`.
    Returns:
        (B, H, M, D) contiguous, q's dtype.

    The compiled extension ("cuda") runs a blocked ATen implementation on CPU and CUDA tensors
    (key blocks formed, two fp32 GEMMs and an online softmax per block; on CUDA the GEMMs follow
    torch's matmul precision setting): no hand-written CUDA kernel, because the Triton kernel is
    the one that runs on GPUs (auto picks it), a straightforward scalar CUDA kernel would be
    slower than cuBLAS, and a tensor-core one would duplicate the Triton kernel untested (no GPU
    here). docs/design.md section 7 says the same.
    """
    key = _signature("forecast_attention", q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask,
                     scale)  # fmt: skip
    if _unchecked(key):
        _check_tensor("q", q, 4, _FLOATS)
        _check_tensor("k_base", k_base, 4, _FLOATS)
        _check_tensor("v_base", v_base, 4, _FLOATS)
        B, H, M, D = q.shape
        if not 1 <= D <= MAX_HEAD_DIM:
            raise ValueError(f"q's head dim D must lie in [1, {MAX_HEAD_DIM}], got {D}")
        if k_base.shape[:2] != (B, H) or k_base.shape[3] != D:
            raise ValueError(
                f"k_base must have shape (B, H, N, D) with q's (B, H, D) = {(B, H, D)}, got {tuple(k_base.shape)}"
            )
        N = k_base.shape[2]
        if v_base.shape != k_base.shape:
            raise ValueError(f"v_base must have the shape of k_base {tuple(k_base.shape)}, got {tuple(v_base.shape)}")
        if N > MAX_TOKENS:
            raise ValueError(f"k_base has N={N} tokens; at most {MAX_TOKENS} are supported")
        tensors = {"q": q, "k_base": k_base, "v_base": v_base}
        if _check_pair(("k_slope", "v_slope"), k_slope, v_slope):
            for name, t, base in (("k_slope", k_slope, k_base), ("v_slope", v_slope, v_base)):
                _check_tensor(name, t, 4, _FLOATS)
                if t.shape != base.shape:
                    raise ValueError(
                        f"{name} must have the shape of its base {tuple(base.shape)}, got {tuple(t.shape)}"
                    )
                tensors[name] = t
            if weight is None:
                raise ValueError("weight must be given with slopes (zeros for plain reuse)")
        if weight is not None:
            _check_tensor("weight", weight, 2, (torch.float32,))
            if weight.shape != (B, N):
                raise ValueError(f"weight must have shape (B, N) = {(B, N)}, got {tuple(weight.shape)}")
            tensors["weight"] = weight
        for name in ("k_base", "v_base", "k_slope", "v_slope"):
            t = tensors.get(name)
            if t is not None and (t.stride(3) != 1 or t.stride() != k_base.stride()):
                same = "" if name == "k_base" else f" and k_base's strides {k_base.stride()}"
                raise ValueError(f"{name} must have unit stride along D{same} (a cache the caller allocates: "
                                 f"contiguous, or a (B, N, H * D) cache's (B, H, N, D) view), got strides "
                                 f"{t.stride()}")  # fmt: skip
        T = 0
        if _check_pair(("k_extra", "v_extra"), k_extra, v_extra):
            _check_tensor("k_extra", k_extra, 4, _FLOATS)
            _check_tensor("v_extra", v_extra, 4, _FLOATS)
            T = k_extra.shape[2]
            if k_extra.shape != (B, H, T, D):
                raise ValueError(
                    f"k_extra must have shape (B, H, T, D) with q's (B, H, D) = {(B, H, D)}, got {tuple(k_extra.shape)}"
                )
            if v_extra.shape != k_extra.shape:
                raise ValueError(
                    f"v_extra must have the shape of k_extra {tuple(k_extra.shape)}, got {tuple(v_extra.shape)}"
                )
            tensors.update(k_extra=k_extra, v_extra=v_extra)
        if extra_mask is not None:
            if k_extra is None:
                raise ValueError("extra_mask was given without k_extra and v_extra (it masks the extra rows)")
            _check_tensor("extra_mask", extra_mask, 2, (torch.bool,))
            if extra_mask.shape != (B, T):
                raise ValueError(f"extra_mask must have shape (B, T) = {(B, T)}, got {tuple(extra_mask.shape)}")
            tensors["extra_mask"] = extra_mask
        if N + T == 0:
            raise ValueError("forecast_attention needs at least one key: N + T = 0")
        _check_same_device(**tensors)
        _remember(key)
    if scale is None:
        scale = q.shape[3] ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return _run("forecast_attention", _forecast_attention_op,
        q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, extra_mask, float(scale),
        _backend.resolve(q.device, backend),
    )  # fmt: skip


def kmeans(features: Tensor, num_clusters: int, iters: int = 10, *, backend: str | None = None) -> Tensor:
    """Lloyd's k-means per sample: deterministic start (points at evenly spaced indices), a fixed
    number of iterations, no host synchronisation.

    Args:
        features: (B, N, F) float.
        num_clusters: clusters, in [1, 1023].
        iters: Lloyd iterations (assign + update), >= 0.
    Returns labels (B, N) int64 in [0, num_clusters).
    """
    key = _signature("kmeans", features, num_clusters, iters)
    if _unchecked(key):
        _check_tensor("features", features, 3, _FLOATS)
        if not 1 <= num_clusters <= MAX_CLUSTERS:
            raise ValueError(f"num_clusters must lie in [1, {MAX_CLUSTERS}], got {num_clusters}")
        if iters < 0:
            raise ValueError(f"iters must be >= 0, got {iters}")
        _remember(key)
    return _run("kmeans", _kmeans_op, features, num_clusters, iters, _backend.resolve(features.device, backend))
