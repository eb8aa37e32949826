"""A per-step GPU cost model: FLOPs, bytes moved and kernel launches of every op of a denoising
step, counted on the meta device, turned into a roofline time for a named GPU.

Counting (:class:`StepCost`, a TorchDispatchMode, plus wrappers around the fused ops):

- every aten op that is not a view (or in NO_TRAFFIC) is one kernel launch that reads each tensor argument and
  writes its output once (no fusion: what eager PyTorch runs); its FLOPs come from
  torch.utils.flop_counter's formulas (matmuls, convolutions, attention), others count none;
- ``torch.nn.functional.scaled_dot_product_attention`` is one launch of a flash-style kernel:
  4 * B * H * Lq * Lk * D FLOPs, bytes of Q, K, V and the output (the N x N scores never reach
  memory);
- the ``cat_kernels.ops`` ops are one launch each, moving what their fused kernel must move
  (:data:`FUSED_BYTES`), not what the torch reference path running on the meta device moves;
  ``forecast_attention`` (CATConfig.fused_attention) reads each argument once and writes its
  output, with the attention FLOPs of its M queries against N + T keys.

Time: each op takes max(FLOPs / peak FLOP/s, bytes / bandwidth), the roofline bound of a kernel
that reaches the peak of what limits it; a step adds LAUNCH_GAP_S per launch (back-to-back
launches under CUDA graphs). Real kernels reach roughly 60-80% of these bounds, so the
prediction is a lower bound on the time and a guide to the speedup, which the first lent GPU
checks (``bench/gpu_check.sh`` runs the e2e suite's CUDA timings next to these rows).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode

# (peak dense bf16 FLOP/s, HBM bandwidth B/s) from the vendor's data sheets (SXM parts)
GPUS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12)}
LAUNCH_GAP_S = 2e-6  # between back-to-back kernels of a captured graph


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


def _tensors(*trees: object) -> list[Tensor]:
    return [t for t in tree_leaves(trees) if isinstance(t, Tensor)]


def _forecast_bytes(*caches: tuple[Tensor, Tensor, Tensor | None, Tensor], pos: Tensor) -> int:
    """forecast_tokens_ / forecast_kv_: the computed rows (as many as `rows` holds) read, their
    old base read and base and slope written; with an out, every row written there and the
    skipped rows' base and slope read for it (without one, a step that computes every row, the
    skipped rows are not touched). A pruned step under forecast_from="refresh" marks none of its
    rows computed (they are scattered into the forecast by scatter_kv_ / scatter_tokens_), so
    there the count is K/N of the cache too high: 2% at keep_ratio 0.02."""
    total = _nbytes(pos) + 2 * 4 * pos.numel()  # pos, and the fp32 weight and inv_dt: (B, N) each
    for base, slope, out, rows in caches:
        computed = rows.numel() / base.numel()
        total += _nbytes(rows) + int(computed * (2 * _nbytes(base) + _nbytes(slope)))
        if out is not None:
            total += _nbytes(out) + int((1 - computed) * (_nbytes(base) + _nbytes(slope)))
    return total


# bytes a fused cat_kernels op moves: (args, result) -> bytes (see each op's docstring)
FUSED_BYTES: dict[str, Callable[[tuple, object], int]] = {
    "gather_tokens": lambda a, out: 2 * _nbytes(out) + _nbytes(a[1]),  # K rows read and written
    "scatter_tokens_": lambda a, out: 2 * _nbytes(a[2]) + _nbytes(a[1]),
    "scatter_kv_": lambda a, out: 2 * (_nbytes(a[3]) + _nbytes(a[4])) + _nbytes(a[2]),
    "forecast_tokens_": lambda a, out: _forecast_bytes((a[0], a[1], a[2], a[4]), pos=a[3]),
    "forecast_kv_": lambda a, out: _forecast_bytes((a[0], a[2], a[4], a[7]), (a[1], a[3], a[5], a[8]), pos=a[6]),
}
# aten ops that launch nothing or move no data (views that is_view does not flag, allocations)
NO_TRAFFIC = {"_unsafe_view", "empty", "empty_like", "empty_strided", "detach", "lift_fresh", "alias"}
# the selection's small ops: every argument read and the result written once
SMALL_OPS = ("token_stats", "select_tokens", "kmeans")


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    bytes: float = 0.0
    launches: int = 0
    seconds: dict[str, float] = dataclasses.field(default_factory=dict)  # roofline time per GPU
    bytes_by_op: dict[str, float] = dataclasses.field(default_factory=dict)  # op name -> bytes

    def add(self, flops: float, nbytes: float, op: str = "") -> None:
        self.flops += flops
        self.bytes += nbytes
        self.launches += 1
        self.bytes_by_op[op] = self.bytes_by_op.get(op, 0.0) + nbytes
        for gpu, (peak, bandwidth) in GPUS.items():
            self.seconds[gpu] = self.seconds.get(gpu, 0.0) + max(flops / peak, nbytes / bandwidth) + LAUNCH_GAP_S

    def __iadd__(self, other: Cost) -> Cost:
        self.flops += other.flops
        self.bytes += other.bytes
        self.launches += other.launches
        for gpu, s in other.seconds.items():
            self.seconds[gpu] = self.seconds.get(gpu, 0.0) + s
        for op, b in other.bytes_by_op.items():
            self.bytes_by_op[op] = self.bytes_by_op.get(op, 0.0) + b
        return self


class StepCost(TorchDispatchMode):
    """Counts the ops run inside it into ``self.cost`` (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.cost = Cost()
        self.depth = 0  # > 0 inside a fused op: its inner aten ops are not counted
        self._flops = FlopCounterMode(display=False).flop_registry

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.depth or func.is_view or func._overloadpacket.__name__ in NO_TRAFFIC:
            return out
        nbytes = sum(_nbytes(t) for t in _tensors(args, kwargs, out))
        formula = self._flops.get(func._overloadpacket)
        flops = formula(*args, **kwargs, out_val=out) if formula is not None else 0
        self.cost.add(flops, nbytes, func._overloadpacket.__name__)
        return out

    def fused(self, name: str, fn: Callable, flops: Callable[[tuple, dict, object], float],
              nbytes: Callable[[tuple, dict, object], float]) -> Callable:
        """fn run as one kernel launch whose FLOPs and bytes are given by (args, kwargs, result) -> count;
        the aten ops (and fused ops) it runs inside are not counted."""

        def run(*args: object, **kwargs: object) -> object:
            self.depth += 1
            try:
                out = fn(*args, **kwargs)
            finally:
                self.depth -= 1
            if not self.depth:
                self.cost.add(flops(args, kwargs, out), nbytes(args, kwargs, out), name)
            return out

        return run


@contextlib.contextmanager
def counting() -> Iterator[StepCost]:
    """Counts everything run inside: ``with counting() as c: step(); c.cost``."""
    import cat_kernels.ops as ops

    mode = StepCost()
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def qkv(a: tuple, kw: dict) -> tuple[Tensor, Tensor, Tensor]:
        return (*a[:3], *(kw[n] for n in ("query", "key", "value")[len(a[:3]):]))

    def attention_flops(a: tuple, kw: dict, out: Tensor) -> float:  # QK^T and PV of every (batch, head)
        query, key, _ = qkv(a, kw)
        return 4 * query.shape[-2] * key.shape[-2] * query.shape[-1] * math.prod(query.shape[:-2])

    def attention_bytes(a: tuple, kw: dict, out: Tensor) -> float:  # Q, K, V read, the output written
        return sum(_nbytes(t) for t in (*qkv(a, kw), out))

    def small_bytes(a: tuple, kw: dict, out: object) -> float:
        return sum(_nbytes(t) for t in _tensors(a, kw, out))

    def fused_bytes(name: str) -> Callable[[tuple, dict, object], float]:
        return lambda a, kw, out: FUSED_BYTES[name](a, out)

    def forecast_attention_flops(a: tuple, kw: dict, out: Tensor) -> float:  # M queries, N + T keys
        q, k_base, k_extra = a[0], a[1], a[6] if len(a) > 6 else kw.get("k_extra")
        keys = k_base.shape[-2] + (0 if k_extra is None else k_extra.shape[-2])
        return 4 * q.shape[-2] * keys * q.shape[-1] * math.prod(q.shape[:-2])

    originals = {name: getattr(ops, name) for name in (*FUSED_BYTES, *SMALL_OPS, "forecast_attention")}
    try:
        attention = mode.fused("attention", sdpa, attention_flops, attention_bytes)
        torch.nn.functional.scaled_dot_product_attention = attention
        for name, op in originals.items():
            nbytes = fused_bytes(name) if name in FUSED_BYTES else small_bytes
            flops = forecast_attention_flops if name == "forecast_attention" else (lambda a, kw, out: 0)
            setattr(ops, name, mode.fused(name, op, flops, nbytes))
        with mode:
            yield mode
    finally:
        torch.nn.functional.scaled_dot_product_attention = sdpa
        for name, op in originals.items():
            setattr(ops, name, op)
