"""Research prototype, not part of the package: ClusCa-style error propagation (arXiv 2509.10312)
on CAT-F. At a pruned step the computed tokens' outputs differ from their forecasts; add that
difference, averaged per k-means cluster ("cluster"), over the whole image ("global") or
Gaussian-weighted by distance ("idw<sigma>", sigma in tokens), times `lam`, to the forecast of
every skipped token of the step ("none": CAT-F as it is).

Measured first, offline on dense trajectories (4 prompts, the forecast error at skipped steps
against the dense output): a per-cluster mean of the true error holds 27-49% of its energy at 20
clusters, the global mean 17-31%, so a correction could pay if the computed tokens revealed it.

    python bench/experiments/error_propagation.py --runs '[{"keep_ratio": 0.05, "selection": "random",
        "how": "cluster", "lam": 0.5, "full_steps": 6, "refresh_every": 3, "final_full_steps": 1}]'

Run fields: how, lam, and any CATConfig field.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from heldout import HeldOut

import cat_pruning
from cat_pruning import state as cat_state

CORRECTION = {"how": "none", "lam": 1.0}


def correction(state, store, out: torch.Tensor) -> torch.Tensor:
    """(B, N, C) to add to the step's output: the computed rows' forecast error spread to the others."""
    how, lam = CORRECTION["how"], CORRECTION["lam"]
    idx = store.idx
    err = out.float() - store.forecast_output(idx).float()  # (B, K, C)
    b, n, c = store.noise.shape
    if how == "global":
        corr = err.mean(1, keepdim=True).expand(b, n, c)
    elif how == "cluster":
        labels = torch.cat([state.labels, state.labels]) if state.cfg_pairs else state.labels  # (B, N)
        picked = labels.gather(1, idx)
        count = state.num_clusters
        sums = torch.zeros(b, count, c).scatter_add_(1, picked.unsqueeze(-1).expand(-1, -1, c), err)
        hits = torch.zeros(b, count).scatter_add_(1, picked, torch.ones_like(picked, dtype=torch.float32))
        corr = (sums / hits.clamp_min(1).unsqueeze(-1)).gather(1, labels.unsqueeze(-1).expand(-1, -1, c))
    else:  # idw<sigma>
        sigma = float(how[3:])
        pos = state._token_positions(out.device)
        d2 = ((pos[None, :, None] - pos[idx][:, None]) ** 2).sum(-1)  # (B, N, K)
        w = torch.exp(-d2 / (2 * sigma**2))
        corr = (w @ err) / w.sum(-1, keepdim=True).clamp_min(1e-6)
    skipped = torch.ones(b, n, 1).scatter_(1, idx.unsqueeze(-1), 0.0)
    return lam * corr * skipped


_on_output = cat_state.CATState._image_output


def _image_output(self, out: torch.Tensor) -> torch.Tensor:
    if CORRECTION["how"] == "none" or not (self.caching and self.mode == "pruned"):
        return _on_output(self, out)
    store, output = self.cache, self.cache.output
    store.output = lambda o: (output(o).float() + correction(self, store, o)).to(o.dtype)
    try:
        return _on_output(self, out)
    finally:
        del store.output


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--runs", required=True, help="JSON list of runs (see the module docstring)")
    args = ap.parse_args(argv)
    held = HeldOut(args.prompts, args.steps)
    cat_state.CATState._image_output = _image_output
    for run in json.loads(args.runs):
        t0 = time.time()
        config = {k: v for k, v in run.items() if k not in CORRECTION}
        CORRECTION.update(how=run.get("how", "none"), lam=run.get("lam", 1.0))
        macs = []

        def each(prompt: str, config=config, macs=macs) -> torch.Tensor:
            with cat_pruning.patched(held.pipe, **config):
                image = held.generate(prompt)
                macs.append(cat_pruning.stats(held.pipe).mac_fraction)
            return image

        held.score(run, each, t0, lambda macs=macs: f"MACs {sum(macs) / len(macs):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
