"""End-to-end suite: whole generations of an SD3 transformer, dense against CAT Pruning.

Three kinds of record:

- ``macs``: multiply-accumulates of a whole generation counted with FlopCounterMode on the
  meta device (no memory, no weights), attention forced onto the math backend so QK^T and PV
  are counted. Two accountings, each beside its analytic ideal:
  * whole model: CAT MACs / dense MACs; ideal = (F*M(N) + (S-F)*M(K)) / (S*M(N)) where M(R) is
    the per-step cost with R image tokens computed (everything image-proportional scaled by
    K/N, the text stream always computed);
  * image-token work only (the paper's accounting): the same with the text stream and
    per-sample work left out; ideal = (F + (S-F)*K/N) / S.
- ``wall``: wall clock of whole generations (the transformer loop with CFG and an Euler flow
  update, no text encoders or VAE), dense and CAT timed alternately in one run; reported with
  the MAC-ideal speedup of the same settings. On CUDA also torch.compile'd (default and
  mode="reduce-overhead"), with peak memory of dense and CAT.

Architectures are random-weight diffusers SD3Transformer2DModel configs. Usage::

    python bench/run.py --suite e2e --device cpu     # MAC counts + CPU wall clock (mid-size)
    python bench/run.py --suite e2e --device cuda    # + SD3-medium bf16 timings
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import cat_pruning
from cat_pruning.adapters import find_adapter
from cat_pruning.adapters.sd3 import REAL_CONFIGS as REAL_SD3

FAMILIES = ("sd3", "pixart", "dit", "flux", "sana", "qwenimage", "flux2", "wan")  # adapter modules with REAL_CONFIGS
SD3_MEDIUM, SD3_MEDIUM_GEN = REAL_SD3["sd3-medium-1024"]
# A mid-size config that a CPU runs in seconds per step: 6 blocks, hidden 512, 1024 tokens.
SD3_MID = dict(
    sample_size=64,
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=6,
    attention_head_dim=64,
    num_attention_heads=8,
    joint_attention_dim=512,
    caption_projection_dim=512,
    pooled_projection_dim=256,
    pos_embed_max_size=64,
)
SD3_MID_GEN = dict(latent=64, text=77, batch=2)


def make_transformer(config: dict, device: str, dtype: torch.dtype, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = SD3Transformer2DModel(**config)
    return model.to(dtype).eval().requires_grad_(False)


def make_inputs(config: dict, gen: dict, device: str, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    b, s = gen["batch"] // 2, gen["latent"]

    def rand(*shape):
        return (
            torch.empty(shape, device=device, dtype=dtype)
            if device == "meta"
            else torch.randn(*shape, generator=g).to(device, dtype)
        )

    return dict(
        latents=rand(b, config["in_channels"], s, s),
        context=rand(gen["batch"], gen["text"], config["joint_attention_dim"]),
        pooled=rand(gen["batch"], config["pooled_projection_dim"]),
    )


def generate(model, inputs: dict, steps: int, advance: bool, guidance: float = 4.5) -> torch.Tensor:
    """A flow-matching Euler loop with CFG over [uncond; cond], like StableDiffusion3Pipeline."""
    x = inputs["latents"]
    sigmas = torch.linspace(1.0, 0.0, steps + 1).tolist()  # host list, built before the loop
    for i in range(steps):
        t = torch.full((2 * x.shape[0],), 1000.0 * sigmas[i], device=x.device, dtype=x.dtype)
        out = model(
            hidden_states=torch.cat([x, x]),
            timestep=t,
            encoder_hidden_states=inputs["context"],
            pooled_projections=inputs["pooled"],
            return_dict=False,
        )[0]
        uncond, cond = out.chunk(2)
        x = x + (sigmas[i + 1] - sigmas[i]) * (uncond + guidance * (cond - uncond))
        if advance:
            cat_pruning.advance(model)
    return x


def _cat(model, keep_ratio: float, full_steps: int, backend: str = "auto"):
    """The paper's CAT at (keep_ratio, full_steps): these records measure it, not CAT-F's schedule."""
    return cat_pruning.patch(model, cat_pruning.CATConfig.paper(
        keep_ratio=keep_ratio, full_steps=full_steps, cfg_pairs=True, manual_steps=True, backend=backend))


def real_configs() -> list[tuple[str, Any, dict, dict]]:
    """(name, adapter module, transformer config, generation) of every family's real models."""
    import importlib

    found = []
    for family in FAMILIES:
        module = importlib.import_module(f"cat_pruning.adapters.{family}")
        for name, (config, gen) in module.REAL_CONFIGS.items():
            found.append((name, module, config, gen))
    return found


def _model_class(module: Any):
    import diffusers

    from cat_pruning.adapters import ADAPTERS

    (adapter,) = [a for a in ADAPTERS if type(a).__module__ == module.__name__]
    return getattr(diffusers, adapter.model_classes[0])


def _meta_model(module: Any, config: dict, gen: dict) -> tuple[Any, dict]:
    """A real configuration's transformer on the meta device in bf16, and one call's inputs."""
    with torch.device("meta"):
        model = _model_class(module)(**config).to(torch.bfloat16).eval()
    return model, module.real_inputs(config, gen, "meta", torch.bfloat16)


def macs_record(name: str, module: Any, config: dict, gen: dict, steps: int, keep_ratio: float,
                full_steps: int) -> dict:
    """Dense and CAT MACs of one generation of a real configuration, counted on the meta device."""
    model, kwargs = _meta_model(module, config, gen)
    b = gen["batch"]
    counts = {}
    for label in ("dense", "cat"):
        if label == "cat":
            cat_pruning.patch(model, cat_pruning.CATConfig.paper(
                keep_ratio=keep_ratio, full_steps=full_steps, cfg_pairs=gen.get("cfg", b == 2), manual_steps=True))
            # reference rows a bare call cannot show (FLUX.2's reference image): told, as a loop would
            cat_pruning.reset(model, reference_tokens=gen.get("reference_rows", 0))
        counter = FlopCounterMode(display=False)
        with counter, sdpa_kernel(SDPBackend.MATH), torch.no_grad():
            for i in range(steps):
                t = torch.full((b,), 1000.0 * (1 - i / steps), device="meta", dtype=torch.bfloat16)
                model(**kwargs, timestep=t, return_dict=False)
                if label == "cat":
                    cat_pruning.advance(model)
        counts[label] = counter.get_total_flops() // 2
    stats = cat_pruning.stats(model)
    patch = model._cat_pruning
    n, k, text = stats.num_tokens, stats.tokens_kept, patch.state.geometry.text
    reference = stats.reference_tokens  # an edit model's reference rows: computed at every step
    per = {r: patch.adapter.macs_per_sample(model, r + reference, n + reference, text) for r in (0, k, n)}
    fixed = per[0]  # text stream, per-sample work, patch embedding, reference rows: independent of K
    pruned = steps - full_steps
    ideal_whole = (full_steps * per[n] + pruned * per[k]) / (steps * per[n])
    ideal_image = (full_steps + pruned * k / n) / steps
    image_dense = counts["dense"] - steps * b * fixed
    image_cat = counts["cat"] - steps * b * fixed
    frac_whole, frac_image = counts["cat"] / counts["dense"], image_cat / image_dense
    ok = abs(frac_whole - ideal_whole) < 0.005
    return dict(
        case=f"macs[{name},{steps} steps]", op="macs", provider="meta-count", family=stats.family,
        shape=dict(N=n, K=k, text=text, batch=b, steps=steps, full_steps=full_steps, keep_ratio=keep_ratio,
                   **(dict(reference=reference) if reference else {})),
        macs_dense=counts["dense"], macs_cat=counts["cat"], macs_stats=stats.macs,
        mac_fraction=frac_whole, mac_fraction_ideal=ideal_whole, mac_speedup_ideal=1 / ideal_whole,
        image_mac_fraction=frac_image, image_mac_fraction_ideal=ideal_image,
        check="pass" if ok else "FAIL", error=None if ok else "whole-model MACs off their ideal by > 0.5 pp",
    )


def cache_record(name: str, module: Any, config: dict, gen: dict, branches: int = 2,
                 only: tuple[str, ...] | None = None) -> dict:
    """Bytes the caches of one generation hold (stats().cache_bytes, counted on the meta device, bf16):
    the paper's CAT (reused K/V and outputs) and patch()'s defaults (CAT-F: the Taylor forecast's
    values and slopes too, the slopes in bf16; and with slope_dtype "float32" and "float8", and with fused_attention,
    which holds no K/V read buffer), both also with fp8 K/V
    caches (kv_dtype="float8") and with fp8 V only ("float8-values"), per guidance branch and for `branches`
    of them (a pipeline that calls the transformer once per CFG branch keeps caches per branch),
    beside the bf16 weights and what diffusers' TaylorSeer holds at orders 1 and 2
    (taylorseer_bytes). `only`: these labels of the CAT settings, the others None."""
    model, kwargs = _meta_model(module, config, gen)
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    b = gen["batch"]
    held = {}
    for label, cfg in (("paper", cat_pruning.CATConfig.paper(manual_steps=True)),
                       ("catf", cat_pruning.CATConfig(manual_steps=True)),
                       ("catf-fp32-slopes", cat_pruning.CATConfig(manual_steps=True, slope_dtype="float32")),
                       ("catf-fp8-slopes", cat_pruning.CATConfig(manual_steps=True, slope_dtype="float8")),
                       ("catf-fused", cat_pruning.CATConfig(manual_steps=True, fused_attention=True)),
                       ("paper-float8", cat_pruning.CATConfig.paper(manual_steps=True, kv_dtype="float8")),
                       ("catf-float8", cat_pruning.CATConfig(manual_steps=True, kv_dtype="float8")),
                       ("paper-float8-values",
                        cat_pruning.CATConfig.paper(manual_steps=True, kv_dtype="float8-values")),
                       ("catf-float8-values", cat_pruning.CATConfig(manual_steps=True, kv_dtype="float8-values"))):
        if (only is not None and label not in only) or (
                cfg.fused_attention and not find_adapter(model).softmax_attention):  # (Sana: refused, nothing to fuse)
            held[label] = None
            continue
        cat_pruning.patch(model, cfg)
        cat_pruning.reset(model, num_steps=28, reference_tokens=gen.get("reference_rows", 0))
        for i in range(cfg.full_steps + 1):  # through the first pruned step: every cache allocated
            t = torch.full((b,), 1000.0 * (1 - i / 28), device="meta", dtype=torch.bfloat16)
            with torch.no_grad():
                model(**kwargs, timestep=t, return_dict=False)
            cat_pruning.advance(model)
        held[label] = cat_pruning.stats(model).cache_bytes
    stats = cat_pruning.stats(model)
    cat_pruning.unpatch(model)
    for order in (1, 2):
        held[f"taylorseer-order{order}"] = taylorseer_bytes(module, config, gen, order)
    gib = 2**30
    return dict(
        case=f"cache[{name}]", op="cache", provider="meta-count", family=stats.family,
        shape=dict(N=stats.num_tokens, batch=b, branches=branches),
        weights_gib=weights / gib, cache_gib_per_branch={k: v and v / gib for k, v in held.items()},
        cache_gib={k: v and branches * v / gib for k, v in held.items()}, check="n/a",
    )


def taylorseer_bytes(module: Any, config: dict, gen: dict, max_order: int) -> int:
    """Bytes diffusers' TaylorSeer holds for one guidance branch forecasting every attention layer's
    output (its default identifiers where they match: they miss attn1/attn2, so every family's
    self and cross attentions are named) once every factor exists: max_order + 1 bf16 (its default
    taylor_factors_dtype) tensors per attention output, counted on the meta device."""
    import re

    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    model, kwargs = _meta_model(module, config, gen)
    adapter = find_adapter(model)
    names = [*adapter.attention_modules(model), *adapter.cross_attention_modules(model)]
    apply_taylorseer_cache(model, TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=max_order + 1,
                                                        max_order=max_order,
                                                        cache_identifiers=[re.escape(n) for n in names]))
    b = gen["batch"]
    _set_cache_context(model, CacheContext("cond"))  # its hooks keep one state per context
    for i in range(max_order + 1):  # computed steps: each adds a factor
        t = torch.full((b,), 1000.0 * (1 - i / 28), device="meta", dtype=torch.bfloat16)
        with torch.no_grad():
            model(**kwargs, timestep=t, return_dict=False)
    total = 0
    for sub in model.modules():
        registry = getattr(sub, "_diffusers_hook", None)
        for hook in registry.hooks.values() if registry is not None else ():
            states = getattr(getattr(hook, "state_manager", None), "_state_cache", {})
            for state in states.values():
                total += sum(t.numel() * t.element_size() for factors in state.taylor_factors.values()
                             for t in factors.values())
    assert total > 0, "TaylorSeer held nothing: its hooks or state layout changed"
    return total


def roofline_record(name: str, module: Any, config: dict, gen: dict, steps: int = 28) -> dict:
    """Predicted GPU time of one generation of a real configuration in bf16, dense, with
    patch()'s defaults (CAT-F) and with them and fused_attention (pruned steps attend in one
    op), from the per-op cost model of bench/roofline.py counted step by step on the meta
    device: FLOPs, bytes moved and launches per step mode, and each GPU's roofline time of the
    whole generation."""
    import roofline

    model, kwargs = _meta_model(module, config, gen)
    b = gen["batch"]
    cfg = cat_pruning.CATConfig(cfg_pairs=gen.get("cfg", b == 2), manual_steps=True)
    per_mode: dict[str, dict[str, list]] = {}
    totals = {}
    for label in ("dense", "catf", "catf-fused"):
        if label != "dense":
            cat_pruning.patch(model, cfg.replace(fused_attention=label == "catf-fused"))
            cat_pruning.reset(model, num_steps=steps, reference_tokens=gen.get("reference_rows", 0))
        total = roofline.Cost()
        for i in range(steps):
            mode = cfg.mode(i, steps) if label != "dense" else "dense"
            t = torch.full((b,), 1000.0 * (1 - i / steps), device="meta", dtype=torch.bfloat16)
            with roofline.counting() as counter, torch.no_grad():
                model(**kwargs, timestep=t, return_dict=False)
                if label != "dense":
                    cat_pruning.advance(model)
            total += counter.cost
            per_mode.setdefault(f"{label}:{mode}", dict(cost=counter.cost, steps=[]))["steps"].append(i)
        totals[label] = total
        if label == "catf":
            stats = cat_pruning.stats(model)
    cat_pruning.unpatch(model)
    dense, catf, fused = totals["dense"], totals["catf"], totals["catf-fused"]
    def top(cost: roofline.Cost, n: int = 6) -> dict[str, float]:  # the ops that move the most, GB
        return {op: b / 1e9 for op, b in sorted(cost.bytes_by_op.items(), key=lambda kv: -kv[1])[:n]}

    modes = {key: dict(steps=len(v["steps"]), gflop=v["cost"].flops / 1e9, gbytes=v["cost"].bytes / 1e9,
                       launches=v["cost"].launches, ms={g: 1e3 * s for g, s in v["cost"].seconds.items()},
                       gbytes_by_op=top(v["cost"]))
             for key, v in per_mode.items()}  # fmt: skip
    return dict(
        case=f"roofline[{name},{steps} steps]", op="roofline", provider="meta-count", family=stats.family,
        shape=dict(N=stats.num_tokens, K=stats.tokens_kept, batch=b, steps=steps),
        modes=modes, mac_speedup_ideal=1 / stats.mac_fraction,
        predicted_ms={g: dict(dense=1e3 * dense.seconds[g], catf=1e3 * catf.seconds[g],
                              catf_fused=1e3 * fused.seconds[g]) for g in roofline.GPUS},  # fmt: skip
        predicted_speedup={g: dense.seconds[g] / catf.seconds[g] for g in roofline.GPUS},
        predicted_speedup_fused={g: dense.seconds[g] / fused.seconds[g] for g in roofline.GPUS},
        bytes_ratio=catf.bytes / dense.bytes, flop_ratio=catf.flops / dense.flops,
    )


def _time_generation(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def wall_records(
    name: str,
    config: dict,
    gen: dict,
    steps: int,
    keep_ratio: float,
    full_steps: int,
    device: str,
    dtype: torch.dtype,
    repeats: int,
    modes: list[str | None],
    catf: bool = False,
    fused: bool = False,
) -> list[dict]:
    """Dense and CAT generations timed alternately; one record per provider and compile mode.
    catf: patch()'s defaults (CAT-F) in place of the paper's CAT at (keep_ratio, full_steps);
    fused: with them, fused_attention=True."""
    dense_model = make_transformer(config, device, dtype)
    cat_model = copy.deepcopy(dense_model)
    if catf:
        cat_pruning.patch(cat_model, cat_pruning.CATConfig(cfg_pairs=True, manual_steps=True, fused_attention=fused))
    else:
        _cat(cat_model, keep_ratio, full_steps)
    inputs = make_inputs(config, gen, device, dtype)
    records = []
    for mode in modes:
        label = "eager" if mode is None else ("compile" if mode == "default" else f"compile-{mode}")
        if mode is None:
            run_dense, run_cat = dense_model, cat_model
        else:
            torch._dynamo.reset()
            run_dense = torch.compile(dense_model, fullgraph=True, mode=mode)
            run_cat = torch.compile(cat_model, fullgraph=True, mode=mode)

        def dense(run_dense=run_dense):
            return generate(run_dense, inputs, steps, advance=False)

        def cat(run_cat=run_cat):
            cat_pruning.reset(cat_model, num_steps=steps)
            return generate(run_cat, inputs, steps, advance=True)

        peak = {}
        with torch.no_grad():
            for key, fn in (("dense", dense), ("cat", cat)):  # warm-up (compiles) and peak memory
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                fn()
                peak[key] = torch.cuda.max_memory_allocated() if device == "cuda" else None
            times = {"dense": [], "cat": []}
            for _ in range(repeats):
                for key, fn in (("dense", dense), ("cat", cat)):
                    times[key].append(_time_generation(fn, device))
        stats = cat_pruning.stats(cat_model)
        med = {k: statistics.median(v) for k, v in times.items()}
        speedup, ideal = med["dense"] / med["cat"], stats.mac_speedup
        target = 0.9 if device == "cpu" else (0.95 if mode is None else 0.97)
        for key in ("dense", "cat"):
            v = sorted(times[key])
            records.append(
                dict(
                    case=f"wall[{name},{label}]",
                    op="generation",
                    provider=key,
                    shape=dict(
                        N=stats.num_tokens,
                        K=stats.tokens_kept,
                        batch=gen["batch"],
                        steps=steps,
                        full_steps=full_steps,
                        keep_ratio=keep_ratio,
                    ),
                    dtype=str(dtype).replace("torch.", ""),
                    median_ms=1e3 * med[key],
                    p20_ms=1e3 * v[len(v) // 5],
                    p80_ms=1e3 * v[(4 * len(v)) // 5],
                    repeats=repeats,
                    timer="perf_counter",
                    peak_bytes=peak[key],
                    speedup=speedup if key == "cat" else None,
                    mac_speedup_ideal=ideal if key == "cat" else None,
                    speedup_of_ideal=speedup / ideal if key == "cat" else None,
                    target_of_ideal=target,
                    check="n/a",
                )
            )
    return records


def _gib(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def summary(records: list[dict]) -> str:
    lines = []
    for r in records:
        if r["op"] == "roofline":
            gpus = ", ".join(f"{g} {p['dense']:.0f} -> {p['catf']:.0f} ms ({r['predicted_speedup'][g]:.2f}x)"
                             for g, p in r["predicted_ms"].items())
            fused = ", ".join(f"{g} {p['catf_fused']:.0f} ms ({r['predicted_speedup_fused'][g]:.2f}x)"
                              for g, p in r["predicted_ms"].items())  # fmt: skip
            lines.append(f"{r['case']}: CAT-F defaults predicted {gpus}; FLOPs {100 * r['flop_ratio']:.1f}%, "
                         f"bytes {100 * r['bytes_ratio']:.1f}% of dense (MAC-ideal {r['mac_speedup_ideal']:.2f}x); "
                         f"with fused_attention {fused}")
        elif r["op"] == "cache":
            per = r["cache_gib_per_branch"]
            lines.append(f"{r['case']}: {r['shape']['N']:,} tokens, bf16 weights {r['weights_gib']:.1f} GiB; caches "
                         f"per branch: paper CAT {per['paper']:.2f} GiB, CAT-F defaults {per['catf']:.2f} GiB "
                         f"({per['catf-fp32-slopes']:.2f} with fp32 slopes, {per['catf-fp8-slopes']:.2f} with fp8 "
                         f"slopes, {_gib(per['catf-fused'])} with fused_attention); with fp8 K/V paper "
                         f"{per['paper-float8']:.2f}, CAT-F {per['catf-float8']:.2f} GiB, fp8 V only "
                         f"{per['paper-float8-values']:.2f} / {per['catf-float8-values']:.2f}; "
                         f"diffusers TaylorSeer order 1 {per['taylorseer-order1']:.2f} / order 2 "
                         f"{per['taylorseer-order2']:.2f} GiB (x{r['shape']['branches']} CFG branches)")
        elif r["op"] == "macs":
            lines.append(
                f"{r['case']}: whole model {100 * r['mac_fraction']:.2f}% of dense (ideal "
                f"{100 * r['mac_fraction_ideal']:.2f}%, {r['mac_speedup_ideal']:.2f}x); image tokens only "
                f"{100 * r['image_mac_fraction']:.2f}% (ideal {100 * r['image_mac_fraction_ideal']:.2f}%) "
                f"[{r['check']}]"
            )
        elif r["provider"] == "cat":
            mem = f", peak {r['peak_bytes'] / 2**30:.2f} GiB" if r.get("peak_bytes") else ""
            lines.append(
                f"{r['case']}: {r['median_ms']:.0f} ms, speedup {r['speedup']:.2f}x = "
                f"{100 * r['speedup_of_ideal']:.0f}% of the MAC-ideal {r['mac_speedup_ideal']:.2f}x "
                f"(target {100 * r['target_of_ideal']:.0f}%){mem}"
            )
        elif r.get("peak_bytes"):
            lines.append(f"{r['case']} dense: {r['median_ms']:.0f} ms, peak {r['peak_bytes'] / 2**30:.2f} GiB")
    return "\n".join(lines)


def run(args: Any) -> list[dict]:
    """MAC counts (SD3-medium at 28 and 50 steps; with --full every family's real configs at 28),
    then the wall clock of the device. --filter TEXT keeps the cases whose name contains TEXT."""
    wanted = getattr(args, "filter", None) or ""
    cases = [("sd3-medium-1024", 28), ("sd3-medium-1024", 50)]
    if not args.quick:
        cases += [(name, 28) for name, *_ in real_configs() if name != "sd3-medium-1024"]
    modules = {name: (module, config, gen) for name, module, config, gen in real_configs()}
    records = []
    for name, steps in cases:
        if wanted in f"macs[{name},{steps} steps]":
            records.append(macs_record(name, *modules[name], steps, 0.3, 8))
    for name, (module, config, gen) in modules.items():
        if wanted in f"cache[{name}]" and not args.quick:
            # Qwen-Image's and Wan's pipelines call the transformer once per CFG branch, each with its caches
            branches = 2 if module.__name__.rsplit(".", 1)[-1] in ("qwenimage", "wan") else 1
            records.append(cache_record(name, module, config, gen, branches))
    for name in ("sd3-medium-1024", "flux1-dev-1024"):
        if wanted in f"roofline[{name},28 steps]":
            records.append(roofline_record(name, *modules[name]))
    if args.device == "cpu":
        if wanted in "wall[sd3-mid-cpu,eager]":
            repeats = 2 if args.quick else 5
            records += wall_records("sd3-mid-cpu", SD3_MID, SD3_MID_GEN, 16, 0.3, 4, "cpu", torch.float32, repeats,
                                    [None])
        catf_modes = [m for m, label in ((None, "eager"), ("default", "compile"))
                      if wanted in f"wall[sd3-mid-cpu-catf,{label}]"]  # fmt: skip
        if catf_modes:  # patch()'s defaults (issue 21 item 5: eager and compiled against the MAC-ideal)
            repeats = 3 if args.quick else 5
            records += wall_records("sd3-mid-cpu-catf", SD3_MID, SD3_MID_GEN, 16, 0.02, 8, "cpu", torch.float32,
                                    repeats, catf_modes, catf=True)
        if wanted in "wall[sd3-mid-cpu-catf-fused,eager]":  # fused_attention on the CPU: the extension's blocked op
            records += wall_records("sd3-mid-cpu-catf-fused", SD3_MID, SD3_MID_GEN, 16, 0.02, 8, "cpu", torch.float32,
                                    3 if args.quick else 5, [None], catf=True, fused=True)
    elif wanted in "wall[sd3-medium-1024]":
        records += wall_records("sd3-medium-1024", SD3_MEDIUM, SD3_MEDIUM_GEN, 28, 0.3, 8, "cuda",
                                torch.bfloat16, 3, [None, "default", "reduce-overhead"])
    for fused in (False, True) if args.device == "cuda" else ():  # check the roofline rows
        name = "sd3-medium-1024-catf" + ("-fused" if fused else "")
        if wanted in f"wall[{name},eager]":
            records += wall_records(name, SD3_MEDIUM, SD3_MEDIUM_GEN, 28, 0.02, 8, "cuda", torch.bfloat16, 3, [None],
                                    catf=True, fused=fused)
    print(summary(records))
    return records
