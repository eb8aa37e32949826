"""Research prototype, not part of the package: what CAT-F would gain by forecasting each block's
branch outputs (attention and feed-forward) instead of the attention K/V rows and the noise.

diffusers' TaylorSeer, as the quality bench runs it on SD3 (cache_identifiers =
transformer_blocks.N.(attn|ff|ff_context)), forecasts every block's attention and feed-forward
outputs at its skipped steps and runs the rest of each block (the timestep-modulated norms, the
gates, the residual adds) fresh. CAT-F forecasts K/V rows inside attention and the model output.
This script measures the TaylorSeer mechanism with CAT's idea on top: at a skipped step, K tokens
per sample get their branch outputs computed exactly and the others are forecast (first order,
per token, from that token's last two computations).

It computes every row and then replaces the skipped rows by their forecast, so its images are
what a compact implementation would produce only approximately: the K computed tokens here attend
over exact K/V of the (forecast) residual stream, where a compact step would attend over forecast
K/V rows. Its MAC fraction is what that compact step would cost (cat_pruning's own accounting of a
pruned step with K rows). Quality only; no timing.

    python bench/experiments/branch_forecast.py --prompts 8 --runs '[{"interval": 3, "warmup": 4, "keep": 0}]'
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

import quality_models  # noqa: E402

from cat_pruning.adapters import find_adapter  # noqa: E402
from cat_pruning.metrics import psnr  # noqa: E402


def is_full(s: int, warmup: int, interval: int) -> bool:
    """TaylorSeer's rule for the steps that run the whole model: the warm-up, then every
    interval-th step."""
    return s < warmup or (s - warmup - 1) % interval == 0


class BranchForecast:
    """Hooks on every SD3 block's attn, ff and ff_context: full steps record, skipped steps forecast."""

    def __init__(self, model, warmup: int, interval: int, keep: int, update_pruned: bool, select: str,
                 damping: float = 1.0):
        self.warmup, self.interval = warmup, interval
        self.keep, self.update_pruned, self.select, self.damping = keep, update_pruned, select, damping
        self.handles = [model.register_forward_pre_hook(self._begin)]
        self.step = -1
        self.state: dict[str, dict] = {}  # "<block>.<module>/<output>" -> base, slope, last
        self.last_image = ""  # the last block's image output: the selection scores its slopes
        for i, block in enumerate(model.transformer_blocks):
            for name in ("attn", "ff", "ff_context"):
                mod = getattr(block, name, None)
                if mod is not None:
                    key = f"{i}.{name}"
                    if name != "ff_context":
                        self.last_image = f"{key}/0"
                    self.handles.append(mod.register_forward_hook(self._hook(key, image=name != "ff_context")))

    def remove(self):
        for h in self.handles:
            h.remove()

    def full(self, s: int) -> bool:
        return is_full(s, self.warmup, self.interval)

    def _begin(self, module, args):
        self.step += 1
        s = self.step
        self.idx = None
        if self.full(s) or not self.state or self.keep == 0:
            return
        last = self.state[self.last_image]
        elapsed = (s - last["last"]).float()  # (B, N)
        if self.select == "drift":  # expected forecast error: |slope| x time since computed
            score = last["slope"].norm(dim=-1) * elapsed
        else:  # stalest first, ties by slope
            score = elapsed * 1e3 + last["slope"].norm(dim=-1)
        half = score.shape[0] // 2
        idx = torch.topk(score[half:], self.keep, dim=1).indices  # scored on the cond half
        self.idx = torch.cat([idx, idx])

    def _hook(self, key: str, image: bool):
        """A module's outputs: the image rows (attn's first output, ff's) per token, the text
        stream's (attn's second output, ff_context's) as a whole."""

        def hook(module, args, out):
            outs = list(out) if isinstance(out, tuple) else [out]
            for j, x in enumerate(outs):
                if x is not None:
                    outs[j] = self._one(f"{key}/{j}", x, per_token=image and j == 0)
            return tuple(outs) if isinstance(out, tuple) else outs[0]

        return hook

    def _one(self, key: str, x: torch.Tensor, per_token: bool) -> torch.Tensor:
        s = self.step
        st = self.state.get(key)
        if st is None:
            n = x.shape[1] if per_token else 1
            self.state[key] = dict(base=x.detach().clone(), slope=torch.zeros_like(x),
                                   last=torch.full((x.shape[0], n), s, dtype=torch.long))
            return x
        if self.full(s):
            dt = (s - st["last"]).float().unsqueeze(-1)
            st["slope"] = (x - st["base"]) / dt
            st["base"] = x.detach().clone()
            st["last"].fill_(s)
            return x
        if not per_token and self.keep:
            return x  # the text stream runs at every CAT step (and is counted in its MACs)
        dt = (s - st["last"]).float().unsqueeze(-1)
        fc = st["base"] + self.damping * st["slope"] * dt
        if not per_token or self.idx is None:
            return fc  # TaylorSeer: nothing computed at a skipped step
        rows = self.idx.unsqueeze(-1).expand(-1, -1, x.shape[-1])
        fresh = x.gather(1, rows)
        if self.update_pruned:
            old = st["base"].gather(1, rows)
            dts = dt.gather(1, self.idx.unsqueeze(-1))
            st["slope"] = st["slope"].scatter(1, rows, (fresh - old) / dts)
            st["base"] = st["base"].scatter(1, rows, fresh)
            st["last"].scatter_(1, self.idx, s)
        return fc.scatter(1, rows, fresh)


def mac_fraction(model, run: dict, steps: int, n: int, text: int) -> float:
    adapter = find_adapter(model)
    dense = adapter.macs_per_sample(model, n, n, text)
    k = run.get("keep", 0)
    pruned = adapter.macs_per_sample(model, k, n, text) if k else 0
    full = sum(is_full(s, run["warmup"], run["interval"]) for s in range(steps))
    return (full + (steps - full) * pruned / dense) / steps


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--steps", type=int, default=28)
    ap.add_argument("--runs", required=True,
                    help="JSON list of {interval, warmup, keep, update_pruned, select, damping}")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from cat_pruning.tiny import load_tiny_pipeline

    pipe = load_tiny_pipeline(device="cpu", dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = quality_models.tiny_prompts(args.prompts)

    def gen(p):
        g = torch.Generator("cpu").manual_seed(0)
        return pipe(p, num_inference_steps=args.steps, generator=g, output_type="pt").images[0]

    cache = Path(f"/tmp/branch_dense_{args.prompts}_{args.steps}.pt")
    dense = torch.load(cache) if cache.exists() else [gen(p) for p in prompts]
    torch.save(dense, cache)
    text = pipe.text_encoder.encode(["x"], device="cpu")[0].shape[1]
    n = (pipe.transformer.config.sample_size // pipe.transformer.config.patch_size) ** 2
    for run in json.loads(args.runs):
        t0 = time.time()
        ims = []
        for p in prompts:
            bf = BranchForecast(pipe.transformer, run["warmup"], run["interval"], run.get("keep", 0),
                                run.get("update_pruned", True), run.get("select", "drift"), run.get("damping", 1.0))
            try:
                ims.append(gen(p))
            finally:
                bf.remove()
        ps = [psnr(a, b) for a, b in zip(ims, dense, strict=True)]
        frac = mac_fraction(pipe.transformer, run, args.steps, n, text)
        print(json.dumps(run), f"MACs {frac:.3f}", f"PSNR {sum(ps) / len(ps):.2f} (worst {min(ps):.2f})",
              f"{time.time() - t0:.0f}s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
