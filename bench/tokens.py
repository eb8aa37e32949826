"""Quality suite, what the token half buys: at equal MACs, CAT-F with a real token budget between
refreshes against CAT-F with one token, each at its best schedule.

    python bench/run.py --suite tokens --model tiny     # 32 prompts x 2 seeds, tuned on 16 others

Every candidate is `patch()`'s defaults with (full_steps, refresh_every) from a grid and a keep
ratio. For each budget (the fraction of the dense MACs, ``--budgets``):

- **one token**: the grid's schedules whose one-token MACs lie within BUDGET_WINDOW of the budget;
- **a token budget**: the grid's cheaper schedules with the keep ratio that brings their MACs to
  the one-token pick's, never above (MACs are linear in the tokens a pruned step computes:
  measured once per schedule at one token and at keep 0.5), kept when that ratio is between
  MIN_KEEP and MAX_KEEP.

Each side's pick is the candidate of the best mean PSNR on the tuning prompts (``--tune-prompts``
captions after the scored ones, seed 0; never scored); the two picks are then scored on the
suite's items (the same prompts and seeds as the curve and quality suites). A record per pick:
schedule, keep ratio, MACs, PSNR mean / worst, SSIM, per-image PSNR, and its tuning log; the
token-budget record also carries the difference of means and the images on which it is higher.
Writes JSON, a Markdown table and a PNG plot side by side; without --json they go to
bench/results/local/ (git-ignored).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import quality_models
from quality_models import LOCAL_RESULTS

BUDGETS = (0.35, 0.44, 0.51, 0.65)
GRID = tuple((f, r) for f in (4, 6, 8) for r in (2, 3, 4, 5, 6))  # (full_steps, refresh_every)
BUDGET_WINDOW = 0.03  # one-token schedules within this MAC fraction of a budget compete for it
MIN_KEEP, MAX_KEEP = 0.05, 0.5  # "a token budget": K >= 5% of N (the bar), at most half
TARGET_DB = 0.5  # the token budget should win by this much at two budgets or more


def parse_suite_args(args: argparse.Namespace) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bench/run.py --suite tokens", add_help=False)
    p.add_argument("--model", default="tiny", choices=sorted(quality_models.MODELS))
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--tune-prompts", type=int, default=16)
    p.add_argument("--budgets", default=",".join(map(str, BUDGETS)))
    opts, unknown = p.parse_known_args(getattr(args, "extra", []) or [])
    if unknown:
        raise SystemExit(f"bench tokens: unknown options {unknown}")
    if min(opts.prompts, opts.seeds, opts.tune_prompts) < 1:
        raise SystemExit("bench tokens: --prompts, --seeds and --tune-prompts must be >= 1")
    opts.budget_list = [float(b) for b in opts.budgets.split(",") if b]
    if not all(0 < b < 1 for b in opts.budget_list):
        raise SystemExit(f"bench tokens: budgets are fractions of the dense MACs in (0, 1), got {opts.budgets}")
    return opts


def results_path(args: argparse.Namespace) -> Path:
    opts = parse_suite_args(args)
    return LOCAL_RESULTS / f"{quality_models.get(opts.model).results_stem}-tokens-{args.device}.json"


def solve_keep(mac_one: float, mac_half: float, target: float, num_tokens: int) -> float | None:
    """The keep ratio (a whole number of tokens over N) whose MACs are at most `target`, from a
    schedule's MACs at one token and at keep 0.5; None when no ratio fits the token-budget range."""
    per_token = (mac_half - mac_one) / (math.ceil(0.5 * num_tokens) - 1)
    tokens = 1 + math.floor((target - mac_one) / per_token + 1e-9)
    keep = tokens / num_tokens
    return keep if MIN_KEEP <= keep <= MAX_KEEP else None


def run(args: Any) -> list[dict]:
    import cat_pruning

    opts = parse_suite_args(args)
    model = quality_models.get(opts.model)
    generate = quality_models.Generator(model, args.device, args.seed, "tokens")
    steps = generate.steps
    captions = model.prompts(opts.prompts + opts.tune_prompts)
    scored = [(p, s) for p in captions[:opts.prompts] for s in range(opts.seeds)]
    tuning = [(p, 0) for p in captions[opts.prompts:]]

    base = cat_pruning.CATConfig()
    one_token = 1e-9  # ceil(keep * N) = 1

    def config(schedule: tuple[int, int], keep: float) -> Any:
        return base.replace(full_steps=schedule[0], refresh_every=schedule[1], keep_ratio=keep)

    # MACs of every schedule at one token and at keep 0.5 (one generation each: MACs do not depend on the prompt)
    runs = {s: [generate.measure(config(s, k), tuning[:1]) for k in (one_token, 0.5)] for s in GRID}
    macs = {s: tuple(r["mac_fraction"] for r in rs) for s, rs in runs.items()}
    num_tokens = runs[GRID[0]][0]["num_tokens"]
    dense_tune = [generate(it) for it in tuning]
    dense_scored = [generate(it) for it in scored]
    tuned: dict[tuple, dict] = {}

    def tune(cfg: Any) -> float:
        key = (cfg.full_steps, cfg.refresh_every, cfg.keep_ratio)
        if key not in tuned:
            tuned[key] = generate.measure(cfg, tuning, dense_tune)
        return tuned[key]["psnr_mean"]

    records = []
    for budget in opts.budget_list:
        ones = [config(s, one_token) for s in GRID if abs(macs[s][0] - budget) <= BUDGET_WINDOW]
        if not ones:
            raise SystemExit(f"bench tokens: no schedule of the grid costs {budget:.0%} MACs at one token")
        one = max(ones, key=tune)
        target = macs[(one.full_steps, one.refresh_every)][0]
        many = []
        for s in GRID:
            keep = solve_keep(*macs[s], target, num_tokens)
            if keep is not None:
                many.append(config(s, keep))
        picks = [("one token", one, ones)]
        if many:
            picks.append(("token budget", max(many, key=tune), many))
        side_records = []
        for side, cfg, candidates in picks:
            result = generate.measure(cfg, scored, dense_scored)
            log = [dict(full_steps=c.full_steps, refresh_every=c.refresh_every, keep_ratio=c.keep_ratio,
                        tune_psnr=tune(c)) for c in candidates]  # fmt: skip
            side_records.append(dict(suite="tokens", model=opts.model, budget=budget, side=side,
                                     full_steps=cfg.full_steps, refresh_every=cfg.refresh_every,
                                     keep_ratio=cfg.keep_ratio, tuning=log, items=len(scored),
                                     tune_items=len(tuning), steps=steps, **result))  # fmt: skip
        if len(side_records) == 2:
            a, b = side_records
            b["minus_one_token_db"] = b["psnr_mean"] - a["psnr_mean"]
            b["higher_on"] = sum(x > y for x, y in zip(b["psnr"], a["psnr"], strict=True))
        for r in side_records:
            r.update(provider=r["side"], check="n/a",
                     case=f"{budget:.0%} {r['side']}: full {r['full_steps']}, refresh every {r['refresh_every']}, "
                          f"{r['tokens_kept']} tokens, {r['mac_fraction']:.1%} MACs, "
                          f"PSNR {r['psnr_mean']:.2f} (worst {r['psnr_worst']:.2f}) dB")
        records += side_records
    generate.bar.close()
    json_path = Path(getattr(args, "json", None) or results_path(args))
    write_report(records, json_path.with_suffix(".md"), json_path.with_suffix(".png"), model, opts)
    return records


def write_report(records: list[dict], md_path: Path, png_path: Path, model: Any, opts: Any) -> None:
    md_path.parent.mkdir(parents=True, exist_ok=True)
    r0 = records[0]
    lines = [
        f"# What the token half buys: {model.plot_title}",
        "",
        f"CAT-F (`patch()`'s defaults, schedule and keep ratio tuned) at equal MACs: the best schedule computing one "
        f"token between refreshes against the best computing {MIN_KEEP:.0%} to {MAX_KEEP:.0%} of the tokens. "
        f"Tuned on {r0['tune_items']} held-out prompts; scored on {r0['items']} images ({opts.prompts} prompts x "
        f"{opts.seeds} seeds), {r0['steps']} steps, PSNR/SSIM against the dense image.",
        "",
        "| budget | side | schedule | tokens per pruned step | MACs | PSNR mean (worst) | SSIM "
        "| token budget - one token | higher on |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    wins = 0
    for r in records:
        diff = r.get("minus_one_token_db")
        wins += diff is not None and diff >= TARGET_DB
        versus = "| |" if diff is None else f"| {diff:+.2f} dB | {r['higher_on']} of {r['items']} |"
        lines.append(
            f"| {r['budget']:.0%} | {r['side']} | full {r['full_steps']}, refresh every {r['refresh_every']} | "
            f"{r['tokens_kept']} | {r['mac_fraction']:.1%} | {r['psnr_mean']:.2f} ({r['psnr_worst']:.2f}) | "
            f"{r['ssim_mean']:.4f} {versus}")
    lines += ["", f"The token budget wins by >= {TARGET_DB} dB at {wins} of {len(opts.budget_list)} budgets.", ""]
    md_path.write_text("\n".join(lines))
    title = f"CAT-F at equal MACs, one token vs a token budget: {model.plot_title}"
    with quality_models.psnr_plot(png_path, title) as ax:
        if ax is None:
            return
        for side, marker in (("one token", "o-"), ("token budget", "s-")):
            rs = [r for r in records if r["side"] == side]
            ax.plot([r["mac_fraction"] for r in rs], [r["psnr_mean"] for r in rs], marker, label=side)
