"""Kernel microbenchmarks: every cat_kernels op, every provider that runs on the device.

Providers (each checked against cat_kernels.reference before it is timed):
- ``torch-ref``: cat_kernels.reference, the oracle and fallback;
- ``torch-baseline``: the plain torch idiom a user would write (advanced indexing for gather,
  ``index_put_`` for scatter, and for selection a bare ``topk`` of d: a lower bound that does
  not implement the policy, so it is not compared, its check column reads n/a); for
  forecast_attention the unfused path it replaces: ``ops.forecast_kv_`` (backend auto) into
  persistent out buffers, ``torch.cat`` with the text rows, then SDPA;
- ``triton``: cat_kernels.triton (CUDA; on CPU only when TRITON_INTERPRET=1 is set in the
  environment, which is slow, so by default it is skipped on CPU);
- ``ext``: the compiled extension cat_kernels.extension, when it imports (CPU and CUDA);
- ``ops-auto``: the public op ``cat_kernels.ops.<op>(..., backend="auto")`` as cat_pruning calls
  it: the backend ``auto`` picks plus argument checks and the torch.library dispatch (its
  ``note`` names the backend). The gap to that backend's own row is the per-call overhead.

Shapes (B=2, keep ratio 0.3, so K = ceil(0.3 N); token_stats on the model's 64 output channels
with 20 clusters; k-means on 64 channels + 2 position features):
- sd3-1024: N=4096, hidden 1536, H=24, D=64 (SD3-medium, 1024x1024);
- flux-1024: N=4096, hidden 3072, H=24, D=128;
- flux-2048: N=16384, hidden 3072, H=24, D=128;
- plus a ``token_stats+select_tokens`` row at N=16384 (the design target: < 50 us on an H100).
forecast_attention runs at a pruned step's shape: M = ceil(0.05 N) + T queries (the computed
image tokens and the text) over N image + T text keys, T = 333 on sd3 (SD3-medium's text tokens)
and 512 on flux, bf16 caches with fp32 slopes (slope_dtype="float32") and with bf16 slopes
(slope_dtype="cache"), and in the full run with none (the paper's reuse).
``--quick`` (the default on CPU) keeps sd3-1024 and the fused row, with fewer repeats.
``--shapes a,b`` picks shapes by name (sd3-1024, flux-1024, flux-2048, n16384 for the fused row,
and ``tiny``, N=400, T=24, for smoke runs such as ``TRITON_INTERPRET=1 ... --device cpu --shapes tiny``).

Bytes for GB/s count what the op must read and write at least once: gather/scatter move the
K selected rows twice (read + write) plus the indices; token_stats reads out and anchor and the
labels and writes d; select_tokens reads d, labels, staleness and writes staleness and idx;
forecast_kv_ / forecast_tokens_ read base + slope of all N rows, the K new rows, pos, weight and
inv_dt, and write out for all N rows and base + slope for the K computed rows (per cache; the
forecast rows run at B = 1 on the Flux shapes, which have no CFG pair).
forecast_attention counts the minimum: q read and the output written once, base (and slope)
of K and V read once, the text rows and the weights read once (what the fused kernel needs; the
unfused baseline moves about 14 bytes per cached bf16 element with fp32 slopes against 6 here),
and TFLOP/s from the two products, 4*B*H*M*(N+T)*D.
(Unfused with bf16 slopes: about 12 bytes against 4.)
k-means reports TFLOP/s from 3*B*N*nc*F per assignment (iters + 1 of them), no GB/s.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cat_kernels import backend as cat_backend
from cat_kernels import ops
from cat_kernels import reference as ref

try:
    from . import common
except ImportError:  # run as a plain module from bench/ on sys.path
    import common  # type: ignore[no-redef]

OPS = (
    "token_stats",
    "select_tokens",
    "gather_tokens",
    "scatter_tokens_",
    "scatter_kv_",
    "forecast_kv_",
    "forecast_tokens_",
    "forecast_attention",
    "kmeans",
)
PROVIDERS = ("torch-ref", "torch-baseline", "triton", "ext", "ops-auto")
NUM_CLUSTERS = 20
OUT_CHANNELS = 64
KEEP_RATIO = 0.3
KMEANS_ITERS = 10
ATTENTION_KEEP = 0.05  # image queries of forecast_attention's pruned step (CAT-F keeps 2-30%)


@dataclass(frozen=True)
class Model:
    name: str
    B: int
    N: int
    C: int  # hidden size
    H: int
    D: int
    C_out: int = OUT_CHANNELS
    B_forecast: int = 0  # batch of the forecast rows; 0: B
    T: int = 0  # text tokens (the extra keys of forecast_attention)

    @property
    def K(self) -> int:
        return math.ceil(KEEP_RATIO * self.N)


SHAPES = {
    "sd3-1024": Model("sd3-1024", B=2, N=4096, C=1536, H=24, D=64, T=333),
    # Flux is guidance-distilled (no CFG pair): its forecast rows use one prompt, B = 1.
    "flux-1024": Model("flux-1024", B=2, N=4096, C=3072, H=24, D=128, B_forecast=1, T=512),
    "flux-2048": Model("flux-2048", B=2, N=16384, C=3072, H=24, D=128, B_forecast=1, T=512),
}
QUICK_SHAPES = ("sd3-1024",)
# Shapes for the fused token_stats+select_tokens row (only N, B, C_out matter).
FUSED_SHAPES = {"n16384": Model("n16384", B=2, N=16384, C=3072, H=24, D=128)}
# Not run by default: smoke tests of providers (the Triton interpreter on CPU), via --shapes tiny.
TINY = Model("tiny", B=2, N=400, C=96, H=2, D=16, T=24)


# --------------------------------------------------------------------------- providers


def _load(name: str) -> tuple[Any | None, str]:
    try:
        return importlib.import_module(name), ""
    except Exception as exc:  # noqa: BLE001 - any failure means "not available"
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def providers(device: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The provider modules that run on `device`, and the reasons the others are skipped."""
    mods: dict[str, Any] = {"torch-ref": ref, "torch-baseline": BASELINES}
    skipped: dict[str, str] = {}
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    if device == "cuda" or interpret:
        mod, why = _load("cat_kernels.triton")
        if mod is None:
            skipped["triton"] = f"cat_kernels.triton does not import ({why})"
        else:
            mods["triton"] = mod
    else:
        skipped["triton"] = "not run on cpu (set TRITON_INTERPRET=1 to run the interpreter; slow: use --filter)"
    mod, why = _load("cat_kernels.extension")
    if mod is None:
        skipped["ext"] = f"cat_kernels.extension does not import ({why})"
    else:
        mods["ext"] = mod
    mods["ops-auto"] = _OpsAuto()
    return mods, skipped


def _batch_rows(idx: torch.Tensor) -> torch.Tensor:
    return torch.arange(idx.shape[0], device=idx.device)[:, None]


def _gather_baseline(x: torch.Tensor, idx: torch.Tensor, dim: int) -> torch.Tensor:
    """Advanced indexing, what one writes without a kernel."""
    if dim == 1:
        return x[_batch_rows(idx), idx]
    heads = torch.arange(x.shape[1], device=x.device)[None, :, None]
    return x[_batch_rows(idx)[:, :, None], heads, idx[:, None, :]]


def _scatter_baseline(dst: torch.Tensor, idx: torch.Tensor, src: torch.Tensor, dim: int) -> torch.Tensor:
    """index_put_ with advanced indices."""
    if dim == 1:
        dst.index_put_((_batch_rows(idx), idx), src.to(dst.dtype))
    else:
        heads = torch.arange(dst.shape[1], device=dst.device)[None, :, None]
        dst.index_put_((_batch_rows(idx)[:, :, None], heads, idx[:, None, :]), src.to(dst.dtype))
    return dst


def _scatter_kv_baseline(k_cache, v_cache, idx, k, v, dim):
    _scatter_baseline(k_cache, idx, k, dim)
    _scatter_baseline(v_cache, idx, v, dim)


def _select_lower_bound(d, cluster_score, labels, staleness, k, first, importance_fraction=0.25, staleness_decay=0.5):
    """Not the policy: a bare top-k of d plus the staleness update, the floor any selection pays."""
    idx = torch.topk(d, k, dim=1, sorted=False).indices.sort(dim=1).values
    staleness.mul_(staleness_decay)
    staleness.scatter_add_(1, idx, torch.ones_like(idx, dtype=staleness.dtype))
    return idx


_UNFUSED_BUFFERS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _unfused_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra=None, v_extra=None, scale=None):
    """What forecast_attention replaces: ops.forecast_kv_ (backend auto) forms every skipped row
    into out buffers (persistent, as the forecast store keeps them; no token computed here),
    torch.cat appends the text rows, SDPA attends. Without slopes (the paper's reuse) the bases
    are read as they are: cat + SDPA."""
    k, v = k_base, v_base
    if k_slope is not None:
        key = (tuple(k_base.shape), k_base.dtype, v_base.dtype, k_base.device)
        if key not in _UNFUSED_BUFFERS:
            B, H, N, D = k_base.shape
            pos = torch.full((B, N), -1, dtype=torch.int64, device=q.device)
            rows = torch.empty((B, H, 1, D), dtype=k_base.dtype, device=q.device)  # never read: pos = -1
            outs = (torch.empty_like(k_base), torch.empty_like(v_base))
            _UNFUSED_BUFFERS[key] = (*outs, pos, rows, torch.ones_like(weight))
        k, v, pos, rows, inv_dt = _UNFUSED_BUFFERS[key]
        ops.forecast_kv_(k_base, v_base, k_slope, v_slope, k, v, pos, rows, rows, weight, inv_dt, 2, backend="auto")
    if k_extra is not None:
        k, v = torch.cat([k, k_extra], 2), torch.cat([v, v_extra], 2)
    return torch.nn.functional.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale)


class _Baselines:
    gather_tokens = staticmethod(_gather_baseline)
    scatter_tokens_ = staticmethod(_scatter_baseline)
    scatter_kv_ = staticmethod(_scatter_kv_baseline)
    select_tokens = staticmethod(_select_lower_bound)
    forecast_attention = staticmethod(_unfused_attention)


BASELINES = _Baselines()


class _OpsAuto:
    """cat_kernels.ops with backend="auto", adapted to the reference's positional signatures."""

    @staticmethod
    def token_stats(out, anchor, labels, num_clusters):
        return ops.token_stats(out, anchor, labels, num_clusters, backend="auto")

    @staticmethod
    def select_tokens(d, cluster_score, labels, staleness, k, first, importance_fraction=0.25, staleness_decay=0.5):
        return ops.select_tokens(d, cluster_score, labels, staleness, k, first=first,
                                 importance_fraction=importance_fraction, staleness_decay=staleness_decay,
                                 backend="auto")  # fmt: skip

    @staticmethod
    def gather_tokens(x, idx, dim):
        return ops.gather_tokens(x, idx, dim, backend="auto")

    @staticmethod
    def scatter_tokens_(dst, idx, src, dim):
        return ops.scatter_tokens_(dst, idx, src, dim, backend="auto")

    @staticmethod
    def scatter_kv_(k_cache, v_cache, idx, k, v, dim):
        return ops.scatter_kv_(k_cache, v_cache, idx, k, v, dim, backend="auto")

    @staticmethod
    def forecast_kv_(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim):
        return ops.forecast_kv_(k_base, v_base, k_slope, v_slope, k_out, v_out, pos, k, v, weight, inv_dt, dim,
                                backend="auto")  # fmt: skip

    @staticmethod
    def forecast_tokens_(base, slope, out, pos, rows, weight, inv_dt, dim):
        return ops.forecast_tokens_(base, slope, out, pos, rows, weight, inv_dt, dim, backend="auto")

    @staticmethod
    def forecast_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra=None, v_extra=None, scale=None):
        return ops.forecast_attention(q, k_base, v_base, k_slope, v_slope, weight, k_extra, v_extra, scale=scale,
                                      backend="auto")  # fmt: skip

    @staticmethod
    def kmeans(features, num_clusters, iters):
        return ops.kmeans(features, num_clusters, iters, backend="auto")


def auto_backend(device: str) -> str:
    """What backend="auto" resolves to for tensors on `device` (warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cat_backend.resolve(torch.device(device), "auto")


# --------------------------------------------------------------------------- inputs


def _gen(device: str, seed: int) -> torch.Generator:
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _randn(shape, dtype, device, g) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device, dtype=torch.float32).to(dtype)


def _indices(B: int, N: int, K: int, device: str, g: torch.Generator) -> torch.Tensor:
    """K unique sorted indices per sample (what select_tokens returns)."""
    return torch.rand(B, N, generator=g, device=device).argsort(dim=1)[:, :K].sort(dim=1).values


def _positions(idx: torch.Tensor, N: int) -> torch.Tensor:
    """pos (B, N) int64 for the forecast ops: token idx[b, j] -> j, the others -1."""
    B, K = idx.shape
    pos = torch.full((B, N), -1, dtype=torch.int64, device=idx.device)
    return pos.scatter_(1, idx, torch.arange(K, device=idx.device).expand(B, K).contiguous())


def _forecast_inputs(B: int, N: int, K: int, device: str, g: torch.Generator) -> dict[str, Any]:
    """pos from K sorted random tokens, weights in (0, 3] (steps since the last computation,
    damped) and 1 / dt in [0.25, 1.25)."""
    return {
        "pos": _positions(_indices(B, N, K, device, g), N),
        "weight": torch.rand(B, N, generator=g, device=device) * 3 + 1e-3,
        "inv_dt": torch.rand(B, N, generator=g, device=device) + 0.25,
    }


def _grid_labels(B: int, N: int, device: str) -> torch.Tensor:
    """Compact spatial clusters on the token grid (4 x 5 blocks = 20), like the k-means gives."""
    side = math.isqrt(N)
    i = torch.arange(N, device=device)
    row, col = (i // side).clamp_max(side - 1), i % side
    labels = (row * 4 // side) * 5 + (col * 5 // side)
    return labels.clamp_max(NUM_CLUSTERS - 1).expand(B, N).contiguous()


def _stats_inputs(m: Model, dtype, device, seed) -> dict[str, Any]:
    g = _gen(device, seed)
    anchor = _randn((m.B, m.N, m.C_out), dtype, device, g)
    out = (anchor.float() + 0.1 * _randn((m.B, m.N, m.C_out), torch.float32, device, g)).to(dtype)
    return {"out": out, "anchor": anchor, "labels": _grid_labels(m.B, m.N, device), "num_clusters": NUM_CLUSTERS}


def _select_inputs(m: Model, device, seed, first: bool) -> dict[str, Any]:
    st = _stats_inputs(m, torch.float32, device, seed)
    d, score = ref.token_stats(st["out"], st["anchor"], st["labels"], NUM_CLUSTERS)
    g = _gen(device, seed + 1)
    # Staleness after a few pruned steps: sums of powers of 1/2, many distinct values.
    staleness = torch.rand(m.B, m.N, generator=g, device=device) * 2
    return {"d": d, "cluster_score": score, "labels": st["labels"], "staleness": staleness, "k": m.K, "first": first}


# --------------------------------------------------------------------------- checks
# Discrete outputs computed from float reductions can differ from the reference where two
# candidates are within an ulp (a point halfway between centroids, two tokens with nearly equal
# d at a top-k cut). These checks accept exactly that and nothing more.

KMEANS_MIN_AGREEMENT = 0.99


def _compare_kmeans(inputs: dict[str, Any], labels: object) -> str | None:
    """Labels in range, and equal to the reference's on >= 99% of tokens (ulp-level distance
    differences flip boundary points, and a flip moves the next centroids a little)."""
    expected = ref.kmeans(inputs["features"], NUM_CLUSTERS, KMEANS_ITERS)
    if not isinstance(labels, torch.Tensor) or labels.shape != expected.shape or labels.dtype != expected.dtype:
        got = (tuple(labels.shape), labels.dtype) if isinstance(labels, torch.Tensor) else type(labels).__name__
        return f"returned {got}, expected {(tuple(expected.shape), expected.dtype)}"
    labels = labels.cpu()
    expected = expected.cpu()
    if int(labels.min()) < 0 or int(labels.max()) >= NUM_CLUSTERS:
        return f"labels outside [0, {NUM_CLUSTERS})"
    agree = float((labels == expected).float().mean())
    if agree < KMEANS_MIN_AGREEMENT:
        return f"labels agree with the reference on {agree:.2%} of tokens (< {KMEANS_MIN_AGREEMENT:.0%})"
    return None


def _compare_fused(inputs: dict[str, Any], actual: object, k: int) -> str | None:
    """d and scores within tolerance of the reference's; idx and staleness exactly what the
    reference selection gives from the provider's own d and scores."""
    idx, staleness, d, score = actual
    d_ref, score_ref = ref.token_stats(inputs["out"], inputs["anchor"], inputs["labels"], NUM_CLUSTERS)
    reason = common.compare((d_ref, score_ref), (d, score))
    if reason:
        return "token_stats " + reason
    s = inputs["staleness"]
    idx_ref = ref.select_tokens(d, score, inputs["labels"], s, k, False)
    return common.compare((idx_ref, s), (idx, staleness), exact=True)


# --------------------------------------------------------------------------- cases


def _note(provider: str, op: str, device: str) -> str:
    if provider == "torch-baseline" and op == "select_tokens":
        return "lower bound: plain topk, not the policy"
    if provider == "torch-baseline" and op == "forecast_attention":
        return "unfused: forecast_kv_ (auto) + cat + SDPA"
    if provider == "ops-auto":
        chosen = auto_backend(device)
        return f"auto -> {chosen}" + (" (the compiled extension)" if chosen == "cuda" else "")
    return ""


def _cases_for(m: Model, device: str, mods: dict[str, Any], seed: int, quick: bool) -> Iterator[common.Case]:
    bf16, f32 = torch.bfloat16, torch.float32
    B, N, C, H, D, K, Co = m.B, m.N, m.C, m.H, m.D, m.K, m.C_out
    es = 2  # bf16 element size
    ids = 8  # int64 indices and labels

    def case(op, variant, shape, dtype, make, call, **kw):
        case_id = f"{op}[{variant},{m.name},{str(dtype).replace('torch.', '')}]"
        for name, mod in mods.items():
            fn = getattr(mod, op, None)
            if fn is None:
                continue
            yield common.Case(
                op=op,
                provider=name,
                case_id=case_id,
                shape=shape,
                dtype=str(dtype).replace("torch.", ""),
                make=make,
                call=(lambda inp, fn=fn: call(fn, inp)),
                reference=(lambda inp: call(getattr(ref, op), inp)),
                check=not (name == "torch-baseline" and op == "select_tokens"),
                note=_note(name, op, device),
                **kw,
            )

    # token_stats: (B, N, C_out) model outputs, model dtype and fp32.
    for dtype in (bf16,) if quick else (bf16, f32):
        esz = torch.empty((), dtype=dtype).element_size()
        yield from case(
            "token_stats",
            "out",
            {"B": B, "N": N, "C": Co, "clusters": NUM_CLUSTERS},
            dtype,
            lambda dtype=dtype: _stats_inputs(m, dtype, device, seed),
            lambda fn, i: fn(i["out"], i["anchor"], i["labels"], i["num_clusters"]),
            nbytes=2 * B * N * Co * esz + B * N * ids + B * N * 4 + B * NUM_CLUSTERS * 4,
        )

    # select_tokens, first and later selection: returns idx, updates staleness in place.
    for first in (True, False):
        yield from case(
            "select_tokens",
            "first" if first else "later",
            {"B": B, "N": N, "K": K, "clusters": NUM_CLUSTERS},
            f32,
            lambda first=first: _select_inputs(m, device, seed, first),
            lambda fn, i: (
                fn(i["d"], i["cluster_score"], i["labels"], i["staleness"], i["k"], i["first"]),
                i["staleness"],
            ),
            nbytes=B * N * (4 + ids + 4 + 4) + B * K * ids,
        )

    # gather_tokens on hidden states (B, N, C) and on K/V (B, H, N, D).
    def gather_make(shape, dim):
        def make():
            g = _gen(device, seed)
            return {"x": _randn(shape, bf16, device, g), "idx": _indices(B, N, K, device, g), "dim": dim}

        return make

    gather_call = lambda fn, i: fn(i["x"], i["idx"], i["dim"])
    yield from case(
        "gather_tokens",
        "bnc",
        {"B": B, "N": N, "C": C, "K": K},
        bf16,
        gather_make((B, N, C), 1),
        gather_call,
        exact=True,
        nbytes=2 * B * K * C * es + B * K * ids,
    )
    yield from case(
        "gather_tokens",
        "bhnd",
        {"B": B, "H": H, "N": N, "D": D, "K": K},
        bf16,
        gather_make((B, H, N, D), 2),
        gather_call,
        exact=True,
        nbytes=2 * B * H * K * D * es + B * K * ids,
    )

    # scatter_tokens_ into the noise cache (B, N, C_out) and a hidden-size cache (B, N, C).
    def scatter_make(c):
        def make():
            g = _gen(device, seed)
            return {
                "dst": _randn((B, N, c), bf16, device, g),
                "idx": _indices(B, N, K, device, g),
                "src": _randn((B, K, c), bf16, device, g),
            }

        return make

    scatter_call = lambda fn, i: (fn(i["dst"], i["idx"], i["src"], 1), i["dst"])[1]
    for variant, c in (("noise", Co), ("bnc", C)):
        yield from case(
            "scatter_tokens_",
            variant,
            {"B": B, "N": N, "C": c, "K": K},
            bf16,
            scatter_make(c),
            scatter_call,
            exact=True,
            nbytes=2 * B * K * c * es + B * K * ids,
        )

    # scatter_kv_: new K/V rows come from attention as (B, K, H, D) viewed as (B, H, K, D).
    def kv_make():
        g = _gen(device, seed)
        caches = [_randn((B, H, N, D), bf16, device, g) for _ in range(2)]
        new = [_randn((B, K, H, D), bf16, device, g).transpose(1, 2) for _ in range(2)]
        return {"kc": caches[0], "vc": caches[1], "idx": _indices(B, N, K, device, g), "k": new[0], "v": new[1]}

    yield from case(
        "scatter_kv_",
        "bhnd-src-view",
        {"B": B, "H": H, "N": N, "D": D, "K": K},
        bf16,
        kv_make,
        lambda fn, i: (fn(i["kc"], i["vc"], i["idx"], i["k"], i["v"], 2), i["kc"], i["vc"])[1:],
        exact=True,
        nbytes=4 * B * H * K * D * es + B * K * ids,
    )

    # forecast_kv_: a layer's K and V caches (base, slope, out; bf16) in one pass over N rows, the
    # new rows a (B, K, H, D) view as in scatter_kv_. Bytes: base + slope read for all N rows, the
    # new rows read, out written for all N rows, base + slope written for the K computed rows, and
    # pos, weight, inv_dt read (computed rows do not actually read their old slope: the count is
    # the op's nominal traffic, a little above what the kernels move).
    Bf = m.B_forecast or B
    fc_idx = Bf * N * (ids + 4 + 4)  # pos int64, weight and inv_dt fp32

    def fkv_make():
        g = _gen(device, seed)
        i = {name: _randn((Bf, H, N, D), bf16, device, g) for name in ("kb", "vb", "ks", "vs", "ko", "vo")}
        i["k"], i["v"] = (_randn((Bf, K, H, D), bf16, device, g).transpose(1, 2) for _ in range(2))
        return i | _forecast_inputs(Bf, N, K, device, g)

    yield from case(
        "forecast_kv_",
        "bhnd-src-view",
        {"B": Bf, "H": H, "N": N, "D": D, "K": K},
        bf16,
        fkv_make,
        lambda fn, i: (
            fn(i["kb"], i["vb"], i["ks"], i["vs"], i["ko"], i["vo"], i["pos"], i["k"], i["v"], i["weight"],
               i["inv_dt"], 2),
            i["kb"], i["vb"], i["ks"], i["vs"], i["ko"], i["vo"],
        )[1:],  # fmt: skip
        exact=True,
        nbytes=2 * Bf * H * D * (N * (es + es) + K * es + N * es + K * (es + es)) + fc_idx,
    )

    # forecast_tokens_ on the noise cache (B, N, C_out): bf16 base/out next to an fp32 slope.
    def fnoise_make():
        g = _gen(device, seed)
        i = {"base": _randn((Bf, N, Co), bf16, device, g), "out": _randn((Bf, N, Co), bf16, device, g)}
        i["slope"] = _randn((Bf, N, Co), f32, device, g)
        i["rows"] = _randn((Bf, K, Co), bf16, device, g)
        return i | _forecast_inputs(Bf, N, K, device, g)

    yield from case(
        "forecast_tokens_",
        "noise-slope-fp32",
        {"B": Bf, "N": N, "C": Co, "K": K},
        bf16,
        fnoise_make,
        lambda fn, i: (
            fn(i["base"], i["slope"], i["out"], i["pos"], i["rows"], i["weight"], i["inv_dt"], 1),
            i["base"], i["slope"], i["out"],
        )[1:],  # fmt: skip
        exact=True,
        nbytes=Bf * Co * (N * (es + 4) + K * es + N * es + K * (es + 4)) + fc_idx,
    )

    # forecast_attention: a pruned step's queries (the computed image tokens and the text, a
    # (B, M, H, D) view as attention makes them) over the forecast caches and the text keys.
    M = math.ceil(ATTENTION_KEEP * N) + m.T
    T = m.T

    def fattn_make(slope_dtype):
        def make():
            g = _gen(device, seed)
            i = {"q": _randn((Bf, M, H, D), bf16, device, g).transpose(1, 2)}
            i["k_base"], i["v_base"] = (_randn((Bf, H, N, D), bf16, device, g) for _ in range(2))
            # Slopes are per-step changes: small next to the values.
            i["k_slope"], i["v_slope"] = (
                (0.1 * _randn((Bf, H, N, D), f32, device, g)).to(slope_dtype) if slope_dtype else None
                for _ in range(2)
            )
            i["weight"] = torch.rand(Bf, N, generator=g, device=device) * 3 if slope_dtype else None
            i["k_extra"], i["v_extra"] = (_randn((Bf, T, H, D), bf16, device, g).transpose(1, 2) for _ in range(2))
            return i

        return make

    for variant, slope_dtype in (("slope-fp32", f32), ("slope-bf16", bf16), ("reuse", None)):
        if quick and variant == "reuse":
            continue
        sb = torch.empty((), dtype=slope_dtype).element_size() if slope_dtype else 0
        yield from case(
            "forecast_attention",
            variant,
            {"B": Bf, "H": H, "M": M, "N": N, "T": T, "D": D},
            bf16,
            fattn_make(slope_dtype),
            lambda fn, i: fn(i["q"], i["k_base"], i["v_base"], i["k_slope"], i["v_slope"], i["weight"],
                             i["k_extra"], i["v_extra"]),  # fmt: skip
            nbytes=2 * Bf * H * M * D * es + 2 * Bf * H * N * D * (es + sb) + 2 * Bf * H * T * D * es
            + (Bf * N * 4 if slope_dtype else 0),
            flops=4 * Bf * H * M * (N + T) * D,
        )

    # kmeans on (B, N, C_out + 2) features: content plus a row/col code.
    F = Co + 2

    def kmeans_make():
        g = _gen(device, seed)
        return {"features": _randn((B, N, F), f32, device, g)}

    yield from case(
        "kmeans",
        f"iters{KMEANS_ITERS}",
        {"B": B, "N": N, "F": F, "clusters": NUM_CLUSTERS},
        f32,
        kmeans_make,
        lambda fn, i: fn(i["features"], NUM_CLUSTERS, KMEANS_ITERS),
        flops=3 * B * N * NUM_CLUSTERS * F * (KMEANS_ITERS + 1),
        compare=_compare_kmeans,
    )


def _fused_cases(m: Model, device: str, mods: dict[str, Any], seed: int) -> Iterator[common.Case]:
    """token_stats then the later select_tokens, as one step of the policy runs them."""
    B, N, K, Co = m.B, m.N, m.K, m.C_out

    def make():
        i = _stats_inputs(m, torch.bfloat16, device, seed)
        i["staleness"] = torch.rand(B, N, generator=_gen(device, seed + 1), device=device) * 2
        return i

    def call(mod, i):
        d, score = mod.token_stats(i["out"], i["anchor"], i["labels"], NUM_CLUSTERS)
        return mod.select_tokens(d, score, i["labels"], i["staleness"], K, False), i["staleness"], d, score

    for name, mod in mods.items():
        if name == "torch-baseline":
            continue
        if not all(hasattr(mod, op) for op in ("token_stats", "select_tokens")):
            continue
        yield common.Case(
            op="token_stats+select_tokens",
            provider=name,
            case_id=f"token_stats+select_tokens[later,{m.name},bfloat16]",
            shape={"B": B, "N": N, "C": Co, "K": K, "clusters": NUM_CLUSTERS},
            dtype="bfloat16",
            make=make,
            call=(lambda i, mod=mod: call(mod, i)),
            reference=(lambda i: call(ref, i)),
            nbytes=2 * B * N * Co * 2 + B * N * (8 + 4 + 4) + B * K * 8,
            compare=lambda i, a: _compare_fused(i, a, K),
            note="design target: < 0.050 ms on an H100"
            + (f"; {_note(name, '', device)}" if name == "ops-auto" else ""),
        )


def build_cases(
    device: str, quick: bool, seed: int = 0, shapes: str | None = None
) -> tuple[list[common.Case], dict[str, str]]:
    """All cases for `device`; `shapes` is a comma-separated list of shape names (default: the
    quick or the full set, plus the fused row)."""
    mods, skipped = providers(device)
    if shapes:
        names = [s.strip() for s in shapes.split(",") if s.strip()]
        known = {*SHAPES, *FUSED_SHAPES, "tiny"}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"kernels: unknown shape(s) {unknown}; known: {sorted(known)}")
    else:
        names = [*(QUICK_SHAPES if quick else SHAPES), *FUSED_SHAPES]
    cases: list[common.Case] = []
    for name in names:
        if name == "tiny":
            cases.extend(_cases_for(TINY, device, mods, seed, quick))
            cases.extend(_fused_cases(TINY, device, mods, seed))
        elif name in SHAPES:
            cases.extend(_cases_for(SHAPES[name], device, mods, seed, quick))
        else:
            cases.extend(_fused_cases(FUSED_SHAPES[name], device, mods, seed))
    for name, mod in mods.items():
        missing = [op for op in OPS if name != "torch-baseline" and not hasattr(mod, op)]
        if missing:
            skipped[f"{name}:{','.join(missing)}"] = "not implemented by this provider"
    return cases, skipped


def select(cases: list[common.Case], filt: str | None, provider: str | None) -> list[common.Case]:
    """Cases whose id contains `filt` (case-insensitive) and whose provider is in `provider`
    (a comma-separated list)."""
    if filt:
        cases = [c for c in cases if filt.lower() in c.case_id.lower()]
    if provider:
        wanted = {p.strip() for p in provider.split(",")}
        cases = [c for c in cases if c.provider in wanted]
    return cases


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The suite entry point used by bench/run.py: one record per (case, provider)."""
    device = args.device
    quick = args.quick
    shapes = getattr(args, "shapes", None)
    cases, skipped = build_cases(device, quick, getattr(args, "seed", 0), shapes)
    cases = select(cases, args.filter, getattr(args, "provider", None))
    for what, why in skipped.items():
        print(f"kernels: skipping {what}: {why}", file=sys.stderr)
    if not cases:
        print(f"kernels: no case matches --filter {args.filter!r}", file=sys.stderr)
    if device == "cuda":
        common.peak_bandwidth_gbps(device)  # once, before the cases, so it is not in a bar step
    records = []
    try:
        for c in common.progress(cases, total=len(cases), desc=f"kernels/{device}"):
            rec = common.run_case(c, device, quick, getattr(args, "cudagraph", False))
            argv = ["--suite", "kernels", "--device", device, "--filter", c.case_id, "--provider", c.provider]
            if quick != (device == "cpu"):
                argv.append("--quick" if quick else "--full")
            if shapes:
                argv += ["--shapes", shapes]
            if device == "cpu" and getattr(args, "threads", None) not in (None, 1):
                argv += ["--threads", str(args.threads)]
            rec["cmd"] = common.command_line(argv)
            records.append(rec)
    except KeyboardInterrupt as exc:  # Ctrl-C or timeout's SIGTERM: run.py keeps what finished
        exc.partial_records = records
        raise
    python_overhead(records, device)
    return records


def python_overhead(records: list[dict[str, Any]], device: str) -> None:
    """ops-auto's time minus that of the backend it dispatches to, case by case: what the public
    op adds to each call (argument checks, value checks on CPU tensors, the custom-op dispatch),
    as ``overhead_us`` and in the note (issue 21 item 3). Clearest on the tiny shape
    (``--shapes tiny``), where the kernels themselves take little; compiled code runs none of it
    (the checks run while tracing)."""
    direct = {"cuda": "ext", "triton": "triton", "torch": "torch-ref"}[auto_backend(device)]
    timed = {(r["case"], r["provider"]): r for r in records if r.get("median_ms") is not None}
    for r in records:
        other = timed.get((r["case"], direct))
        if r["provider"] == "ops-auto" and r.get("median_ms") is not None and other is not None:
            r["overhead_us"] = 1e3 * (r["median_ms"] - other["median_ms"])
            r["note"] = "; ".join(n for n in (r.get("note"), f"overhead {r['overhead_us']:.0f} us a call") if n)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit("run this suite through: python bench/run.py --suite kernels")
