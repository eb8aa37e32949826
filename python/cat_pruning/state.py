"""Per-generation state of a patched model and the CAT policy steps that update it.

The lifecycle (DESIGN.md sections 3 and 4), with F = full_steps and steps numbered from 0:

    step < F-2   "dense"   the unpatched computation
    step = F-2   "anchor"  dense; the output is kept as the anchor
    step = F-1   "fill"    dense; every attention layer fills its image K/V cache, the output
                           fills the noise cache, tokens are clustered, first selection
    step >= F    "pruned"  the K selected tokens run compacted; after the step the noise
                           cache is updated and the next K tokens are selected

Only `mode` (a string that changes three times per generation) is read by code that
torch.compile traces; the step counter is advanced in eager code outside the model (around
the scheduler's step for pipelines, or by :func:`cat_pruning.advance`), so a generation
compiles a handful of graphs, not one per step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from cat_kernels import ops

from .config import CATConfig

MODES = ("dense", "anchor", "fill", "pruned")


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Shapes the caches of a generation need, from the adapter."""

    kv: dict[str, tuple[tuple[int, ...], torch.dtype]]  # attention layer -> (B, H, N, D) cache shape, dtype
    out_channels: int  # channels of the per-token output (noise cache)
    out_dtype: torch.dtype
    # other per-layer caches a family needs besides K/V (Sana: the depthwise-conv inputs), name -> (shape, dtype)
    extra: dict[str, tuple[tuple[int, ...], torch.dtype]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Geometry:
    """What a generation's tensors are shaped by; a change starts a new generation."""

    batch: int
    height: int  # image tokens per column
    width: int  # image tokens per row
    dtype: torch.dtype
    device: torch.device

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


class CATState:
    """Everything one patched model remembers between the steps of a generation."""

    def __init__(
        self, config: CATConfig, driver: str, layout: Callable[[Geometry], CacheLayout], cond_first: bool = False
    ) -> None:
        self.config = config
        self.driver = driver  # "pipeline", "manual" or "auto" (eager forward post-hook)
        self.layout = layout
        self.cond_first = cond_first  # CFG batch order [cond; uncond] (DiT) instead of [uncond; cond]
        self.cfg_pairs = bool(config.cfg_pairs)
        self.reset()

    # ------------------------------------------------------------------ lifecycle (eager)

    def reset(self) -> None:
        """Start a new generation: drop every cache and go back to step 0."""
        self.step = 0
        self.mode = self.mode_for(0)
        self.geometry: Geometry | None = None
        self.history: list[tuple[str, int]] = []  # (mode, image tokens computed per sample)
        self.anchor: Tensor | None = None
        self.noise_cache: Tensor | None = None
        self.labels: Tensor | None = None
        self.staleness: Tensor | None = None
        self.idx: Tensor | None = None
        self.recomputed: Tensor | None = None  # (B, N) times each token was computed this generation
        self.kv: dict[str, tuple[Tensor, Tensor]] = {}
        self.extra: dict[str, Tensor] = {}
        # (N, 2) token (row, col) positions for the clustering, set by adapters whose inputs carry
        # them (Flux's img_ids) when the token grid's height and width are not known from shapes
        self.positions: Tensor | None = None

    def mode_for(self, step: int) -> str:
        f = self.config.full_steps
        if step < f - 2:
            return "dense"
        return ("anchor", "fill")[step - (f - 2)] if step < f else "pruned"

    def advance(self) -> None:
        """Close the current step (called once per denoising step, outside compiled code)."""
        if self.geometry is None:
            return  # no forward ran in this step
        n = self.geometry.num_tokens
        self.history.append((self.mode, self.k if self.mode == "pruned" else n))
        self.step += 1
        self.mode = self.mode_for(self.step)
        if self.mode == "fill":
            self._allocate()

    def _allocate(self) -> None:
        """Allocate every cache the pruned steps update, once per generation and in eager code.

        The compiled steps then only write into these tensors in place, so their addresses stay
        fixed: CUDA graphs (torch.compile mode="reduce-overhead") can capture the steps, and the
        caches are marked static so that they are not copied at every replay."""
        g, layout = self.geometry, self.layout(self.geometry)
        scored = g.batch // 2 if self.cfg_pairs else g.batch

        def empty(*shape: int, dtype: torch.dtype) -> Tensor:
            return torch.empty(shape, dtype=dtype, device=g.device)

        self.kv = {name: (empty(*shape, dtype=dt), empty(*shape, dtype=dt)) for name, (shape, dt) in layout.kv.items()}
        self.extra = {name: empty(*shape, dtype=dt) for name, (shape, dt) in layout.extra.items()}
        self.noise_cache = empty(g.batch, g.num_tokens, layout.out_channels, dtype=layout.out_dtype)
        self.labels = empty(scored, g.num_tokens, dtype=torch.int64)
        self.staleness = empty(scored, g.num_tokens, dtype=torch.float32)
        self.idx = empty(g.batch, self.k, dtype=torch.int64)
        # every token ran in the dense steps 0 .. full_steps-2; the fill step adds one more
        self.recomputed = torch.full((g.batch, g.num_tokens), self.config.full_steps - 1.0, device=g.device)
        if g.device.type == "cuda":
            for t in [*(t for pair in self.kv.values() for t in pair), *self.extra.values(), self.noise_cache,
                      self.labels, self.staleness, self.idx, self.recomputed]:
                torch._dynamo.mark_static_address(t)

    def begin_forward(self, geometry: Geometry) -> None:
        """Called at the start of every transformer forward (traced under torch.compile)."""
        if self.geometry is not None and geometry != self.geometry:
            self.reset()  # another batch, resolution, dtype or device: a new generation
        if self.cfg_pairs and geometry.batch % 2:
            raise ValueError(f"cfg_pairs=True needs an even batch [uncond; cond], got batch {geometry.batch}")
        self.geometry = geometry
        self.k = self.config.tokens_kept(geometry.num_tokens)

    # ------------------------------------------------------------------ policy (traced)

    def _scored(self, t: Tensor) -> Tensor:
        """The rows the selection is scored on: the cond half under CFG, else all."""
        if not self.cfg_pairs:
            return t
        half = t.shape[0] // 2
        return t[:half] if self.cond_first else t[half:]

    def _broadcast(self, idx: Tensor) -> Tensor:
        return torch.cat([idx, idx]) if self.cfg_pairs else idx

    def _cluster(self, out: Tensor) -> Tensor:
        """k-means on (row, col) in token units plus a little content: compact spatial clusters."""
        g = self.geometry
        if self.positions is not None:
            pos = self.positions.to(out.device, torch.float32).expand(out.shape[0], -1, -1)
        else:
            rows = torch.arange(g.height, device=out.device, dtype=torch.float32).repeat_interleave(g.width)
            cols = torch.arange(g.width, device=out.device, dtype=torch.float32).repeat(g.height)
            pos = torch.stack([rows, cols], -1).expand(out.shape[0], -1, -1)
        features = torch.cat([pos, self.config.cluster_content_weight * out.float()], -1)
        self.num_clusters = min(self.config.num_clusters, g.num_tokens)
        return ops.kmeans(features, self.num_clusters, self.config.kmeans_iters, backend=self.config.backend)

    def _select(self, out: Tensor, first: bool) -> None:
        cfg = self.config
        d, score = ops.token_stats(out, self.anchor, self.labels, self.num_clusters, backend=cfg.backend)
        if cfg.selection in ("cat", "cat-no-staleness"):
            # Without staleness, "stalest first" becomes "largest change first": the policy's
            # staleness slots go to the tokens that change most (its own count is not kept).
            staleness = self.staleness if cfg.selection == "cat" else -d
            idx = ops.select_tokens(
                d, score, self.labels, staleness, self.k, first=first,
                importance_fraction=cfg.importance_fraction, staleness_decay=cfg.staleness_decay, backend=cfg.backend,
            )
        else:  # ablations: the same K by global change, or at random
            if cfg.selection == "topk":
                key = d
            else:  # a hash of the token index seeded by the staleness total, which moves every step
                i = torch.arange(d.shape[1], device=d.device, dtype=torch.float32).expand_as(d)
                seed = self.staleness.sum(1, keepdim=True)
                key = torch.frac(torch.sin(i * 12.9898 + seed * 78.233) * 43758.5453)
            idx = torch.sort(torch.topk(key, self.k, dim=1).indices, dim=1).values
            self.staleness.mul_(cfg.staleness_decay).scatter_add_(1, idx, torch.ones_like(idx, dtype=torch.float32))
        self.idx.copy_(self._broadcast(idx))

    def on_output(self, out: Tensor) -> Tensor:
        """Per-token model output (B, rows, C_out) -> the full (B, N, C_out) output of the step."""
        mode = self.mode
        if mode == "anchor":
            self.anchor = self._scored(out).detach().clone()
        elif mode == "fill":
            self.noise_cache.copy_(out)
            self.recomputed.add_(1)
            scored = self._scored(out).detach()
            self.labels.copy_(self._cluster(scored))
            self.staleness.zero_()
            self._select(scored, first=True)
        elif mode == "pruned":
            ops.scatter_tokens_(self.noise_cache, self.idx, out, 1, backend=self.config.backend)
            self.recomputed.scatter_add_(1, self.idx, torch.ones_like(self.idx, dtype=torch.float32))
            out = self.noise_cache.clone()
            self._select(self._scored(self.noise_cache), first=False)
        return out

    def cache_bytes(self) -> int:
        tensors = [t for pair in self.kv.values() for t in pair] + list(self.extra.values())
        others = (self.anchor, self.noise_cache, self.labels, self.staleness, self.idx, self.recomputed)
        tensors += [t for t in others if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

