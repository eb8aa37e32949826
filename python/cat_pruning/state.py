"""Per-generation state of a patched model and the CAT policy steps that update it.

The lifecycle (docs/design.md sections 2 and 4), with F = full_steps and steps numbered from 0:

    step < F-2   "dense"   the unpatched computation
    step = F-2   "anchor"  dense; the output is kept as the anchor
    step = F-1   "fill"    dense; every attention layer fills its image K/V cache, the output
                           fills the noise cache, tokens are clustered, first selection
    step >= F    "pruned"  the K selected tokens run compacted; after the step the noise
                           cache is updated and the next K tokens are selected (under context
                           parallelism the K are padded to a multiple of the ranks, below)
                 "refresh" every refresh_every-th step from F-1 on (if set): all tokens run,
                           every cache row is fresh, then the next K tokens are selected

The cached rows live in a cache store (cat_pruning.cache): reuse or forecast of the rows a
pruned step skips.

Only `mode` (a string that changes three times per generation) is read by code that
torch.compile traces; the step counter is advanced in eager code outside the model (around
the scheduler's step for pipelines, or by :func:`cat_pruning.advance`), so a generation
compiles a handful of graphs, not one per step.

Under diffusers' Ulysses context parallelism over W ranks (cat_pruning.parallel) each rank computes
an equal share of a pruned step's rows, so when W does not divide K the selection of K tokens (the
one a single process makes) is padded with repeats of its first tokens to K' = ceil(K / W) * W
rows: ``idx`` (B, K') holds the rows the step computes, ``selected`` (its first K columns) the
selection. A repeated token's rows are computed from the same inputs as the original's, so every
scatter of the step writes the same value twice and the generation is one process's, whatever W.
What counts a token once (staleness, times computed, the stats) reads ``selected``.

Pipelines that call the transformer once per guidance branch in a step (Flux's true CFG,
Qwen-Image, Wan) open ``transformer.cache_context("cond")`` / ``("uncond")`` around each call.
Each branch then has its own caches and selection (BRANCH_FIELDS), switched in eager code when
the context opens (:meth:`CATState.use_branch`); the step count and its mode are the generation's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable, Iterator

import torch
from torch import Tensor

from cat_kernels import ops

from .cache import make_store
from .config import CATConfig
from .parallel import NONE, Sharding

MODES = ("dense", "anchor", "fill", "refresh", "pruned")
# After a fill or refresh step every token has the same staleness; the "stalest first" fill then
# takes the tokens of larger score first (a staleness lower by at most TIE_BY_SCORE), and equal
# scores in an order that a hash of the token and the step decides, never by token index (which
# walked the raster from the top of the image).
TIE_BY_SCORE = 1e-3
TIE_BY_HASH = 1e-6
# What each guidance branch of a generation keeps for itself; the rest (config, step, mode, CFG
# pairing, sharding) is shared by all of them.
BRANCH_FIELDS = ("cache", "forwards", "called", "geometry", "history", "allocated", "caching", "anchor", "labels",
                 "staleness", "age", "idx", "selected", "recomputed", "predicted", "positions", "num_clusters", "kept",
                 "k", "padding")


def _hash(n: int, seed: Tensor, device: torch.device) -> Tensor:
    """(n,) or (B, n) pseudo-random values in [0, 1) of the token indices 0..n-1 and a seed tensor
    (one per row), computed on the device: a fixed function of both, so a seed that moves every
    step gives another order every step."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return torch.frac(torch.sin(i * 12.9898 + seed * 78.233) * 43758.5453)


def select_regions(d: Tensor, labels: Tensor, age: Tensor, positions: Tensor, k: int, num_clusters: int) -> Tensor:
    """The "regions" selection (docs/design.md section 4): k tokens per row that make up whole
    spatial clusters, sorted ascending.

    d: (B, N) float token score; labels: (B, N) int64 cluster of each token; age: (B, N) float
    pruned steps since each token was computed; positions: (N, P) or (B, N, P) integer-valued
    (row, col) of each token (a video's (frame, row, col): P = 3). Clusters are taken in the
    order of their mean score times one plus their mean age, each whole, the last one in part:
    its tokens nearest to its highest-scoring token (a disc around it). Every tie is broken by
    a fixed rule (the lower cluster, then the lower token index), so the result is a function of
    the inputs on any device.
    """
    batch, n = d.shape
    c = num_clusters
    ones = torch.ones_like(d)
    count = torch.zeros(batch, c, device=d.device).scatter_add_(1, labels, ones).clamp_min(1)
    mean_d = torch.zeros(batch, c, device=d.device).scatter_add_(1, labels, d.float()) / count
    mean_age = torch.zeros(batch, c, device=d.device).scatter_add_(1, labels, age) / count
    priority = mean_d * (1 + mean_age)
    order = torch.sort(-priority, dim=1, stable=True).indices  # clusters, first taken first
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=d.device).expand(batch, c))
    # each cluster's seed: its token of largest score (the first such token in index order)
    by_score = torch.sort(-d.float(), dim=1, stable=True).indices
    place = torch.empty_like(by_score).scatter_(1, by_score, torch.arange(n, device=d.device).expand(batch, n))
    first = torch.full((batch, c), n, dtype=torch.int64, device=d.device).scatter_reduce(1, labels, place, "amin")
    seed = by_score.gather(1, first.clamp_max(n - 1))  # (B, C) token index of each cluster's seed
    pos = positions.round().long().expand(batch, n, positions.shape[-1])
    seed_pos = pos.gather(1, seed.gather(1, labels).unsqueeze(-1).expand_as(pos))
    dist2 = (pos - seed_pos).square().sum(-1)  # exact integers
    # one integer key per token: (cluster rank, squared distance to the seed, token index)
    bound = dist2.amax(1, keepdim=True) + 1
    key = (rank.gather(1, labels) * bound + dist2) * n + torch.arange(n, device=d.device)
    idx = torch.topk(key, k, dim=1, largest=False, sorted=False).indices
    return torch.sort(idx, dim=1).values


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes the caches of a generation need, from the adapter."""

    kv: dict[str, tuple[tuple[int, ...], torch.dtype]]  # attention layer -> (B, H, N, D) cache shape, dtype
    out_channels: int  # channels of the per-token output (noise cache)
    out_dtype: torch.dtype
    # other per-layer caches a family needs besides K/V (Sana: the depthwise-conv inputs), name -> (shape, dtype)
    extra: dict[str, tuple[tuple[int, ...], torch.dtype]] = dataclasses.field(default_factory=dict)
    # channels of one head in each (B, N, H*D) K/V cache (kv_dtype="float8" scales each head of a
    # row on its own, so that a context-parallel rank's heads quantize as in one process)
    head_dims: dict[str, int] = dataclasses.field(default_factory=dict)
    # attention layer -> rows of other streams (text, reference rows) its keys have before and after
    # the N image rows: the buffer a pruned step reads leaves room for them (cache.joint_kv)
    joint: dict[str, tuple[int, int]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a generation's tensors are shaped by; a change starts a new generation."""

    batch: int
    height: int  # image tokens per column
    width: int  # image tokens per row
    dtype: torch.dtype
    device: torch.device
    # rows of the image stream after the N image tokens that every step computes, never selected,
    # cached or forecast: an edit model's reference-image tokens (Qwen-Image-Edit)
    reference: int = 0
    frames: int = 1  # token frames of a video (Wan), frame-major: N = frames * height * width
    text: int = 0  # text tokens of the call (Adapter.text_tokens): MAC counting, joint attention's buffers

    @property
    def num_tokens(self) -> int:
        return self.frames * self.height * self.width

    @property
    def grid(self) -> tuple[int, ...]:
        """The token grid: (height, width), a video's (frames, height, width)."""
        return (self.frames, self.height, self.width) if self.frames > 1 else (self.height, self.width)

    def with_reference(self, rows: int) -> Geometry:
        """A flat token list (height 1) whose last `rows` tokens are reference rows."""
        if self.reference:
            raise ValueError("cat_pruning: reference tokens were given (reset(reference_tokens=...)) but this "
                             "family's calls say their reference rows themselves (Qwen-Image's img_shapes); "
                             "leave reference_tokens at 0")
        if self.height != 1 or self.frames != 1:
            raise ValueError("cat_pruning: reference tokens (reset(reference_tokens=...)) are for families whose "
                             "image tokens come as a flat list (FLUX.2); this one's are a grid")
        if rows >= self.width:
            raise ValueError(f"cat_pruning: {rows} reference tokens, but the input has only {self.width} rows")
        return dataclasses.replace(self, width=self.width - rows, reference=rows)


class CATState:
    """Everything one patched model remembers between the steps of a generation."""

    def __init__(
        self,
        config: CATConfig,
        driver: str,
        layout: Callable[[Geometry, Sharding], CacheLayout],
        cond_first: bool = False,
    ) -> None:
        self.config = config
        self.driver = driver  # "pipeline", "manual" or "auto" (eager forward post-hook)
        self.layout = layout
        self.cond_first = cond_first  # CFG batch order [cond; uncond] (DiT) instead of [uncond; cond]
        self.cfg_pairs = bool(config.cfg_pairs)
        auto = config.importance == "auto" and config.forecast == "taylor"
        self.by_error = config.importance == "forecast-error" or auto  # importance by forecast error
        self.shard = NONE  # diffusers model parallelism, read before every call (cat_pruning.parallel)
        # one store per branch for the state's lifetime (reset per generation): compiled code guards on it
        self._stores: dict[str, object] = {}
        # per branch, the state's buffers by name, kept across generations of the same shapes (_buffer)
        self._pools: dict[str, dict[str, Tensor]] = {}
        self.branch = ""  # the guidance branch (cache_context name) whose fields are in place; "": none named
        self.reset()

    # ------------------------------------------------------------------ lifecycle (eager)

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation of `num_steps` denoising steps (None: not known): drop every
        cache of every branch and go back to step 0 (the current branch's name stays: a pipeline
        may open its context before the call that starts the generation)."""
        self.step = 0
        self.num_steps = num_steps
        self.mode = self.config.mode(0, num_steps)
        # rows after the image tokens that the running pipeline call says its transformer input
        # carries (FLUX.2's reference images: Adapter.reference_rows), set after this reset
        self.reference_rows = 0
        # the buffers of the branches that ran are kept for the next generation (_buffer); the
        # others' go back to the allocator
        ran = {*getattr(self, "_parked", {}), *([self.branch] if getattr(self, "geometry", None) is not None else [])}
        for name in [b for b in self._stores if b not in ran]:
            self._pools.pop(name, None)
            self._stores.pop(name)
        for store in self._stores.values():
            store.reset()
        self._parked: dict[str, dict] = {}  # the other branches' BRANCH_FIELDS
        self._reset_branch()

    def _reset_branch(self) -> None:
        """The current branch's fields at the start of a generation."""
        if self.branch not in self._stores:
            self._stores[self.branch] = make_store(self.config)
        self.cache = self._stores[self.branch]
        self.cache.reset()
        self.forwards = 0  # transformer calls in the current step (eager code: generation.count_forward)
        # whether a forward ran in the current step (set in traced code too): a step that did not
        # call this transformer (the other expert's, Wan 2.2 A14B) is not one of its steps
        self.called = False
        self.caching = False  # whether this step's processors and hooks hand their rows to the cache store
        self.geometry: Geometry | None = None
        self.history: list[tuple[str, int]] = []  # (mode, image tokens computed per sample)
        self.allocated = False
        self.predicted: Tensor | None = None
        self.num_clusters = 0
        self.kept = self.k = self.padding = 0
        self.anchor: Tensor | None = None
        self.labels: Tensor | None = None
        self.staleness: Tensor | None = None
        self.age: Tensor | None = None
        self.idx: Tensor | None = None  # (B, K') the rows a pruned step computes: the selection, padded
        self.selected: Tensor | None = None  # (B, K) the selection: a view of idx's first K columns
        self.recomputed: Tensor | None = None  # (B, N) times each token was computed this generation
        # (N, 2) token (row, col) positions for the clustering, set by adapters whose inputs carry
        # them (Flux's img_ids) when the token grid's height and width are not known from shapes
        self.positions: Tensor | None = None

    # ------------------------------------------------------------------ branches (eager)

    def use_branch(self, name: str) -> None:
        """Put branch `name`'s fields in place (transformer.cache_context(name) opened): a branch
        seen for the first time in this generation starts empty; one that never ran a forward is
        dropped when another takes its place."""
        if name == self.branch:
            return
        if self.geometry is not None:
            self._parked[self.branch] = {f: getattr(self, f) for f in BRANCH_FIELDS}
        self.branch = name
        parked = self._parked.pop(name, None)
        if parked is None:
            self._reset_branch()
        else:
            vars(self).update(parked)

    @property
    def other_branches(self) -> list[str]:
        """The names of the branches that ran in this generation, besides the current one."""
        return sorted(self._parked)

    @contextlib.contextmanager
    def _on(self, name: str) -> Iterator[None]:
        current = self.branch
        self.use_branch(name)
        try:
            yield
        finally:
            self.use_branch(current)

    def each_branch(self) -> Iterator[str]:
        """Every branch that ran in this generation, by name, each in place while the caller
        reads it (the current one alone when none ran)."""
        ran = self.geometry is not None
        for name in sorted({*self._parked, *([self.branch] if ran or not self._parked else [])}):
            with self._on(name):
                yield name

    def advance(self) -> None:
        """Close the current step (called once per denoising step, outside compiled code)."""
        self.forwards = 0
        ran = [name for name in self.each_branch() if self._close_step()]
        if not ran:
            return  # no forward ran in this step
        self.step += 1
        self.mode = self.config.mode(self.step, self.num_steps)
        if self.step == self.config.full_steps and self.num_steps is None and self.config.needs_num_steps:
            warnings.warn(
                "cat_pruning: the schedule counts from the end (final_full_steps, refresh_phase='end') but this bare "
                "denoising loop's step count is unknown, so its last steps run as the others and its refreshes "
                "from the fill step; give it with cat_pruning.reset(transformer, num_steps=...) before the loop, "
                "or patch with final_full_steps=0 and refresh_phase='fill'",
                RuntimeWarning, stacklevel=2)
        for _ in self.each_branch():
            if self.geometry is None:
                continue
            if self.allocated:
                self.cache.advance()
            elif self.mode in self.cache.modes or self.mode == "anchor":
                self._allocate()

    def _close_step(self) -> bool:
        """The current branch's part of closing a step; whether it ran a forward in it."""
        self.forwards = 0
        if self.geometry is None or not self.called:
            return False
        self.called = False
        self.history.append((self.mode, self.kept if self.mode == "pruned" else self.geometry.num_tokens))
        return True

    def _allocate(self) -> None:
        """Allocate every buffer the caching steps update, the anchor included, once per generation
        and in eager code, before the anchor step (or the fill step, when the anchor is step 0).

        The compiled steps then only write into these tensors in place, so their addresses stay
        fixed: CUDA graphs (torch.compile mode="reduce-overhead") can capture the steps, and the
        buffers are marked static so that they are not copied at every replay. A generation of
        the same shapes as the last reuses its buffers (_buffer, and the cache store's own), so
        the graphs recorded for one generation replay in the next."""
        g, layout = self.geometry, self.layout(self.geometry, self.shard)
        scored = g.batch // 2 if self.cfg_pairs else g.batch
        device = g.device

        noise = ((g.batch, g.num_tokens, layout.out_channels), layout.out_dtype)
        self.cache.allocate(layout.kv, layout.extra, noise, device, layout.head_dims, layout.joint)
        self.labels = self._buffer("labels", (scored, g.num_tokens), torch.int64, device)
        self.staleness = self._buffer("staleness", (scored, g.num_tokens), torch.float32, device)
        self.age = self._buffer("age", (scored, g.num_tokens), torch.float32, device)  # "regions": steps since computed
        self.idx = self._buffer("idx", (g.batch, self.k), torch.int64, device)
        self.selected = self.idx[:, :self.kept]
        out_shape = (scored, g.num_tokens, layout.out_channels)
        if self.step == self.config.full_steps - 2:  # the anchor step comes next
            self.anchor = self._buffer("anchor", out_shape, layout.out_dtype, device)
        # importance by forecast error: the output forecast of each token at its last computation
        self.predicted = self._buffer("predicted", out_shape, layout.out_dtype, device) if self.by_error else None
        # every token ran in the steps before this one; this and later dense-like steps add one each
        self.recomputed = self._buffer("recomputed", (g.batch, g.num_tokens), torch.float32, device)
        self.recomputed.fill_(float(self.step))
        self.allocated = True
        if device.type == "cuda":
            for t in [*self.cache.tensors(), self.labels, self.staleness, self.age, self.idx, self.recomputed,
                      *([self.anchor] if self.anchor is not None else [])]:
                torch._dynamo.mark_static_address(t)

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """The current branch's buffer `name`: the last generation's when its shape, dtype and
        device match (its values are stale: the caller writes before reading), else a new one."""
        pool = self._pools.setdefault(self.branch, {})
        t = pool.get(name)
        if t is None or t.shape != shape or t.dtype != dtype or t.device != device:
            t = pool[name] = torch.empty(shape, dtype=dtype, device=device)
        return t

    def release(self) -> None:
        """Drop every buffer of every branch (unpatch): the memory goes back to the allocator."""
        self._pools.clear()
        self._stores.clear()
        self.branch = ""
        self.reset()

    def begin_forward(self, geometry: Geometry) -> None:
        """Called at the start of every transformer forward (traced under torch.compile)."""
        if self.geometry is not None and geometry != self.geometry:
            self.reset(self.num_steps)  # another batch, resolution, dtype or device: a new generation
        if self.cfg_pairs and geometry.batch % 2:
            raise ValueError(f"cfg_pairs=True needs an even batch [uncond; cond], got batch {geometry.batch}")
        self.geometry = geometry
        self.called = True
        self.kept = self.tokens_kept(geometry.num_tokens)  # K: the tokens selected
        self.k = self.rows_computed(self.kept)  # K': the rows a pruned step computes (adapters read it)
        self.padding = self.k - self.kept  # 0 unless context parallelism pads the selection
        self.caching = self.allocated and self.mode in self.cache.modes
        if self.caching:
            self.cache.begin_step(self.mode, self.idx, self.kept)

    def tokens_kept(self, num_tokens: int) -> int:
        """K of a pruned step: the config's, whatever the number of processes, so that the
        selection is the one a single process makes."""
        w = self.shard.cp_world
        if num_tokens % w:
            raise ValueError(f"cat_pruning: {num_tokens} image tokens do not split over ulysses_degree={w}")
        return self.config.tokens_kept(num_tokens)

    def rows_computed(self, kept: int) -> int:
        """K' rows of a pruned step: K rounded up to a multiple of the context-parallel degree, so
        that every rank carries K' / W of them (K' - K of them repeat selected tokens)."""
        w = self.shard.cp_world
        return -(-kept // w) * w

    def _set_selection(self, idx: Tensor) -> None:
        """The (B, K) selection into idx, then its padding: repeats of its first tokens."""
        self.selected.copy_(idx)
        if self.padding:
            self.idx[:, self.kept:].copy_(idx.repeat(1, -(-self.padding // self.kept))[:, :self.padding])

    # ------------------------------------------------------------------ policy (traced)

    def _scored(self, t: Tensor) -> Tensor:
        """The rows the selection is scored on: the cond half under CFG, else all."""
        if not self.cfg_pairs:
            return t
        half = t.shape[0] // 2
        return t[:half] if self.cond_first else t[half:]

    def _broadcast(self, idx: Tensor) -> Tensor:
        return torch.cat([idx, idx]) if self.cfg_pairs else idx

    def _token_positions(self, device: torch.device) -> Tensor:
        """(N, 2) float32 (row, col) of every image token in token units; a video's (N, 3)
        (frame, row, col), a latent frame counting as one token's distance."""
        if self.positions is not None:
            return self.positions.to(device, torch.float32)
        g = self.geometry
        axes = torch.meshgrid(*(torch.arange(n, device=device, dtype=torch.float32) for n in g.grid), indexing="ij")
        return torch.stack([a.flatten() for a in axes], -1)

    def _cluster(self, out: Tensor) -> Tensor:
        """k-means on (row, col) in token units plus a little content: compact spatial clusters."""
        pos = self._token_positions(out.device).expand(out.shape[0], -1, -1)
        features = torch.cat([pos, self.config.cluster_content_weight * out.float()], -1)
        self.num_clusters = min(self.config.num_clusters, self.geometry.num_tokens)
        return ops.kmeans(features, self.num_clusters, self.config.kmeans_iters, backend=self.config.backend)

    def _select(self, out: Tensor, first: bool) -> None:
        cfg = self.config
        # the token scores: change since the anchor (the paper), or how far the output forecast
        # missed at each token's last computation (the first selection has no forecast yet)
        ref = self.predicted if self.by_error and not first else self.anchor
        d, score = ops.token_stats(out, ref, self.labels, self.num_clusters, backend=cfg.backend)
        if cfg.selection == "regions":
            if self.mode in ("fill", "refresh"):
                self.age.zero_()
            idx = select_regions(d, self.labels, self.age, self._token_positions(d.device), self.kept,
                                 self.num_clusters)
            self.age.add_(1.0).scatter_(1, idx, 0.0)
            self._set_selection(self._broadcast(idx))
            return
        if self.mode in ("fill", "refresh"):  # every token equally stale: break the ties (TIE_BY_SCORE)
            noise = _hash(d.shape[1], self.recomputed.sum(), d.device)
            self.staleness.sub_(TIE_BY_SCORE * d / d.amax(1, keepdim=True).clamp_min(1e-30) + TIE_BY_HASH * noise)
        if cfg.selection in ("cat", "cat-no-staleness"):
            # Without staleness, "stalest first" becomes "largest change first": the policy's
            # staleness slots go to the tokens that change most (its own count is not kept).
            staleness = self.staleness if cfg.selection == "cat" else -d
            idx = ops.select_tokens(
                d, score, self.labels, staleness, self.kept, first=first,
                importance_fraction=cfg.importance_fraction, staleness_decay=cfg.staleness_decay, backend=cfg.backend,
            )
        else:  # ablations: the same K by global change, or at random
            if cfg.selection == "topk":
                key = d
            else:  # a hash of the token index seeded by the staleness total, which moves every step
                key = _hash(d.shape[1], self.staleness.sum(1, keepdim=True), d.device)
            idx = torch.sort(torch.topk(key, self.kept, dim=1).indices, dim=1).values
            self.staleness.mul_(cfg.staleness_decay).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        self._set_selection(self._broadcast(idx))

    def gather(self, x: Tensor) -> Tensor:
        """(B, N (+ R), C) rows of every image token (and reference token) -> (B, K' (+ R), C) rows
        this step computes (K' = K but under context parallelism, where the selection is padded
        with repeats; the R reference rows always)."""
        reference = self.geometry.reference
        rows = ops.gather_tokens(x[:, :x.shape[1] - reference] if reference else x, self.idx, 1,
                                 backend=self.config.backend)
        return torch.cat([rows, x[:, -reference:]], dim=1) if reference else rows

    def on_output(self, out: Tensor) -> Tensor:
        """Per-token model output (B, rows (+ R), C_out) -> the full (B, N (+ R), C_out) output of
        the step; the R reference rows pass through (the pipelines drop them)."""
        reference = self.geometry.reference
        if reference:
            return torch.cat([self._image_output(out[:, :-reference]), out[:, -reference:]], dim=1)
        return self._image_output(out)

    def _image_output(self, out: Tensor) -> Tensor:
        """on_output for the image tokens' rows (B, rows, C_out)."""
        mode = self.mode
        if self.by_error and self.caching and mode == "refresh":
            self.predicted.copy_(self._scored(self.cache.forecast_output()))
        elif self.by_error and self.caching and mode == "pruned" and self.cache.keeps_pruned_rows:
            forecast = self._scored(self.cache.forecast_output(self.idx))
            ops.scatter_tokens_(self.predicted, self._scored(self.idx), forecast, 1, backend=self.config.backend)
        if self.caching:
            full = self.cache.output(out)
        if (self.caching or mode == "anchor") and mode != "pruned" and self.recomputed is not None:
            self.recomputed.add_(1)
        if mode == "anchor":
            scored = self._scored(out).detach()
            if self.anchor is None:  # full_steps=2: the anchor is step 0, which runs before _allocate
                self.anchor = self._buffer("anchor", scored.shape, scored.dtype, scored.device)
            self.anchor.copy_(scored)
        elif mode == "fill":
            scored = self._scored(out).detach()
            self.labels.copy_(self._cluster(scored))
            if self.by_error:  # until a token is forecast, its score is its change since the anchor
                self.predicted.copy_(self.anchor)
            self.staleness.zero_()
            self._select(scored, first=True)
        elif mode == "refresh":
            self.staleness.mul_(self.config.staleness_decay).add_(1.0)
            self._select(self._scored(out).detach(), first=False)
        elif mode == "pruned":
            # the selection: a repeated token (context parallelism's padding) is computed once
            self.recomputed.scatter_add_(1, self.selected, torch.ones_like(self.selected, dtype=torch.float32))
            # scored on every token's last computed output (the forecast is never scored)
            self._select(self._scored(self.cache.noise), first=False)
        if self.caching:
            self.cache.end_step()
            return full
        return out

    def cache_bytes(self) -> int:
        """Bytes the caches of every branch hold."""
        total = 0
        for _ in self.each_branch():
            tensors = [t for t in (self.anchor, self.labels, self.staleness, self.age, self.idx, self.recomputed,
                                   self.predicted) if t is not None]
            total += self.cache.nbytes() + sum(t.numel() * t.element_size() for t in tensors)
        return total
