"""The cached image-token rows of a generation, and how a step reads the rows it does not compute.

Every per-token tensor that a pruned step may skip lives here: each attention layer's image K
and V, a family's extra caches (Sana's depthwise-convolution inputs) and the per-token model
output (the noise cache). The processors and hooks only hand over the rows they computed and get
back all N rows to use::

    key, value = store.kv(name, key, value)     # attention: the K/V to attend over
    x = store.rows(name, x)                     # an extra cache
    out = store.output(out)                     # the step's (B, N, C_out) output

so they do not know which of the two behaviours runs:

- :class:`ReuseStore` (``forecast="none"``, the paper): a skipped row is its value at the token's
  last computation.
- :class:`ForecastStore` (``forecast="taylor"``): a skipped row is read as a first-order Taylor
  forecast ``base + w * slope`` from the token's last two computations, where ``w`` is the time
  since its last computation in denoising steps, damped and capped. The forecast is written
  into a separate buffer that the step reads; the stored values are never overwritten by it.
  With ``forecast_from="refresh"`` (the default) the rows a pruned step computes are read by
  that step and dropped, so every forecast starts from the last full or refresh step; with
  "rebase" they become their tokens' values and keep the refresh steps' slope (at second order
  the span grows by twice the time since the slope's end, so the forecast follows the same
  quadratic); with "all" they update value and slope. With ``forecast_order=2`` the model
  output is forecast through its last three computations.

Per cache the forecast keeps ``base`` (the value at the last computation), ``slope`` (change per
unit time between the last two computations) and ``out`` (what the step reads); per token the
time of its last computation. One op per cache and step updates the computed rows and forecasts
the others in one pass (:func:`cat_kernels.ops.forecast_kv_`).

The second-order output forecast is the same op twice, the first on the slopes: the Newton
extrapolation through the last three computations (times t2 < t1 < t0, slopes s0 over t2..t1 and
s1 over t1..t0) to t0 + h is

    base + w * (s1 + (h + span) * curv),   curv = (s1 - s0) / (t0 - t2),   span = t0 - t1,

so the slope cache (base s1, slope curv) is forecast first into a scratch buffer with weight
h + span, and the value cache then reads that forecast slope with weight w (damped h). A
computed row stores its new slope in both, so the second op refreshes what the first wrote.

Everything is written in place
into buffers allocated once per generation in eager code, so CUDA graphs can capture the steps,
and the times live in device tensors, so no Python value that changes per step is read by traced
code.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cat_kernels import ops

from .config import CATConfig


def _token_dim(shape: tuple[int, ...]) -> int:
    """(B, N, C) caches have their tokens along 1, (B, H, N, D) caches along 2."""
    return 1 if len(shape) == 3 else 2


def _as_heads(x: Tensor, heads: int) -> Tensor:
    """K/V rows as attention reads them: (B, H, L, D) as they are, (B, L, H * D) viewed so."""
    return x if x.dim() == 4 else x.unflatten(-1, (heads, -1)).transpose(1, 2)


def _extra_rows(pairs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor | None, Tensor | None]:
    """(key, value) pairs of rows (B, H, T, D) -> all of them along the rows, or (None, None)."""
    pairs = [p for p in pairs if p[0].shape[2]]
    if len(pairs) <= 1:
        return pairs[0] if pairs else (None, None)
    return torch.cat([p[0] for p in pairs], 2), torch.cat([p[1] for p in pairs], 2)


def _per_row(x: Tensor, dim: int) -> Tensor:
    """A (B, N) per-token value viewed to broadcast over a cache with its tokens along `dim`."""
    return x.view(x.shape[0], *([1] * (dim - 1)), x.shape[1], 1)


FLOAT8 = torch.float8_e4m3fn
FLOAT8_MAX = torch.finfo(FLOAT8).max  # 448
# kv_dtype -> the K/V caches it stores in fp8
FLOAT8_PARTS = {"model": "", "float8": "kv", "float8-values": "v"}


def _scatter_rows_(dst: Tensor, idx: Tensor, rows: Tensor, dim: int) -> None:
    """dst's rows of the tokens idx (B, K) along `dim` <- rows (dst's shape with K there)."""
    index = idx.view(*idx.shape[:1], *([1] * (dim - 1)), idx.shape[1], *([1] * (rows.dim() - dim - 1)))
    dst.scatter_(dim, index.expand(rows.shape), rows)


def _head_dim(name: str, shape: tuple[int, ...], head_dims: dict[str, int] | None, why: str) -> int:
    """Channels per head of the K/V cache `name`: a (B, H, N, D) cache's D, or what the adapter
    gave for a (B, N, H*D) one (fp8 rows are scaled per head)."""
    head_dim = shape[-1] if len(shape) == 4 else (head_dims or {}).get(name)
    if head_dim is None:
        raise ValueError(f"cat_pruning: {why} needs the head size of the (B, N, H*D) cache {name!r}, which this "
                         "family's cache layout does not give")
    return head_dim


def _store(cache: Tensor, rows8: Float8Rows | None, new: Tensor) -> None:
    """Every row of a cache <- new: as they are, or quantized where the cache is fp8 (rows8)."""
    if rows8 is None:
        cache.copy_(new)
    else:
        rows8.store_(new)


class Float8Rows:
    """A K/V cache in fp8 (e4m3), kv_dtype="float8": every head of every row is stored as
    ``data * scale`` with its own fp32 scale, its largest magnitude mapped to 448. Per head, not
    per row, so that a context-parallel rank (which holds some of the heads) quantizes its heads
    exactly as one process does."""

    def __init__(self, data: Tensor, scale: Tensor, head_dim: int, dtype: torch.dtype) -> None:
        self.data, self.scale, self.head_dim, self.dtype = data, scale, head_dim, dtype

    def _heads(self, x: Tensor) -> Tensor:
        return x.unflatten(-1, (-1, self.head_dim))

    def _quantize(self, x: Tensor) -> tuple[Tensor, Tensor]:
        heads = self._heads(x).float()
        scale = (heads.abs().amax(-1) / FLOAT8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
        return (heads / scale.unsqueeze(-1)).to(FLOAT8).flatten(-2), scale

    def store_(self, x: Tensor) -> None:
        """Every row <- x."""
        data, scale = self._quantize(x)
        self.data.copy_(data)
        self.scale.copy_(scale)

    def scatter_(self, idx: Tensor, rows: Tensor, dim: int) -> None:
        """The rows of the tokens idx (B, K) along `dim` <- rows."""
        data, scale = self._quantize(rows)
        # (scatter has no fp8 kernels: the bytes are moved as they are)
        _scatter_rows_(self.data.view(torch.uint8), idx, data.view(torch.uint8), dim)
        _scatter_rows_(self.scale, idx, scale, dim)

    def dequantize_(self, out: Tensor) -> Tensor:
        """out (the cache's shape, its model dtype) <- every row's value; returns out."""
        heads = self._heads(out)
        heads.copy_(self._heads(self.data))
        heads.mul_(self.scale.unsqueeze(-1))
        return out

    def dequantized(self) -> Tensor:
        return self.dequantize_(torch.empty(self.data.shape, dtype=self.dtype, device=self.data.device))

    def zero_(self) -> None:
        self.data.zero_()
        self.scale.zero_()


class ReuseStore:
    """Skipped rows reuse their value at the token's last computation (CAT Pruning as published)."""

    # the modes in which processors and hooks hand their rows to the store
    modes = ("fill", "refresh", "pruned")

    def __init__(self, config: CATConfig) -> None:
        self.config = config
        self._pool: dict[str, Tensor] = {}  # every buffer by name, kept for the next generation (_empty)
        self.reset()

    def reset(self) -> None:
        self.kv_cache: dict[str, tuple[Tensor, Tensor]] = {}
        self.float8: dict[str, Float8Rows] = {}  # kv_dtype="float8": K/V cache (name/k, name/v) -> its rows
        self.reads: dict[str, Tensor] = {}  # cache name -> the buffer a step reads (forecast + fresh rows)
        # cache name -> the buffer attention reads on a pruned step, its read rows with the rows
        # of other streams around them (ForecastStore.joint_kv); reads[name] is a slice of it
        self.wide: dict[str, Tensor] = {}
        self.extra: dict[str, Tensor] = {}
        self.noise: Tensor | None = None
        self.idx: Tensor | None = None
        self.mode = "dense"

    # ------------------------------------------------------------------ lifecycle (eager)

    def allocate(self, kv: dict, extra: dict, noise: tuple, device: torch.device,
                 head_dims: dict[str, int] | None = None, joint: dict[str, tuple[int, int]] | None = None) -> None:
        """Buffers for every cache: name -> (shape, dtype); noise = (shape, dtype); head_dims:
        channels per head of each (B, N, H*D) K/V cache (read with kv_dtype="float8"); joint:
        K/V cache -> the rows attention reads before and after its N image rows (joint_kv). A
        generation of the same shapes as the last gets the last one's buffers (same addresses,
        stale values)."""
        quantized = FLOAT8_PARTS[self.config.kv_dtype]  # "k" and/or "v": the caches stored in fp8
        self.kv_cache = {name: tuple(self._empty(f"{name}/{part}", shape, FLOAT8 if part in quantized else dtype,
                                                 device)
                                     for part in "kv")
                         for name, (shape, dtype) in kv.items()}  # fmt: skip
        for name, (shape, dtype) in kv.items() if quantized else ():
            head_dim = _head_dim(name, shape, head_dims, f"kv_dtype={self.config.kv_dtype!r}")
            for part, data in zip("kv", self.kv_cache[name], strict=True):
                if part in quantized:
                    self.float8[f"{name}/{part}"] = self._float8(f"{name}/{part}", data, head_dim, dtype)
                    self.reads[f"{name}/{part}"] = self._read(part, shape, dtype, device)
        self.extra = {name: self._empty(f"extra/{name}", *spec, device) for name, spec in extra.items()}
        self.noise = self._empty("noise", *noise, device)

    def _float8(self, name: str, data: Tensor, head_dim: int, dtype: torch.dtype) -> Float8Rows:
        """fp8 rows over `data` with their scales (zeros: a row read before it is stored is 0)."""
        scale = self._empty(f"scale/{name}", (*data.shape[:-1], data.shape[-1] // head_dim), torch.float32,
                            data.device)
        rows = Float8Rows(data, scale, head_dim, dtype)
        rows.zero_()
        return rows

    def _read(self, role: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """What a step reads is used only inside its own layer (the attention right after, the
        block's convolution), so the layers share one buffer per role, shape and dtype."""
        return self._empty(f"read/{role}/{tuple(shape)}/{dtype}", shape, dtype, device)

    def _empty(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        t = self._pool.get(name)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != torch.device(device):
            t = self._pool[name] = torch.empty(shape, dtype=dtype, device=device)
        return t

    def tensors(self) -> list[Tensor]:
        """Every buffer the store holds (for static-address marking and byte counts)."""
        reads = (self.wide.get(name, t) for name, t in self.reads.items())  # a slice's whole buffer
        return [*(t for pair in self.kv_cache.values() for t in pair), *(r.scale for r in self.float8.values()),
                *reads, *self.extra.values(), self.noise]

    def nbytes(self) -> int:
        unique = {id(t): t for t in self.tensors() if t is not None}  # shared buffers count once
        return sum(t.numel() * t.element_size() for t in unique.values())

    def advance(self) -> None:
        """The step closed (eager)."""

    # ------------------------------------------------------------------ steps (traced)

    def begin_step(self, mode: str, idx: Tensor | None, kept: int | None = None) -> None:
        """A forward starts in `mode`; `idx` (B, K') are the tokens a pruned step computes, its
        first `kept` columns the selection (the rest repeat selected tokens: context-parallel
        padding, cat_pruning.state); None: every column."""
        self.mode, self.idx = mode, idx
        self.kept = kept

    def kv(self, name: str, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """This layer's new image K/V rows (all N, or the K selected on a pruned step) -> the
        image K/V over all N tokens to attend over."""
        if self.float8:
            return self._kv_float8(name, key, value)
        k_cache, v_cache = self.kv_cache[name]
        if self.mode != "pruned":
            k_cache.copy_(key)
            v_cache.copy_(value)
            return key, value
        ops.scatter_kv_(k_cache, v_cache, self.idx, key, value, _token_dim(k_cache.shape), backend=self.config.backend)
        return k_cache, v_cache

    def _kv_float8(self, name: str, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """kv() with fp8 caches: the computed rows are stored quantized and attended exactly; a
        cache kept in the model's dtype (kv_dtype="float8-values": K) as without fp8."""
        read = []
        for part, new, cache in zip("kv", (key, value), self.kv_cache[name], strict=True):
            rows = self.float8.get(f"{name}/{part}")
            if rows is None:
                read.append(self._keep(cache, new))
            elif self.mode != "pruned":
                rows.store_(new)
                read.append(new)
            else:
                rows.scatter_(self.idx, new, _token_dim(key.shape))
                read.append(self._keep(rows.dequantize_(self.reads[f"{name}/{part}"]), new))
        return read[0], read[1]

    def joint_kv(self, name: str, key: Tensor, value: Tensor, before: tuple[Tensor, Tensor] | None = None,
                 after: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """kv() with the K and V rows of other streams around the image rows along the token
        dimension: [before; all N image rows; after] -> the keys and values attention reads
        (the text of joint attention, reference rows). Here by concatenation; the forecast store
        forecasts a pruned step's image rows straight into a buffer that has room for the others."""
        key, value = self.kv(name, key, value)
        dim = _token_dim(key.shape)
        rows = [r for r in (before, (key, value), after) if r is not None and r[0].shape[dim]]
        if len(rows) == 1:
            return key, value
        return torch.cat([r[0] for r in rows], dim), torch.cat([r[1] for r in rows], dim)

    def attend(self, name: str, query: Tensor, key: Tensor, value: Tensor, extra: list[tuple[Tensor, Tensor]],
               extra_mask: Tensor | None = None, joined: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
        """A pruned step's attention in one op (CATConfig.fused_attention): the queries
        (B, H, M, D) over every image token of this layer (this step's computed rows `key`,
        `value` in the cache's layout, the cache's rows for the others) and the `extra` (key,
        value) rows, each (B, H, T, D), of which extra_mask (B, sum of T) bool marks those to
        attend (None: all), by cat_kernels' forecast_attention -> (B, H, M, D). Here the
        computed rows refresh the cache, which is then attended as it is, so `joined` (see
        ForecastStore.attend) is not needed."""
        k_cache, v_cache = self.kv_cache[name]
        ops.scatter_kv_(k_cache, v_cache, self.idx, key, value, _token_dim(k_cache.shape), backend=self.config.backend)
        heads = query.shape[1]
        return ops.forecast_attention(query, _as_heads(k_cache, heads), _as_heads(v_cache, heads), None, None, None,
                                      *_extra_rows(extra), extra_mask=extra_mask,
                                      backend=self.config.backend)  # fmt: skip

    def _keep(self, cache: Tensor, x: Tensor) -> Tensor:
        """One cache in its own dtype: a step that computes every row stores x and reads it; a
        pruned step scatters its computed rows x into the cache and reads the cache."""
        if self.mode != "pruned":
            cache.copy_(x)
            return x
        ops.scatter_tokens_(cache, self.idx, x, _token_dim(cache.shape), backend=self.config.backend)
        return cache

    def rows(self, name: str, x: Tensor) -> Tensor:
        """The same for one extra cache."""
        return self._keep(self.extra[name], x)

    def output(self, out: Tensor) -> Tensor:
        """The step's per-token output rows -> the full (B, N, C_out) output (a fresh tensor)."""
        full = self._keep(self.noise, out)
        return full.clone() if self.mode == "pruned" else full

    def end_step(self) -> None:
        """After the output: the computed tokens' bookkeeping (traced)."""

    def skipped_kv(self, name: str) -> tuple[Tensor, Tensor]:
        """What the coming pruned step reads for this layer's skipped rows (eager, between steps;
        the tests' masked-dense oracle uses it)."""
        k, v = (self.float8[f"{name}/{part}"].dequantized() if f"{name}/{part}" in self.float8 else cache.clone()
                for part, cache in zip("kv", self.kv_cache[name], strict=True))
        return k, v

    def skipped_rows(self, name: str) -> Tensor:
        return self.extra[name].clone()

    def skipped_output(self) -> Tensor:
        return self.noise.clone()


def slope_dtype(config: CATConfig, base: Tensor) -> torch.dtype:
    """The dtype of a cache's slope kept as a plain tensor: fp32, or with slope_dtype="cache" the
    cache's own (their slopes are most of CAT-F's memory: bf16 slopes next to bf16 values make
    the forecast state 2x the paper's reuse caches instead of 3x); with "float8" the extra and
    output caches' as with "cache" (the K/V slopes are fp8 rows, slopes8). The output cache's
    curvature and forecast slope (forecast_order=2) take its slope's dtype."""
    return base.dtype if config.slope_dtype in ("cache", "float8") else torch.float32


# forecast_calibration="output": the fitted multiplier of the output forecast's step lies in this
# range (0: reuse; above 1: the step went further than the forecast; 8 held-out prompts put the
# fits of a refresh-every-4 schedule between 0.5 and 1.6)
CALIBRATION_RANGE = (0.0, 1.5)


class ForecastStore(ReuseStore):
    """Skipped rows are read as a damped first-order Taylor forecast from their last two computations."""

    modes = ("anchor", "fill", "refresh", "pruned")

    def reset(self) -> None:
        super().reset()
        self.slopes: dict[str, Tensor] = {}  # cache name (K/V as name/k, name/v) -> slope buffer
        # K/V cache -> its fp8 slopes (slope_dtype="float8", or "cache" next to fp8 values)
        self.slopes8: dict[str, Float8Rows] = {}
        self.last: Tensor | None = None  # (B, N) time of each token's last computation
        self.clock: Tensor | None = None  # () the time of the current step
        self.started: Tensor | None = None  # () 1 once a first value of every row is stored
        # forecast_order=2 (the output only): curvature, the forecast slope the output op reads,
        # and per token the time between its last two computations (0 until the slope is real)
        self.curv: Tensor | None = None
        self.slope_read: Tensor | None = None
        self.span: Tensor | None = None
        self.joint: dict[str, tuple[int, int]] = {}  # layer -> rows before and after its image rows in wide

    def allocate(self, kv: dict, extra: dict, noise: tuple, device: torch.device,
                 head_dims: dict[str, int] | None = None, joint: dict[str, tuple[int, int]] | None = None) -> None:
        super().allocate(kv, extra, noise, device, head_dims, joint)
        self.wide, self.joint = {}, {}
        for name, base in self._bases().items():
            # Zeros, not empty: with full_steps=2 the anchor step is step 0, which runs before any
            # cache exists, and the fill step then takes (new - base) * 0 as its slope: finite only
            # when base is.
            base.zero_()
            role = "extra" if name.startswith("extra/") else name.rsplit("/", 1)[-1]  # k, v, extra or noise
            layer = name.rsplit("/", 1)[0]
            rows8 = self.float8.get(name)
            if role in ("k", "v") and self._float8_slope(rows8 is not None):
                shape, dtype = kv[layer]
                head_dim = _head_dim(layer, shape, head_dims, 'slope_dtype="float8"')
                data = self._empty(f"slope/{name}", base.shape, FLOAT8, device)
                self.slopes8[name] = self._float8(f"slope/{name}", data, head_dim, dtype)
                # where a pruned step dequantizes the slope (shared by the layers, as the reads)
                self.reads[f"slope/{name}"] = self._read("slope", base.shape, dtype, device)
                if rows8 is None:  # a value in the model's dtype: forecast into the read buffer
                    self.reads[name] = self._read(role, base.shape, dtype, device)
                continue
            if rows8 is not None:  # fp8 K/V with fp32 slopes (their read buffers are the reuse store's)
                self.slopes[name] = self._empty(f"slope/{name}", base.shape, torch.float32, device).zero_()
                continue
            dtype = slope_dtype(self.config, base)
            self.slopes[name] = self._empty(f"slope/{name}", base.shape, dtype, device).zero_()
            # nothing to read into: the output's forecast is the step's result (a fresh tensor, _update);
            # with fused_attention a pruned step attends the K/V caches as they are (attend)
            if role == "noise" or (role in ("k", "v") and self.config.fused_attention):
                continue
            around = (joint or {}).get(layer, (0, 0)) if role in ("k", "v") and not self.float8 else (0, 0)
            if not any(around):
                self.reads[name] = self._read(role, base.shape, base.dtype, device)
                continue
            # room for the other streams' rows: the processor writes them beside the forecast (joint_kv)
            dim = _token_dim(base.shape)
            shape = list(base.shape)
            shape[dim] += sum(around)
            self.wide[name] = self._read(role, tuple(shape), base.dtype, device)
            self.reads[name] = self.wide[name].narrow(dim, around[0], base.shape[dim])
            self.joint[layer] = around
        batch, n = self.noise.shape[:2]
        self.last = self._empty("last", (batch, n), torch.float32, device).zero_()
        self.clock = self._empty("clock", (), torch.float32, device).zero_()
        self.started = self._empty("started", (), torch.float32, device).zero_()
        if self.config.forecast_order == 2:
            dtype = self.slopes["noise"].dtype
            self.curv = self._empty("curv", self.noise.shape, dtype, device).zero_()
            self.slope_read = self._empty("slope_read", self.noise.shape, dtype, device).zero_()
            self.span = self._empty("span", (batch, n), torch.float32, device).zero_()

    def _float8_slope(self, float8_value: bool) -> bool:
        """Whether a K/V cache keeps its slopes in fp8: slope_dtype="float8", or "cache" next to
        fp8 values."""
        return self.config.slope_dtype == "float8" or (self.config.slope_dtype == "cache" and float8_value)

    def _bases(self) -> dict[str, Tensor]:
        bases = {}
        for name, (k, v) in self.kv_cache.items():
            bases[f"{name}/k"], bases[f"{name}/v"] = k, v
        bases.update({f"extra/{name}": t for name, t in self.extra.items()})
        bases["noise"] = self.noise
        return bases

    def tensors(self) -> list[Tensor]:
        order2 = [self.curv, self.slope_read, self.span] if self.curv is not None else []
        return [*super().tensors(), *self.slopes.values(), *(r.data for r in self.slopes8.values()),
                *(r.scale for r in self.slopes8.values()), self.last, self.clock, self.started, *order2]

    def advance(self) -> None:
        if self.clock is not None:
            self.clock.add_(1.0)

    # ------------------------------------------------------------------ steps (traced)

    def begin_step(self, mode: str, idx: Tensor | None, kept: int | None = None) -> None:
        super().begin_step(mode, idx, kept)
        if self.clock is None:
            return
        batch, n = self.last.shape
        elapsed = self.clock - self.last  # (B, N), >= 1 for every row stored before
        # slope of a computed row: (new - base) / elapsed, or 0 before a first value exists
        self.inv_dt = self.started / elapsed.clamp_min(1e-6)
        self.weight_kv, self.weight_out = self._weights(elapsed)
        if self.curv is not None:
            # a new slope is real once started; its curvature needs the previous one real too
            self.inv_span = self.started * (self.span > 0) / (elapsed + self.span).clamp_min(1e-6)
            self.weight_slope = self._slope_weight(elapsed, self.span)
        if mode == "pruned" and self.config.fused_attention:  # attend(): computed tokens left out of the caches
            self.weight_attend = self.weight_kv.scatter(1, idx, -1.0)
        if self._rows_only_read:  # no row updates the forecast state
            self.pos = torch.full((batch, n), -1, dtype=torch.int64, device=idx.device)
        elif mode == "pruned":
            k = idx.shape[1]
            order = torch.arange(k, device=idx.device, dtype=torch.int64).expand(batch, k)
            self.pos = torch.full((batch, n), -1, dtype=torch.int64, device=idx.device).scatter(1, idx, order)
        else:  # every row is computed
            self.pos = torch.arange(n, device=self.last.device, dtype=torch.int64).expand(batch, n).contiguous()

    def _weights(self, elapsed: Tensor) -> tuple[Tensor, Tensor]:
        """(B, N) forecast weights of the K/V (and extra) rows and of the output rows."""
        cfg = self.config
        horizon = self._horizon(elapsed)
        return cfg.forecast_kv_damping * horizon, cfg.forecast_damping * horizon

    def _horizon(self, elapsed: Tensor) -> Tensor:
        cap = self.config.forecast_horizon
        return elapsed.clamp_max(cap) if cap else elapsed

    def _slope_weight(self, elapsed: Tensor, span: Tensor) -> Tensor:
        """(B, N) forecast_order=2: the weight of the curvature in the forecast slope, h + span."""
        return self._horizon(elapsed) + span

    @property
    def _rows_only_read(self) -> bool:
        """A pruned step under forecast_from="refresh" or "rebase": no computed row changes a slope.
        The step forecasts every row, then reads its computed rows in place of their forecasts;
        under "rebase" they also become their tokens' new base (value and time)."""
        return self.mode == "pruned" and self.config.forecast_from != "all"

    @property
    def _rebase(self) -> bool:
        return self.mode == "pruned" and self.config.forecast_from == "rebase"

    @property
    def keeps_pruned_rows(self) -> bool:
        """Whether the rows a pruned step computes become their tokens' stored values."""
        return self.config.forecast_from != "refresh"

    def _update(self, name: str, new: Tensor, weight: Tensor) -> Tensor:
        """One cache: the computed rows refresh their value and slope, the others are forecast."""
        base = self._bases()[name]
        if self.mode == "anchor":  # the first value of every row: nothing to forecast from yet
            base.copy_(new)
            return new
        out = None  # a step that computes every row reads them
        if self.mode == "pruned":  # the output's forecast is handed on as the step's result: not a shared buffer
            out = torch.empty_like(base) if name == "noise" else self.reads[name]
        dim = _token_dim(base.shape)
        slope = self.slopes[name]
        computed = new
        if name == "noise" and self.mode == "pruned":
            new = self._weighted(new)
        if name == "noise" and self.curv is not None:
            slope = self._forecast_slope(base, new)
        if name == "noise" and self.mode == "pruned" and self.config.forecast_calibration == "output":
            weight = weight * self._calibration(base, slope, computed, weight).unsqueeze(1)
        ops.forecast_tokens_(base, slope, out, self.pos, new, weight, self.inv_dt, dim, backend=self.config.backend)
        if self._rows_only_read:
            ops.scatter_tokens_(out, self.idx, new, dim, backend=self.config.backend)
        if self._rebase:
            ops.scatter_tokens_(base, self.idx, new, dim, backend=self.config.backend)
        return out if self.mode == "pruned" else new

    def _weighted(self, new: Tensor) -> Tensor:
        """A pruned step's computed output rows (B, K', C) -> forecast + w (computed - forecast),
        w = computed_weight + (1 - computed_weight) K / N (CATConfig.computed_weight); the
        rows themselves where w is 1."""
        weight, n = self.config.computed_weight, self.noise.shape[1]
        if weight == 1.0 or self.kept is None or self.kept >= n:
            return new
        w = weight + (1.0 - weight) * self.kept / n
        forecast = self.forecast_output(self.idx).float()
        return (forecast + w * (new.float() - forecast)).to(new.dtype)

    def _calibration(self, base: Tensor, slope: Tensor, new: Tensor, weight: Tensor) -> Tensor:
        """forecast_calibration="output": (B,) the multiplier of the output forecast's step that
        fits the computed rows `new` (B, K', C) best in least squares, clamped to CALIBRATION_RANGE;
        1 where the forecast does not move. Only the selection's rows count (not the padding's
        repeats), so the fit does not depend on the world size."""
        backend, kept = self.config.backend, self.kept
        idx, new = self.idx[:, :kept], new[:, :kept]
        b = ops.gather_tokens(base, idx, 1, backend=backend).float()
        step = ops.gather_tokens(slope, idx, 1, backend=backend).float() * weight.gather(1, idx).unsqueeze(-1)
        miss = new.to(base.dtype).float() - b  # the computed rows' move since their base, as the op rounds it
        num, den = (miss * step).sum((1, 2)), step.square().sum((1, 2))
        fit = torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), 1.0)
        return fit.clamp(*CALIBRATION_RANGE)

    def _forecast_slope(self, base: Tensor, new: Tensor) -> Tensor:
        """forecast_order=2: the output's slopes as a cache of their own (value s1, slope curv),
        forecast into slope_read; the computed rows' new slopes computed as the output op will."""
        backend = self.config.backend
        if self.mode == "pruned":
            old = ops.gather_tokens(base, self.idx, 1, backend=backend)
            inv_dt = self.inv_dt.gather(1, self.idx)
        else:
            old, inv_dt = base, self.inv_dt
        new_slope = (new.to(base.dtype).float() - old.float()) * inv_dt.unsqueeze(-1)
        ops.forecast_tokens_(self.slopes["noise"], self.curv, self.slope_read, self.pos, new_slope,
                             self.weight_slope, self.inv_span, 1, backend=backend)
        return self.slope_read

    def kv(self, name: str, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if self.float8 or self.slopes8:
            return self._kv_float8(name, key, value)
        kb, vb = self.kv_cache[name]
        if self.mode == "anchor":
            kb.copy_(key)
            vb.copy_(value)
            return key, value
        # a step that computes every row reads its new rows: no forecast written for it
        k_out, v_out = (self.reads[f"{name}/k"], self.reads[f"{name}/v"]) if self.mode == "pruned" else (None, None)
        dim = _token_dim(kb.shape)
        ops.forecast_kv_(kb, vb, self.slopes[f"{name}/k"], self.slopes[f"{name}/v"], k_out, v_out, self.pos, key,
                         value, self.weight_kv, self.inv_dt, dim, backend=self.config.backend)
        if self._rows_only_read:
            ops.scatter_kv_(k_out, v_out, self.idx, key, value, dim, backend=self.config.backend)
        if self._rebase:
            ops.scatter_kv_(kb, vb, self.idx, key, value, dim, backend=self.config.backend)
        return (k_out, v_out) if self.mode == "pruned" else (key, value)

    def joint_kv(self, name: str, key: Tensor, value: Tensor, before: tuple[Tensor, Tensor] | None = None,
                 after: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """On a pruned step with a joint buffer for this layer (allocate's `joint`): the forecast
        of the image rows is written into that buffer's image slice (kv()'s read buffers), the
        rows before and after are copied around it, and the whole buffer is returned: the N
        image rows are written once, not again by a concatenation (issue 21 item 1)."""
        around = self.joint.get(name)
        if self.mode != "pruned" or around is None:
            return super().joint_kv(name, key, value, before, after)
        dim = _token_dim(key.shape)
        given = tuple(0 if r is None else r[0].shape[dim] for r in (before, after))
        if given != around:
            raise ValueError(f"cat_pruning: {name} attends {given[0]} rows before and {given[1]} after its image "
                             f"rows, but its buffer was laid out for {around[0]} and {around[1]} at the start "
                             "of the generation (the adapter's cache layout)")
        self.kv(name, key, value)
        wide = self.wide[f"{name}/k"], self.wide[f"{name}/v"]
        n = self.reads[f"{name}/k"].shape[dim]
        for start, rows in ((0, before), (around[0] + n, after)):
            if rows is not None and rows[0].shape[dim]:
                for buf, x in zip(wide, rows, strict=True):
                    buf.narrow(dim, start, x.shape[dim]).copy_(x)
        return wide

    def attend(self, name: str, query: Tensor, key: Tensor, value: Tensor, extra: list[tuple[Tensor, Tensor]],
               extra_mask: Tensor | None = None, joined: tuple[Tensor, Tensor, int] | None = None) -> Tensor:
        """ReuseStore.attend with each skipped row formed as its forecast while it is read. The
        computed rows are attended among the extra rows and their cached rows left out (weight
        -1, begin_step): the forecast state stays as the last full or refresh step stored it
        (forecast_from="refresh", the only one fused_attention takes), and no row is written.

        `joined` (key, value, at): where the family's call already holds the computed rows and
        the extra rows side by side ([text; image; reference] keys without context parallelism),
        all of them as one (B, H, rows, D) pair with the computed rows from row `at` on, the
        extra rows before and after in `extra`'s order. They are attended as that view, so
        nothing is concatenated per layer; without it the computed rows are joined to the
        extra rows by a copy."""
        heads = query.shape[1]
        kept = key.shape[_token_dim(key.shape)] if self.kept is None else self.kept
        if joined is not None:
            rows_k, rows_v, at = joined
            extra_rows = sum(k.shape[2] for k, _ in extra)
            if rows_k.shape[2] != kept + extra_rows:
                raise ValueError(f"cat_pruning: {name} joined {rows_k.shape[2]} rows, not its {kept} computed and "
                                 f"{extra_rows} extra rows")
            rows = rows_k, rows_v
        else:  # context-parallel padding repeats selected rows after the first `kept`: attend each once
            computed = tuple(_as_heads(x, heads).narrow(2, 0, kept) for x in (key, value))
            rows, at = _extra_rows([computed, *extra]), 0
        if extra_mask is not None:  # every computed row is attended
            extra_mask = torch.cat([extra_mask[:, :at], extra_mask.new_ones(extra_mask.shape[0], kept),
                                    extra_mask[:, at:]], 1)  # fmt: skip
        caches = (*self.kv_cache[name], self.slopes[f"{name}/k"], self.slopes[f"{name}/v"])
        return ops.forecast_attention(query, *(_as_heads(t, heads) for t in caches), self.weight_attend,
                                      *rows, extra_mask=extra_mask, backend=self.config.backend)  # fmt: skip

    def _kv_float8(self, name: str, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        """kv() with fp8 values or slopes (kv_dtype, slope_dtype="float8"; forecast_from="refresh",
        so only steps that compute every row store): a pruned step forms each row's forecast in
        the read buffer from the value (dequantized there where it is fp8) and the slope
        (dequantized into a shared buffer where it is fp8); the others store the new values and
        slopes. A cache with both in the model's dtype (kv_dtype="float8-values": K, unless its
        slope is fp8) is forecast by the fused op as without fp8."""
        dim = _token_dim(key.shape)
        read = []
        for part, new, base in zip("kv", (key, value), self.kv_cache[name], strict=True):
            cache = f"{name}/{part}"
            rows8, slope8 = self.float8.get(cache), self.slopes8.get(cache)
            if rows8 is None and slope8 is None:
                read.append(self._update(cache, new, self.weight_kv))
                continue
            out = self.reads[cache]
            read.append(out if self.mode == "pruned" else new)
            if self.mode == "anchor":
                _store(base, rows8, new)
                continue
            stored = base if rows8 is None else rows8.dequantize_(out)
            if self.mode == "pruned":
                step = self.slopes[cache] if slope8 is None else slope8.dequantize_(self.reads[f"slope/{cache}"])
                torch.addcmul(stored, step, _per_row(self.weight_kv, dim), out=out)
                ops.scatter_tokens_(out, self.idx, new, dim, backend=self.config.backend)  # computed rows: exact
                continue
            # every row computed: the slope from the stored value (in the slope's precision), then the value
            if slope8 is not None:
                target = torch.sub(new, stored, out=out)
            else:
                target = self.slopes[cache].copy_(new).sub_(stored)
            target.mul_(_per_row(self.inv_dt, dim))
            if slope8 is not None:
                slope8.store_(target)
            _store(base, rows8, new)
        return read[0], read[1]

    def rows(self, name: str, x: Tensor) -> Tensor:
        return self._update(f"extra/{name}", x, self.weight_kv)

    def output(self, out: Tensor) -> Tensor:
        return self._update("noise", out, self.weight_out)

    def end_step(self) -> None:
        if self.clock is None:
            return
        if self.mode != "pruned":
            if self.span is not None:
                self.span.copy_(self.started * (self.clock - self.last))
            self.last.copy_(self.clock.expand_as(self.last))
        elif not self._rows_only_read or self._rebase:
            if self.span is not None:
                elapsed = self.started * (self.clock - self.last.gather(1, self.idx))
                if self._rebase:  # the slope is the quadratic's secant from the new base on (module doc)
                    elapsed = self.span.gather(1, self.idx) + 2 * elapsed
                # a scatter, not an add: a token repeated in idx (context-parallel padding) writes one value
                self.span.scatter_(1, self.idx, elapsed)
            self.last.scatter_(1, self.idx, self.clock.expand(self.idx.shape))
        self.started.fill_(1.0)

    def _forecast(self, name: str, which: int, idx: Tensor | None = None) -> Tensor:
        """The forecast of a cache's rows at the current time: every row, or (a (B, N, C) cache
        only) the rows of the tokens idx (B, K)."""
        base = self.float8[name].dequantized() if name in self.float8 else self._bases()[name]
        slope = self.slopes8[name].dequantized() if name in self.slopes8 else self.slopes[name]
        elapsed = self.clock - self.last
        curv, span = (self.curv, self.span) if name == "noise" else (None, None)
        if idx is not None:
            base, slope = (ops.gather_tokens(t, idx, 1, backend=self.config.backend) for t in (base, slope))
            elapsed = elapsed.gather(1, idx)
            if curv is not None:
                curv, span = ops.gather_tokens(curv, idx, 1, backend=self.config.backend), span.gather(1, idx)
        weight = self._weights(elapsed)[which]
        w = _per_row(weight, _token_dim(base.shape))
        slope = slope.float()
        if curv is not None:  # as _forecast_slope, in the same roundings (slope_read's dtype)
            slope = (slope + self._slope_weight(elapsed, span).unsqueeze(-1) * curv).to(self.slope_read.dtype).float()
        return (base.float() + w * slope).to(base.dtype)

    def forecast_output(self, idx: Tensor | None = None) -> Tensor:
        """The output forecast for the current step (traced, before output()): every row, or the
        rows of the tokens idx (B, K)."""
        return self._forecast("noise", 1, idx)

    def skipped_kv(self, name: str) -> tuple[Tensor, Tensor]:
        """The forecast of every row for the coming step (eager, between steps)."""
        return self._forecast(f"{name}/k", 0), self._forecast(f"{name}/v", 0)

    def skipped_rows(self, name: str) -> Tensor:
        return self._forecast(f"extra/{name}", 0)

    def skipped_output(self) -> Tensor:
        return self._forecast("noise", 1)


def make_store(config: CATConfig) -> ReuseStore:
    return ForecastStore(config) if config.forecast == "taylor" else ReuseStore(config)
