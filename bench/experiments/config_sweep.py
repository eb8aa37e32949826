"""Research helper, not part of the package: PSNR against dense of a few CATConfig settings on a
shipped model, on prompts of your choosing (quick probes before a full quality-suite run).

Each setting is a JSON object of CATConfig fields for cat_pruning.patch(pipe, ...). Prints, per
setting, the MAC fraction (stats()) and the mean and worst PSNR against the dense image of the
same prompt and seed.

The numbers cited in CATConfig's docs for output_cache and slope_dtype came from:

    # photo model, 8 prompts after the bench's 32 (generator seed 2), TaylorSeer's 44% schedule
    python bench/experiments/config_sweep.py --model photos --first 32 --count 8 --seed 2 '[
      {"keep_ratio": 0.0009, "full_steps": 3, "refresh_every": 3, "refresh_offset": 2, "final_full_steps": 1,
       "forecast_order": 1, "forecast_damping": 1.0, "output_cache": "hidden"},
      {"keep_ratio": 0.0009, "full_steps": 3, "refresh_every": 3, "refresh_offset": 2, "final_full_steps": 1,
       "forecast_order": 1, "forecast_damping": 1.0, "output_cache": "noise"}]'
    # bf16 slopes: the models in bfloat16, the bench's first 16 prompts, seed 0
    python bench/experiments/config_sweep.py --model tiny --count 16 --dtype bfloat16 '[
      {"slope_dtype": "float32"}, {"slope_dtype": "cache"},
      {"keep_ratio": 0.2, "slope_dtype": "float32"}, {"keep_ratio": 0.2, "slope_dtype": "cache"}]'
    # the output cache's forecast state in the cache's dtype: the same command at the commits
    # before and after (bench/results/sweep-output-state-dtype-cpu.txt)
    python bench/experiments/config_sweep.py --model tiny|photos --count 16 --dtype bfloat16 --per-image '[
      {}, {"keep_ratio": 0.2}]'
    # fp8 K/V caches (kv_dtype): the same, each setting with bf16 and with fp8 caches; PAPER stands
    # for the paper's CAT, {"keep_ratio": 0.3, "full_steps": 8, "forecast": "none", "refresh_every": 0,
    # "final_full_steps": 0, "selection": "cat", "output_cache": "noise"}
    python bench/experiments/config_sweep.py --model tiny|photos|video --count 16 --dtype bfloat16 '[
      {}, {"kv_dtype": "float8"}, {"keep_ratio": 0.2}, {"keep_ratio": 0.2, "kv_dtype": "float8"},
      PAPER, PAPER + {"kv_dtype": "float8"}]'
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
from cat_pruning.metrics import psnr  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("settings", help="JSON list of CATConfig overrides")
    parser.add_argument("--model", choices=sorted(quality_models.MODELS), default="tiny")
    parser.add_argument("--first", type=int, default=0, help="index of the first prompt of the model's list")
    parser.add_argument("--count", type=int, default=8, help="prompts")
    parser.add_argument("--seed", type=int, default=0, help="generator seed of every image")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--per-image", action="store_true", help="also print every image's PSNR (a JSON list)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = quality_models.MODELS[args.model]
    pipe = model.load("cpu", getattr(torch, args.dtype))
    pipe.set_progress_bar_config(disable=True)
    prompts = model.prompts(args.first + args.count)[args.first:]

    def image(prompt: str) -> torch.Tensor:
        out = pipe(prompt, num_inference_steps=args.steps, generator=torch.Generator().manual_seed(args.seed),
                   output_type="pt")
        return quality_models.first_image(out)

    dense = [image(p) for p in prompts]
    for setting in json.loads(args.settings):
        cat_pruning.patch(pipe, backend="torch", **setting)
        values = [psnr(image(p), d) for p, d in zip(prompts, dense, strict=True)]
        s = cat_pruning.stats(pipe)
        cat_pruning.unpatch(pipe)
        print(f"{json.dumps(setting)}: MACs {s.macs / s.macs_dense:.3f}, PSNR mean {statistics.fmean(values):.2f} dB, "
              f"worst {min(values):.2f}" + (f", per image {json.dumps([round(v, 3) for v in values])}"
                                            if args.per_image else ""), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
