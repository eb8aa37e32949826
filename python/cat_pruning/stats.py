"""What a patched generation computed, as a dataclass that prints as a short table."""

from __future__ import annotations

import dataclasses

import torch

from .config import CATConfig
from .state import MODES


@dataclasses.dataclass(frozen=True)
class StepStats:
    step: int
    mode: str  # "dense", "anchor", "fill", "refresh" (all tokens, every forecast slope fresh) or "pruned"
    tokens: int  # image tokens computed per sample


@dataclasses.dataclass(frozen=True)
class CATStats:
    """Per-step record and totals of the last (or current) generation.

    macs / macs_dense count multiply-accumulates of the transformer (linears, convolutions,
    QK^T and PV) over all steps and samples; cache_bytes is what the caches hold now.
    recomputed (B, height, width), a video's (B, frames, height, width), on the CPU: how many
    steps computed each image token (None before the caches exist). padded_rows: rows per sample
    that a pruned step computes beyond its tokens_kept tokens, repeats of selected tokens (under
    context parallelism over W ranks, when W does not divide K: K is padded to a multiple of W);
    they cost MACs but compute no token.
    reference_tokens: rows per sample that every step computes besides the image tokens (an
    edit model's reference-image tokens): never selected or cached, counted in the MACs.
    branches: the guidance branches (cache_context names) the generation ran, each with its own
    caches and selection (a pipeline that calls the transformer once per CFG branch has two; one
    whose calls open no context, none). macs, macs_dense and cache_bytes count all branches;
    steps, batch and recomputed are the first's.
    experts: a pipeline's two experts (Wan 2.2 A14B: "transformer", "transformer_2"), each patched
    with its own caches and schedule over the steps it runs: steps lists both experts' steps in
    the order they ran (each expert's schedule starts over at its first step), macs, macs_dense
    and cache_bytes count both, recomputed sums both; empty for one transformer.
    """

    family: str
    config: CATConfig
    num_tokens: int
    tokens_kept: int
    batch: int
    steps: list[StepStats]
    macs: int
    macs_dense: int
    cache_bytes: int
    recomputed: torch.Tensor | None = None
    padded_rows: int = 0
    branches: tuple[str, ...] = ()
    reference_tokens: int = 0
    experts: tuple[str, ...] = ()

    @property
    def mac_fraction(self) -> float:
        """MACs of this generation over the MACs of the dense model for the same steps."""
        return self.macs / self.macs_dense if self.macs_dense else 1.0

    @property
    def mac_speedup(self) -> float:
        """The speedup a perfectly MAC-bound run would see."""
        return self.macs_dense / self.macs if self.macs else 1.0

    @property
    def caches_used(self) -> bool:
        """Whether a step read the caches (a pruned step). A generation that ends before its
        first pruned step runs as the dense model; the caches it allocated (at the end of the
        step before the anchor or fill step) were never read."""
        return any(s.mode == "pruned" for s in self.steps)

    def __str__(self) -> str:
        cfg = self.config
        if not self.steps:
            return (f"CAT Pruning on {self.family}: nothing has run yet (no generation since the patch or the last "
                    f"reset; keep_ratio {cfg.keep_ratio}, full_steps {cfg.full_steps})")
        counts = {mode: sum(s.mode == mode for s in self.steps) for mode in MODES}
        modes = ", ".join(f"{n} {mode}" for mode, n in counts.items() if n or mode == "pruned")
        if self.caches_used:
            caches = f"  caches {self.cache_bytes / 2**20:,.2f} MiB" + (f" (forecast {cfg.forecast})"
                                                                      if cfg.forecast != "none" else "")
        else:  # the state allocates them at the end of the step before the first caching step
            caches = "  caches never read" + (f"; {self.cache_bytes / 2**20:,.2f} MiB allocated for later steps, "
                                               "kept for the next generation" if self.cache_bytes else "")
        lines = [
            f"CAT Pruning on {self.family}: {len(self.steps)} steps ({modes}), "
            f"batch {self.batch}{self._branches()}, {self.num_tokens} image tokens{self._reference()}, "
            f"{self.tokens_kept} kept "
            f"(keep_ratio {cfg.keep_ratio}, full_steps {cfg.full_steps})" + self._padding(),
            f"  MACs {_si(self.macs)} of {_si(self.macs_dense)} dense: "
            f"{100 * self.mac_fraction:.1f}% ({self.mac_speedup:.2f}x ideal speedup)",
            caches,
            "  step  mode    tokens/sample",
        ]
        if not counts["pruned"] and cfg.full_steps >= len(self.steps):
            lines.insert(1, f"  no step was pruned: full_steps {cfg.full_steps} >= the {len(self.steps)} steps "
                            "of this generation")
        elif not counts["pruned"]:
            lines.insert(1, "  no step was pruned")
        lines += [f"  {s.step:>4}  {s.mode:<6}  {s.tokens:>6}" for s in self.steps]
        return "\n".join(lines)

    def _reference(self) -> str:
        r = self.reference_tokens
        return f" (+ {r} reference token{'s' if r != 1 else ''}, computed at every step)" if r else ""

    def _branches(self) -> str:
        if len(self.branches) < 2:
            return ""
        return f" in each of {len(self.branches)} branches ({', '.join(self.branches)})"

    def _padding(self) -> str:
        p = self.padded_rows
        if not p:
            return ""
        repeats = "a repeat of a selected token" if p == 1 else "repeats of selected tokens"
        return (f"; a pruned step computes {self.tokens_kept + p} rows per sample, {p} of them {repeats} "
                "(context parallelism splits the rows evenly over the ranks)")


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} "
