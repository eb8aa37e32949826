"""Research prototype, not part of the package: the output forecast's step scaled per pruned step
by what the step's computed tokens show (a least-squares fit of one multiplier per sample).

At a pruned step the output cache forecasts every token as base + delta (delta = damping x
horizon x slope). The K computed tokens also have their exact rows `new`, so one scalar per
sample, lam = sum <new - base, delta> / sum |delta|^2 over the computed tokens (clamped to
[lo, hi]), says how far along its forecast direction the step really went; the skipped tokens
then read base + lam x delta. A fixed damping guesses lam once for every step; this measures it
each step, from K tokens (with forecast_from="refresh" those rows change nothing else).

Settings are config_sweep.py's JSON objects, plus "calibrate": [lo, hi] (absent: the package as
is) and "calibrate_kv": true (every layer's K/V forecast fitted the same way, one multiplier per
layer, sample and K or V).

    python bench/experiments/calibrated_forecast.py --model photos --first 32 --count 8 --seed 2 '[
      {"keep_ratio": 0.05, "full_steps": 3, "refresh_every": 4, "refresh_offset": 2, "final_full_steps": 1,
       "forecast_order": 1, "forecast_damping": 1.0, "calibrate": [0, 1.5]}]'
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality_models  # noqa: E402

import cat_pruning  # noqa: E402
from cat_pruning import cache as cache_mod  # noqa: E402
from cat_pruning.metrics import psnr  # noqa: E402

BOUNDS: list[float] | None = None  # the active setting's [lo, hi], None: no calibration
KV = False  # also calibrate every layer's K/V forecast
FITTED: list[float] = []  # every fitted output multiplier (the mean over the batch), for the log

_output, _kv = cache_mod.ForecastStore.output, cache_mod.ForecastStore.kv


def _calibrated(new: torch.Tensor, base: torch.Tensor, forecast: torch.Tensor, idx: torch.Tensor,
                dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """base + lam x (forecast - base) with lam (B,) fitted on the computed rows idx (B, K) along
    token dim `dim`, the computed rows `new` in place -> (rows, lam)."""
    b, delta = base.float(), forecast.float() - base.float()
    shape = [*idx.shape[:1], *([1] * (dim - 1)), idx.shape[1], 1]
    index = idx.view(shape).expand(*base.shape[:dim], idx.shape[1], base.shape[-1])
    r = new.float() - b.gather(dim, index)
    d = delta.gather(dim, index)
    dims = tuple(range(1, base.dim()))
    lam = ((r * d).sum(dims) / d.square().sum(dims).clamp_min(1e-30)).clamp(*BOUNDS)
    full = (b + lam.view(-1, *([1] * (base.dim() - 1))) * delta).to(base.dtype)
    return full.scatter(dim, index, new.to(base.dtype)), lam


def _active(store: cache_mod.ForecastStore) -> bool:
    return BOUNDS is not None and store.mode == "pruned" and store.config.forecast_from == "refresh"


def calibrated_output(self: cache_mod.ForecastStore, out: torch.Tensor) -> torch.Tensor:
    if not _active(self):
        return _output(self, out)
    full, lam = _calibrated(out, self.noise, self.forecast_output(), self.idx, 1)
    FITTED.append(float(lam.mean()))
    _output(self, out)  # the store's own bookkeeping (its read buffer is not used)
    return full


def calibrated_kv(self: cache_mod.ForecastStore, name: str, key: torch.Tensor, value: torch.Tensor):
    if not (KV and _active(self)):
        return _kv(self, name, key, value)
    kb, vb = self.kv_cache[name]
    dim = cache_mod._token_dim(kb.shape)
    fk, fv = self._forecast(f"{name}/k", 0), self._forecast(f"{name}/v", 0)
    _kv(self, name, key, value)
    return _calibrated(key, kb, fk, self.idx, dim)[0], _calibrated(value, vb, fv, self.idx, dim)[0]


cache_mod.ForecastStore.output = calibrated_output
cache_mod.ForecastStore.kv = calibrated_kv


def main() -> None:
    global BOUNDS, KV
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", help="JSON list of CATConfig overrides, each with an optional calibrate")
    parser.add_argument("--model", choices=sorted(quality_models.MODELS), default="tiny")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = quality_models.MODELS[args.model]
    pipe = model.load("cpu", torch.float32)
    pipe.set_progress_bar_config(disable=True)
    prompts = model.prompts(args.first + args.count)[args.first:]

    def image(prompt: str) -> torch.Tensor:
        out = pipe(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                   output_type="pt")
        return quality_models.first_image(out)

    dense = [image(p) for p in prompts]
    for setting in json.loads(args.settings):
        setting = dict(setting)
        BOUNDS = setting.pop("calibrate", None)
        KV = setting.pop("calibrate_kv", False)
        FITTED.clear()
        cat_pruning.patch(pipe, backend="torch", **setting)
        values = [psnr(image(p), d) for p, d in zip(prompts, dense, strict=True)]
        s = cat_pruning.stats(pipe)
        cat_pruning.unpatch(pipe)
        fitted = f", lam mean {statistics.fmean(FITTED):.3f} [{min(FITTED):.2f}, {max(FITTED):.2f}]" if FITTED else ""
        print(f"{json.dumps(setting)} calibrate={BOUNDS} kv={KV}: MACs {s.macs / s.macs_dense:.3f}, PSNR mean "
              f"{statistics.fmean(values):.2f} dB, worst {min(values):.2f}{fitted}", flush=True)


if __name__ == "__main__":
    main()
