"""Quality suite, the keep-ratio curve: does computing more tokens ever make CAT-F's images worse?

    python bench/run.py --suite curve --model tiny     # 32 prompts x 2 seeds, the shipped scene model
    python bench/run.py --suite curve --model photos   # the photo model (Flux architecture)

One CAT-F schedule (``patch()``'s defaults, or ``--config k=v,...`` on top of them) at every keep
ratio of ``--keeps`` (default: 1 token, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0), each scored
by PSNR and SSIM against the dense image of the same prompt and seed over the quality suite's
items (the same prompts and seeds). A record per keep ratio: MAC fraction (cat_pruning.stats),
mean / worst PSNR, mean SSIM, and the largest drop of the mean below the best mean at any
smaller keep ratio (the "more tokens never worse" check: the README asks for at most 0.3 dB).
Writes JSON (records), Markdown (table) and a PNG plot (PSNR against keep ratio) side by side;
without --json they go to bench/results/local/ (git-ignored).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import quality_models
from quality_base import config_overrides
from quality_models import LOCAL_RESULTS

KEEPS = ("1tok", 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
MONOTONE_TOLERANCE_DB = 0.3


def parse_suite_args(args: argparse.Namespace) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py --suite curve", add_help=False)
    p.add_argument("--model", default="tiny", choices=sorted(quality_models.MODELS))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--keeps", default=",".join(map(str, KEEPS)),
                   help="comma-separated keep ratios; '1tok' is one token per pruned step")
    p.add_argument("--config", default="", help="CATConfig fields on top of patch()'s defaults: k=v,k=v")
    opts, unknown = p.parse_known_args(getattr(args, "extra", []) or [])
    if unknown:
        raise SystemExit(f"bench curve: unknown options {unknown}")
    if opts.prompts < 1 or opts.seeds < 1:
        raise SystemExit("bench curve: --prompts and --seeds must be >= 1")
    opts.keep_list = [k if k == "1tok" else float(k) for k in opts.keeps.split(",") if k]
    opts.overrides = config_overrides([kv for kv in opts.config.split(",") if kv])
    return opts


def results_path(args: argparse.Namespace) -> Path:
    opts = parse_suite_args(args)
    stem = quality_models.get(opts.model).results_stem
    return LOCAL_RESULTS / f"{stem}-curve-{args.device}.json"


def monotone_drops(means: list[float]) -> list[float]:
    """For each point, how far its mean lies below the best mean at any smaller keep ratio (0 if not)."""
    drops, best = [], float("-inf")
    for m in means:
        drops.append(max(0.0, best - m))
        best = max(best, m)
    return drops


def run(args: Any) -> list[dict]:
    import cat_pruning

    opts = parse_suite_args(args)
    model = quality_models.get(opts.model)
    items = [(p, s) for p in model.prompts(opts.prompts) for s in range(opts.seeds)]
    generate = quality_models.Generator(model, args.device, args.seed, "curve",
                                        total=len(items) * (1 + len(opts.keep_list)), steps=opts.steps)  # fmt: skip
    steps, guidance = generate.steps, generate.guidance

    dense = [generate(it) for it in items]
    records = []
    base = cat_pruning.CATConfig().replace(**opts.overrides)
    for keep in opts.keep_list:
        cfg = base.replace(keep_ratio=1e-9 if keep == "1tok" else keep)
        result = generate.measure(cfg, items, dense)
        records.append(dict(suite="curve", model=opts.model, keep=keep, tokens_kept=result["tokens_kept"],
                            config={k: v for k, v in vars(cfg).items() if k != "backend"},
                            mac_fraction=result["mac_fraction"], psnr_mean=result["psnr_mean"],
                            psnr_worst=result["psnr_worst"], ssim_mean=result["ssim_mean"], psnr=result["psnr"],
                            items=len(items), steps=steps, guidance=guidance))  # fmt: skip
    generate.bar.close()
    for r, drop in zip(records, monotone_drops([r["psnr_mean"] for r in records]), strict=True):
        r["drop_below_best_smaller"] = drop
        r.update(provider="catf", check="n/a",
                 case=f"keep {r['keep']} ({r['tokens_kept']} tokens): {r['mac_fraction']:.1%} MACs, PSNR "
                      f"{r['psnr_mean']:.2f} (worst {r['psnr_worst']:.2f}) dB, {drop:.2f} dB below a smaller keep")
    json_path = Path(getattr(args, "json", None) or results_path(args))
    write_report(records, json_path.with_suffix(".md"), json_path.with_suffix(".png"), model, opts)
    return records


def write_report(records: list[dict], md_path: Path, png_path: Path, model: Any, opts: Any) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    r0 = records[0]
    worst_drop = max(r["drop_below_best_smaller"] for r in records)
    lines = [
        f"# CAT-F keep-ratio curve: {model.plot_title}",
        "",
        f"{r0['items']} images ({opts.prompts} prompts x {opts.seeds} seeds), {r0['steps']} steps, guidance "
        f"{r0['guidance']}; PSNR/SSIM against the dense image of the same prompt and seed. Schedule: "
        f"`patch()`'s defaults{' with ' + opts.config if opts.config else ''}.",
        "",
        "| keep_ratio | tokens per pruned step | MACs | PSNR mean (worst) | SSIM | below the best smaller keep |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        lines.append(f"| {r['keep']} | {r['tokens_kept']} | {r['mac_fraction']:.1%} | {r['psnr_mean']:.2f} "
                     f"({r['psnr_worst']:.2f}) | {r['ssim_mean']:.4f} | {r['drop_below_best_smaller']:.2f} dB |")
    verdict = "holds" if worst_drop <= MONOTONE_TOLERANCE_DB else "FAILS"
    lines += ["", f"More tokens never worse (no mean more than {MONOTONE_TOLERANCE_DB} dB below a smaller keep "
                  f"ratio's): {verdict}, largest drop {worst_drop:.2f} dB.", ""]  # fmt: skip
    md_path.write_text("\n".join(lines))
    with quality_models.psnr_plot(png_path, f"CAT-F, more tokens per pruned step: {model.plot_title}") as ax:
        if ax is None:
            return
        finite = [r for r in records if r["psnr_mean"] < 100]  # keep 1.0 equals dense: PSNR is capped, not plotted
        x = [r["mac_fraction"] for r in finite]
        ax.plot(x, [r["psnr_mean"] for r in finite], "o-", label="mean")
        ax.plot(x, [r["psnr_worst"] for r in finite], "s--", alpha=0.6, label="worst image")
        for r in finite:
            ax.annotate(str(r["keep"]), (r["mac_fraction"], r["psnr_mean"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=7)
