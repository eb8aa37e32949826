"""Research prototype, not part of the package: which per-token quantity a skipped token's output
should be forecast from, at CAT-F's schedule with no token computed between refresh steps.

- "noise": the model output (what CAT-F's noise cache forecasts today);
- "delta": the last block's hidden state minus the embedded input, h_L - h_0: the skipped
  token's output is then norm_out(h_0(x_t) + forecast, temb_t) -> proj_out, so the current
  latent and the current timestep's output modulation enter exactly, for one cache of the hidden
  width per token;
- "branch": every block's attention and feed-forward outputs (diffusers' TaylorSeer mechanism,
  norms and gates fresh), one cache per block output.

Every row is computed and the skipped rows are overwritten by their forecast, so it measures
quality only. Forecasts are per token from the last full/refresh steps (all tokens share them
here), Newton through the last two (order 1) or three (order 2), the step past the last
computation multiplied by `damping`, as cat_pruning.cache does.

    python bench/experiments/output_forecast.py --prompts 8 --runs '[{"target": "delta"}]'

Run fields: target, order (2), damping (0.8), and any CATConfig schedule field (full_steps,
refresh_every, refresh_offset, final_full_steps, refresh_phase).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

from heldout import HeldOut  # noqa: E402

from cat_pruning import CATConfig  # noqa: E402

SCHEDULE = ("full_steps", "refresh_every", "refresh_offset", "final_full_steps", "refresh_phase")


class Newton:
    """One tensor's forecast from its last computations (times are step indices)."""

    def __init__(self, order: int, damping: float) -> None:
        self.order, self.damping = order, damping
        self.points: list[tuple[int, torch.Tensor]] = []

    def record(self, s: int, x: torch.Tensor) -> None:
        self.points = [*self.points[-self.order:], (s, x.detach().clone())]

    def __call__(self, s: int) -> torch.Tensor:
        (t0, v0) = self.points[-1]
        h = s - t0
        if len(self.points) < 2:
            return v0
        t1, v1 = self.points[-2]
        s1 = (v0 - v1) / (t0 - t1)
        if self.order == 1 or len(self.points) < 3:
            return v0 + self.damping * h * s1
        t2, v2 = self.points[-3]
        s0 = (v1 - v2) / (t1 - t2)
        curv = (s1 - s0) / (t0 - t2)
        return v0 + self.damping * h * (s1 + (h + (t0 - t1)) * curv)


class OutputForecast:
    """Hooks on an SD3 transformer: record at full steps, overwrite by the forecast at skipped ones."""

    def __init__(self, model, run: dict, num_steps: int) -> None:
        self.cfg = CATConfig(**{k: run[k] for k in SCHEDULE if k in run})
        self.target, self.num_steps = run["target"], num_steps
        self.order, self.damping = run.get("order", 2), run.get("damping", 0.8)
        self.fc: dict[str, Newton] = {}
        self.step = -1
        self.handles = [model.register_forward_pre_hook(self._begin)]
        if self.target == "noise":
            self.handles.append(model.proj_out.register_forward_hook(self._replace("noise")))
        elif self.target == "delta":
            self.handles.append(model.pos_embed.register_forward_hook(self._embedded))
            self.handles.append(model.norm_out.register_forward_pre_hook(self._delta))
        elif self.target == "branch":
            for i, block in enumerate(model.transformer_blocks):
                for name in ("attn", "ff", "ff_context"):
                    mod = getattr(block, name, None)
                    if mod is not None:
                        self.handles.append(mod.register_forward_hook(self._replace(f"{i}.{name}")))
        else:
            raise ValueError(f"unknown target {self.target!r}")

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def full(self) -> bool:
        return self.cfg.mode(self.step, self.num_steps) != "pruned"

    def _begin(self, module, args):
        self.step += 1

    def _one(self, key: str, x: torch.Tensor) -> torch.Tensor:
        fc = self.fc.setdefault(key, Newton(self.order, self.damping))
        if self.full():
            fc.record(self.step, x)
            return x
        return fc(self.step)

    def _replace(self, key: str):
        def hook(module, args, out):
            if isinstance(out, tuple):
                return tuple(o if o is None else self._one(f"{key}/{j}", o) for j, o in enumerate(out))
            return self._one(key, out)

        return hook

    def _embedded(self, module, args, out):
        self.h0 = out

    def _delta(self, module, args):
        x, *rest = args
        return (self.h0 + self._one("delta", x - self.h0), *rest)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--caption-seed", type=int, default=950_000, help="first scene-generator seed of the prompts")
    ap.add_argument("--runs", required=True, help="JSON list of runs (see the module docstring)")
    args = ap.parse_args(argv)
    held = HeldOut(args.prompts, args.steps, args.caption_seed)
    for run in json.loads(args.runs):
        t0 = time.time()

        def each(prompt: str, run=run) -> torch.Tensor:
            of = OutputForecast(held.pipe.transformer, run, args.steps)
            try:
                return held.generate(prompt)
            finally:
                of.remove()

        full = sum(CATConfig(**{k: run[k] for k in SCHEDULE if k in run}).mode(s, args.steps) != "pruned"
                   for s in range(args.steps))
        held.score(run, each, t0, f"full steps {full}/{args.steps}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
