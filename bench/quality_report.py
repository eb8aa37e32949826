"""Quality suite, the report: the Markdown table and its reading (one paragraph generated from the
numbers), the PSNR-against-MACs plot, the example grid dense | CAT | best peer, and the console
summary. Reads only the records (and the example images); measures nothing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from quality_base import TUNING_LOGS
from quality_models import LOCAL_RESULTS, QualityModel

import cat_pruning


def output_paths(json_arg: Path | None, model: QualityModel, device: str) -> tuple[Path, Path, Path, Path]:
    """(json, markdown, plot, examples): bench/results/local/<stem>-<device>.* (git-ignored) without
    --json, else next to it. The example grid is <json stem>-examples.png, except next to a JSON of
    the default name (<stem>-<device>.json), where it is the model's examples_name, so that
    ``--json bench/results/quality-cpu.json`` updates the committed bench/results/quality-examples.png."""
    default_name = f"{model.results_stem}-{device}.json"
    json_path = json_arg or LOCAL_RESULTS / default_name
    examples_path = (json_path.with_name(model.examples_name) if json_path.name == default_name
                     else json_path.with_name(json_path.stem + "-examples.png"))  # fmt: skip
    return json_path, json_path.with_suffix(".md"), json_path.with_suffix(".png"), examples_path


def write_outputs(records: list[dict], shape: dict, opts: Any, model: QualityModel, json_arg: Path | None,
                  device: str, examples: dict[str, dict[int, torch.Tensor]], names: dict[str, str],
                  items: list[tuple[str, int]], ref: str) -> dict[str, str]:  # fmt: skip
    """Writes the Markdown, the plot and the example grid; returns their paths by kind.
    names: method id -> display name of the methods that ran."""
    _, md_path, plot_path, examples_path = output_paths(json_arg, model, device)
    md_path.parent.mkdir(parents=True, exist_ok=True)
    outputs = {"markdown": str(md_path)}
    plot_note = write_plot(records, plot_path, shape, model)
    if plot_note is None:
        outputs["plot"] = str(plot_path)
    best_peer = max((r for r in records if r["group"] == "peer" and r.get("status") == "ok"
                     and r["matched_to"] == ref), key=lambda r: r["psnr_mean"], default=None)  # fmt: skip
    cols = [("dense", "dense"), (ref, names.get(ref, ""))]
    if best_peer is not None:
        cols.append((best_peer["provider"], best_peer["name"]))
    cols = [(k, label) for k, label in cols if k in examples and len(examples[k]) == len(items)]
    # rows: the first prompts (seed 0), then the image on which the reference CAT setting scores worst
    rows = list(range(0, len(items), opts.seeds))[: max(1, opts.examples - 1)]
    by_rec = {r["provider"]: r for r in records}
    if ref in by_rec and "per_item" in by_rec[ref]:
        worst = min(range(len(items)), key=lambda i: by_rec[ref]["per_item"][i]["psnr"])
        rows = [i for i in range(0, len(items), opts.seeds) if i != worst][: max(0, opts.examples - 1)] + [worst]

    def caption(i: int) -> str:
        db = ", ".join(f"{label.split(' ')[0] if k == ref else 'peer'} {by_rec[k]['per_item'][i]['psnr']:.1f} dB"
                       for k, label in cols[1:])  # fmt: skip
        tail = " - worst for CAT" if by_rec.get(ref, {}).get("per_item") and i == rows[-1] else ""
        return f"{items[i][0]} (seed {items[i][1]}){tail}: {db}"

    write_examples(examples, cols, [(i, caption(i)) for i in rows], examples_path)
    outputs["examples"] = str(examples_path)
    md_path.write_text(markdown(records, shape, opts, plot_note, examples_path, plot_path, model))
    return outputs


def _settings(r: dict) -> str:
    def value(v) -> str:  # a list of numbers (MagCache's calibrated ratios) is spelled out in the notes
        if isinstance(v, float):
            return f"{v:.4g}"
        return f"[{len(v)} values, in the notes]" if isinstance(v, list) and len(v) > 4 else str(v)

    p = {k: v for k, v in r.get("params", {}).items() if k not in TUNING_LOGS}
    return ", ".join(f"{k}={value(v)}" for k, v in p.items())


def markdown(records: list[dict], shape: dict, opts, plot_note, examples_path: Path, plot_path: Path,
             model: QualityModel) -> str:
    ok = sorted((r for r in records if r.get("status") == "ok"), key=lambda r: (r["mac_fraction"], r["provider"]))
    failed = [r for r in records if r.get("status") != "ok"]
    env = records[0]
    lines = [
        "# Quality benchmark (CPU): CAT Pruning, ablations and caching peers against dense",
        "",
        f"{model.title}, {shape['size']}x{shape['size']} pixels), "
        f"fp32, {shape['prompts']} prompts ({model.prompt_source}) x {shape['seeds']} seeds = {shape['items']} "
        f"images per method, {shape['steps']} steps, guidance {shape['guidance']:g}, {model.call_note}. "
        f"PSNR/SSIM against the dense image of the same prompt and seed (mean and worst over the {shape['items']}). "
        f"MAC fraction: FlopCounterMode over a whole pipeline call with sdpa_kernel(MATH), divided by dense "
        f"(one generation for dense and CAT, whose compute is fixed by their settings; the mean over "
        f"{opts.mac_items} generations for the threshold-driven peers); FlopCounterMode counts matrix products, "
        f"convolutions and attention, not elementwise work such as CAT's selection or TaylorSeer's extrapolation. "
        f"Speedup: CPU wall clock, "
        f"{env['threads']} torch thread(s), dense and every method interleaved prompt by prompt in the same run, "
        f"median over prompts of dense time / method time; on a shared 2-core machine these vary by ~10-20%. "
        f"Peers are tuned to land near the MAC fraction of CAT {env['reference_cat']} "
        f"({env['target_mac_fraction']:.3f}), or of the CAT setting named after their @; schedules are "
        f"picked on {opts.tune_items} held-out tuning prompts (captions after the evaluated ones, generator "
        f"seed {shape['seeds']}), none of them among the images scored. "
        f"CAT kernels backend: `{env['cat_backend']}`"
        + (
            " (the compiled cat_kernels._C extension, its C++ CPU path)."
            if env["cat_backend"] == "cuda" and env["device"] == "cpu"
            else "."
        ),
        "",
        "Reproduce: `python bench/run.py --suite quality" + ("" if model.name == "tiny" else f" --model {model.name}")
        + (" --quick" if opts.quick else "") + "`",
        "",
        "| method | group | MAC fraction | PSNR mean (dB) | PSNR worst | SSIM mean | SSIM worst | CPU speedup "
        "| settings |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in ok:
        frac = f"{r['mac_fraction']:.3f}"
        if r["mac_fraction_max"] - r["mac_fraction_min"] > 1e-4:
            frac += f" ({r['mac_fraction_min']:.3f}-{r['mac_fraction_max']:.3f})"
        q = (
            ("–", "–", "–", "–")
            if "psnr_mean" not in r
            else (f"{r['psnr_mean']:.2f}", f"{r['psnr_worst']:.2f}", f"{r['ssim_mean']:.4f}", f"{r['ssim_worst']:.4f}")
        )
        lines.append(f"| {r['name']} | {r['group']} | {frac} | {' | '.join(q)} | {r['speedup']:.2f}x | "
                     f"{_settings(r)} |")  # fmt: skip
    if failed:
        lines += ["", f"Peers that could not run on this {model.arch} architecture (exact error):", ""]
        lines += [f"- **{r['name']}** (`{r['provider']}`): `{r['error']}`" for r in failed]
    noted = [r for r in records if r.get("notes")]
    if noted:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['name']}: " + "; ".join(r["notes"]) for r in noted]
    lines += ["", "## Reading", "", reading(records), ""]
    if plot_note:
        lines += [f"(No plot: {plot_note}.)", ""]
    else:
        lines += [f"![PSNR against MAC fraction]({plot_path.name})", ""]
    lines += [f"![dense | CAT | best peer]({examples_path.name})", ""]
    if not env.get("dense_reproducible", True):
        lines += ["WARNING: the dense image of the first prompt differed after all methods ran.", ""]
    return "\n".join(lines)


def reading(records: list[dict]) -> str:
    """One paragraph, generated from the numbers: where CAT wins and where it loses."""
    ok = {r["provider"]: r for r in records if r.get("status") == "ok" and "psnr_mean" in r}
    ref = records[0]["reference_cat"]
    arch = records[0].get("arch", "SD3")
    if ref not in ok:
        return "No CAT reference setting ran."
    c = ok[ref]
    which = "the paper default" if ref == "cat:0.3:8" else "the reference setting"
    out = [
        f"CAT at {which} ({c['name']}) computes {100 * c['mac_fraction']:.1f}% of the dense MACs "
        f"and keeps a mean PSNR of {c['psnr_mean']:.2f} dB (worst {c['psnr_worst']:.2f} dB, SSIM "
        f"{c['ssim_mean']:.4f}) at a {c['speedup']:.2f}x CPU speedup (MAC-ideal {1 / c['mac_fraction']:.2f}x)."
    ]
    def matched(r: dict) -> str:  # the CAT setting a peer was tuned to (records without it: the reference)
        return r.get("matched_to", ref)

    peers = [r for r in ok.values() if r["group"] == "peer" and matched(r) in ok]
    # the peers matched to the reference setting first, then those matched to other CAT settings
    for p in sorted(peers, key=lambda r: (matched(r) != ref, ok[matched(r)]["mac_fraction"], -r["psnr_mean"])):
        cp = ok[matched(p)]
        d = cp["psnr_mean"] - p["psnr_mean"]
        verdict = "CAT wins" if d > 0.1 else ("CAT loses" if d < -0.1 else "a tie")
        wins = sum(a["psnr"] > b["psnr"] for a, b in zip(cp["per_item"], p["per_item"], strict=True))
        against = "" if cp is c else f" (matched to {cp['name']}, {100 * cp['mac_fraction']:.1f}%)"
        out.append(
            f"Against {p['name']} at {100 * p['mac_fraction']:.1f}% MACs{against}: {verdict} on mean PSNR by "
            f"{abs(d):.2f} dB (CAT higher on {wins} of {len(cp['per_item'])} images; worst case "
            f"{cp['psnr_worst']:.2f} vs {p['psnr_worst']:.2f} dB; SSIM {cp['ssim_mean']:.4f} vs "
            f"{p['ssim_mean']:.4f}), while the peer runs at {p['speedup']:.2f}x."
        )
    failed = [r for r in records if r.get("status") == "error"]
    if failed:
        out.append(
            f"{', '.join(r['name'] for r in failed)} could not run on {arch} (see above)"
            + (
                ": SD3's last block is context_pre_only and returns None for the text stream, which these hooks "
                "subtract or cache as a tensor."
                if arch == "SD3" and any("NoneType" in r["error"] for r in failed)
                else "."
            )
        )
    abl = [r for r in ok.values() if r["group"] == "ablation" and abs(r["mac_fraction"] - c["mac_fraction"]) < 1e-3
           and not any("same configuration" in n for n in r["notes"])]  # fmt: skip

    def short(r: dict) -> str:
        return r["name"].replace(c["name"], "").strip()

    if abl:
        better = [short(r) for r in abl if r["psnr_mean"] > c["psnr_mean"] + 0.1]
        sel = sorted((r for r in abl if "selection" in r["params"]), key=lambda r: -r["psnr_mean"])
        if sel:
            out.append(
                "Selection ablations at the same budget: "
                + ", ".join(f"{short(r)} {r['psnr_mean']:.2f} dB" for r in sel)
                + f" (full policy {c['psnr_mean']:.2f} dB)."
            )
        clusters = [r for r in abl if "num_clusters" in r["params"]]
        default_clusters = c["params"].get("num_clusters", cat_pruning.CATConfig().num_clusters)
        for r in clusters:
            what = "(one cluster: global quotas, staleness kept) " if r["params"]["num_clusters"] == 1 else ""
            out.append(f"Clustering: {short(r)} {what}{r['psnr_mean']:.2f} dB against {c['psnr_mean']:.2f} dB "
                       f"with {default_clusters} clusters.")
        imp = sorted(
            (r for r in [c, *abl] if set(r["params"]) <= {"keep_ratio", "full_steps", "importance_fraction"}),
            key=lambda r: r["params"].get("importance_fraction", 0.25),
        )
        if len(imp) > 1:
            out.append(
                "By importance_fraction (the share of K chosen by change, the rest by staleness): "
                + ", ".join(f"{r['params'].get('importance_fraction', 0.25):g} -> {r['psnr_mean']:.2f} dB" for r in imp)
                + "."
            )
        ties = [f"{short(r)} (SSIM {r['ssim_mean']:.4f} vs {c['ssim_mean']:.4f})" for r in abl
                if abs(r["psnr_mean"] - c["psnr_mean"]) <= 0.1]  # fmt: skip
        if better:
            out.append(f"{', '.join(better)} beat{'s' if len(better) == 1 else ''} the full policy by more than "
                       "0.1 dB on this model.")  # fmt: skip
        else:
            out.append("No ablation beats the full policy by more than 0.1 dB.")
        if ties:
            out.append(f"Within 0.1 dB of it: {', '.join(ties)}.")
    sweep = sorted((r for r in ok.values() if r["group"] == "cat"), key=lambda r: r["mac_fraction"])
    if len(sweep) > 1:
        out.append(
            "CAT settings, MACs -> PSNR: "
            + ", ".join(f"{r['name'][4:]} {100 * r['mac_fraction']:.0f}% -> {r['psnr_mean']:.1f} dB" for r in sweep)
            + "."
        )
    out += forecast_reading(ok)
    fastest = max((r for r in ok.values() if r["group"] != "dense"), key=lambda r: r["speedup"], default=None)
    if fastest is not None and fastest["provider"] != ref:
        out.append(
            f"On wall clock the fastest method is {fastest['name']} ({fastest['speedup']:.2f}x at "
            f"{100 * fastest['mac_fraction']:.1f}% MACs)."
        )
    eff = sorted(
        (r for r in ok.values() if r["group"] in ("cat", "peer")), key=lambda r: -r["speedup"] * r["mac_fraction"]
    )
    if eff:
        out.append(
            "Measured CPU speedup as a share of the MAC-ideal 1/fraction: "
            + ", ".join(f"{r['name']} {100 * r['speedup'] * r['mac_fraction']:.0f}%" for r in eff)
            + f". On this {'tiny' if arch == 'SD3' else 'small'} model (small matrices, "
            f"{records[0]['threads']} CPU thread(s)) per-op overhead and the "
            "pipeline's fixed costs weigh far more than on a GPU-sized model, and a cache that skips whole blocks "
            "also skips that overhead while token pruning keeps it; these speedups say little about GPU speed."
        )
    return " ".join(out)


def forecast_reading(ok: dict[str, dict]) -> list[str]:
    """Sentences on CAT-F against every peer tuned to the same budget: mean, worst, wins per image."""
    out = []
    for f in sorted((r for r in ok.values() if r["group"] == "catf"), key=lambda r: r["mac_fraction"]):
        settings = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in f["params"].items()
                             if k in ("keep_ratio", "full_steps", "refresh_every", "refresh_offset",
                                      "forecast_kv_damping", "forecast_from", "forecast_order",
                                      "forecast_damping"))  # fmt: skip
        parts = []
        for p in sorted((r for r in ok.values() if r["group"] == "peer" and r.get("matched_to") == f["matched_to"]),
                        key=lambda r: -r["psnr_mean"]):  # fmt: skip
            d = f["psnr_mean"] - p["psnr_mean"]
            wins = sum(a["psnr"] > b["psnr"] for a, b in zip(f["per_item"], p["per_item"], strict=True))
            verdict = "wins" if d > 0.1 else ("loses" if d < -0.1 else "ties")
            parts.append(f"{verdict} against {p['name']} ({100 * p['mac_fraction']:.1f}% MACs, "
                         f"{p['psnr_mean']:.2f} dB, worst {p['psnr_worst']:.2f}) by {abs(d):.2f} dB, higher on {wins} "
                         f"of {len(f['per_item'])} images")  # fmt: skip
        out.append(f"CAT-F at {f['matched_to']} ({settings}; {100 * f['mac_fraction']:.1f}% MACs): "
                   f"{f['psnr_mean']:.2f} dB mean, worst {f['psnr_worst']:.2f}, SSIM {f['ssim_mean']:.4f}"
                   + (": " + "; ".join(parts) if parts else "") + ".")  # fmt: skip
    return out


def write_plot(records: list[dict], path: Path, shape: dict, model: QualityModel) -> str | None:
    """PSNR (mean, with a line down to the worst) against MAC fraction; None or why no plot."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        return f"matplotlib is not installed ({exc}); pip install 'cat-pruning[bench]'"
    colors = {"cat": "tab:red", "ablation": "tab:orange", "catf": "tab:green", "peer": "tab:blue"}
    markers = {"cat": "o", "ablation": "s", "catf": "D", "peer": "^"}
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    seen = set()
    labels = []
    for r in records:
        if r.get("status") != "ok" or "psnr_mean" not in r or "same configuration" in " ".join(r["notes"]):
            continue
        g = r["group"]
        x, y = r["mac_fraction"], r["psnr_mean"]
        ax.plot([x, x], [r["psnr_worst"], y], color=colors[g], alpha=0.35, lw=1)
        ax.scatter([x], [y], color=colors[g], marker=markers[g], s=45, zorder={"ablation": 3}.get(g, 4),
                   label={"cat": "CAT settings", "ablation": "CAT ablations (k=0.3 f=8)",
                          "catf": "CAT-F, best schedule per budget", "peer": "peers"}[g] if g not in seen else None)
        seen.add(g)
        label = r["name"].replace("CAT k=0.3 f=8 ", "") if g == "ablation" else r["name"]
        labels.append((x, y, label))
    # Stack the labels of points that nearly coincide (same budget, PSNR within a fraction of a dB).
    lo, hi = ax.get_ylim()
    placed: list[tuple[float, float]] = []
    for x, y, label in sorted(labels, key=lambda t: -t[1]):
        near = sum(abs(px - x) < 0.004 and abs(py - y) < 0.025 * (hi - lo) for px, py in placed)
        placed.append((x, y))
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4 - 9 * near), fontsize=7)
    ax.set_xlabel("MAC fraction of dense (FlopCounterMode, whole generation)")
    ax.set_ylabel("PSNR vs dense (dB): marker = mean, line down to worst")
    ax.set_title(f"{model.plot_title}, {shape['items']} images, {shape['steps']} steps, CPU fp32")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def write_examples(examples: dict[str, dict[int, torch.Tensor]], cols: list[tuple[str, str]],
                   rows: list[tuple[int, str]], path: Path, scale: int = 3) -> None:  # fmt: skip
    """A grid: one column per method (dense first), one row per image, a caption under each row."""
    from PIL import Image, ImageDraw

    def tile(im: torch.Tensor) -> np.ndarray:
        a = (im.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        return np.repeat(np.repeat(a, scale, 0), scale, 1)

    h, w = tile(next(iter(examples["dense"].values()))).shape[:2]
    pad, head, cap = 8, 18, 28
    width = max(len(cols) * (w + pad) + pad, 560)
    canvas = Image.new("RGB", (width, head + len(rows) * (h + cap + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (_, label) in enumerate(cols):
        draw.text((pad + j * (w + pad), 3), label[:34], fill="black")
    for r, (i, text) in enumerate(rows):
        y = head + r * (h + cap + pad)
        for j, (mid, _) in enumerate(cols):
            canvas.paste(Image.fromarray(tile(examples[mid][i])), (pad + j * (w + pad), y))
        cut = text.rfind(" ", 0, 90) if len(text) > 90 else len(text)
        draw.text((pad, y + h + 2), text[:cut], fill="black")
        draw.text((pad, y + h + 14), text[cut:].strip()[:90], fill="black")
    canvas.save(path)


def summary(records: list[dict]) -> str:
    lines = [f"{'method':<46} {'MACs':>7} {'PSNR':>7} {'worst':>7} {'SSIM':>7} {'speedup':>8}"]
    for r in sorted(records, key=lambda r: r.get("mac_fraction", 2.0)):
        if r.get("status") != "ok":
            lines.append(f"{r['name']:<46} could not run: {r['error']}")
        elif "psnr_mean" not in r:
            lines.append(f"{r['name']:<46} {r['mac_fraction']:7.3f} {'':>7} {'':>7} {'':>7} {r['speedup']:7.2f}x")
        else:
            lines.append(f"{r['name']:<46} {r['mac_fraction']:7.3f} {r['psnr_mean']:7.2f} {r['psnr_worst']:7.2f} "
                         f"{r['ssim_mean']:7.4f} {r['speedup']:7.2f}x")  # fmt: skip
    return "\n".join(lines)
