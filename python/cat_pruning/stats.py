"""What a patched generation computed, as a dataclass that prints as a short table."""

from __future__ import annotations

import dataclasses

import torch

from .config import CATConfig


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
    recomputed (B, height, width), on the CPU: how many steps computed each image token (None
    before the caches exist).
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

    @property
    def mac_fraction(self) -> float:
        """MACs of this generation over the MACs of the dense model for the same steps."""
        return self.macs / self.macs_dense if self.macs_dense else 1.0

    @property
    def mac_speedup(self) -> float:
        """The speedup a perfectly MAC-bound run would see."""
        return self.macs_dense / self.macs if self.macs else 1.0

    def __str__(self) -> str:
        pruned = sum(s.mode == "pruned" for s in self.steps)
        refresh = sum(s.mode == "refresh" for s in self.steps)
        dense = len(self.steps) - pruned - refresh
        lines = [
            f"CAT Pruning on {self.family}: {len(self.steps)} steps ({dense} dense, "
            + (f"{refresh} refresh, " if refresh else "") + f"{pruned} pruned), "
            f"batch {self.batch}, {self.num_tokens} image tokens, {self.tokens_kept} kept "
            f"(keep_ratio {self.config.keep_ratio}, full_steps {self.config.full_steps})",
            f"  MACs {_si(self.macs)} of {_si(self.macs_dense)} dense: "
            f"{100 * self.mac_fraction:.1f}% ({self.mac_speedup:.2f}x ideal speedup)",
            f"  caches {self.cache_bytes / 2**20:,.2f} MiB" + (f" (forecast {self.config.forecast})"
                                                               if self.config.forecast != "none" else ""),
            "  step  mode    tokens/sample",
        ]
        if self.steps and not pruned:
            lines.insert(1, f"  no step was pruned: full_steps {self.config.full_steps} >= the {len(self.steps)} steps "
                            "of this generation")
        lines += [f"  {s.step:>4}  {s.mode:<6}  {s.tokens:>6}" for s in self.steps]
        return "\n".join(lines)


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} "
