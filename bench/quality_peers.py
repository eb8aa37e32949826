"""Quality suite, peer tuning: probing a peer's variants until one runs, then tuning its threshold
(or interval) until its MAC fraction lands near a CAT setting's (ctx.target)."""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Callable

from quality_base import TUNING_LOGS, Method, no_session
from quality_measure import Context, _error_text, generate, mac_fraction

# Schedules whose MAC fraction lands within BAND of the budget compete on PSNR over the tuning
# prompts, the same rule for every method (diffusers TaylorSeer's integer intervals cannot land
# on a budget exactly; CAT-F's keep_ratio is solved to land on it where the schedule can, else
# it takes the nearest K within the band).
BAND = 0.02
# Every warm-up from 2 to 10 (the hand-tuned pick at 53.6% of the steps is warm-up 7).
TAYLORSEER_WARMUPS = tuple(range(2, 11))
TAYLORSEER_ORDERS = (1, 2)
# disable_cache_after_step as the number of last steps computed in full (diffusers' cooldown; 0 =
# off): on the scene model the last steps decide the image (4 tuning prompts at 53.6% MACs:
# warm-up 8, interval 3, order 2: 41.9 dB; warm-up 7, interval 3, the last step computed: 50.4 dB).
TAYLORSEER_COOLDOWNS = (0, 1, 2)
CATF_REFRESH = (2, 3, 4, 5, 6)  # refresh_every (the Taylor forecast needs refresh steps)
# final_full_steps: the last steps computed in full, as TAYLORSEER_COOLDOWNS (both get 0-2; CAT-F's
# grid stopped at 1 until TaylorSeer's pick at the defaults' budget computed two and won: scene
# model, 8 prompts outside the bench's sets, patch()'s schedule with the last two steps computed
# instead of one: 48.30 -> 53.33 dB at 55.4 -> 58.9% MACs)
CATF_FINAL = (0, 1, 2)
# full_steps: every value from 4 to 10, as TaylorSeer gets every warm-up (those below the number of
# steps). The old grid (4, 6, 8) missed TaylorSeer's own schedule: 8 prompts outside the bench's
# sets, 51% MACs, full 7, refreshes 8, 11, ..., 26 and one token (order 1, damping 0.4): 50.93 dB,
# against 48.09 for diffusers TaylorSeer computing the same steps (warm-up 7, interval 3, order 2).
# From 2: TaylorSeer's warm-up 3 (full_steps 3 here) wins its 44% budget on the photo model.
CATF_FULL = tuple(range(2, 11))
# forecast_kv_damping: full slope steps suit short horizons (refresh every 2-3 steps), damped
# ones long horizons (measured on 8 prompts: refresh every 6, 35% MACs: 27.9 dB at 1.0, 34.1 at 0.5),
# so 0.5 competes only in schedules refreshing every CATF_DAMPED_REFRESH steps or more.
CATF_KV_DAMPING = (1.0, 0.5)
CATF_DAMPED_REFRESH = 4
# forecast_from: only "refresh" (the default). "all" feeds the rows a pruned step computes into the
# forecast state, which costs with more than one token (8 prompts outside the bench's sets, keep
# 0.3: 38.5 dB against 47.6 with "refresh"; with one token the two differ in that token only).
CATF_FORECAST_FROM = ("refresh",)
# (forecast_order, forecast_damping) of the output forecast. Order 2 pays with refreshes every 2-3
# steps and costs with longer gaps (8 prompts outside the bench's sets: 65%, refresh every 2:
# 47.2 dB at order 1 (damping 0.6), 48.4 at order 2 (0.8); 51%, every 3: 44.7 against 45.2; 44%,
# every 4: 40.9 against 40.1-40.3), so it competes only in schedules refreshing every
# CATF_ORDER2_REFRESH steps.
CATF_OUTPUT = ((1, 0.4), (2, 0.8))
CATF_ORDER2_REFRESH = (2, 3)
# output_cache: the model's prediction ("noise") or the final norm's input ("hidden"). The hidden
# state's forecast often wants the undamped step (photo model, 8 prompts outside the bench's sets,
# 44%, every 3, order 1: 48.35 dB at damping 1.0, 43.95 at 0.8; 65%, every 2, order 2: 55.49 at
# 1.0, 54.07 at 0.8) but not with refreshes far apart (scene model, 35%, every 5, order 1: 34.43 at
# 0.4, 27.26 at 1.0), so it gets both.
CATF_OUTPUT_CACHES = ("noise", "hidden")
CATF_OUTPUT_BY_CACHE = {"noise": CATF_OUTPUT, "hidden": (*CATF_OUTPUT, (1, 1.0), (2, 1.0))}
# (output_cache, forecast_order, forecast_damping) also tried with forecast_calibration="output"
# (the skipped tokens' output step fitted on the computed ones): it pays on an undamped first-order
# forecast with refreshes 4 steps apart (photo model, 8 prompts outside the bench's sets, 36.5%
# MACs, one token: 41.85 -> 43.55 dB), costs with refreshes closer (every 3 at 44%: 48.37 ->
# 47.23) and on a damped forecast (scene model, 35%, damping 0.4: 36.73 -> 35.16; patch()'s
# defaults, order 2 at 0.85: -3 to -4 dB), so only the undamped one competes.
CATF_CALIBRATED = (("hidden", 1, 1.0),)
# refresh_offset: every phase of the refresh steps (0, the default, refreshes refresh_every steps
# after the fill step; 1 .. refresh_every - 1 earlier first refreshes), each with its own K for the
# budget. The phase decides a lot, and not monotonically: photo model, 8 prompts outside the bench's
# sets, 35%, full 3, every 4, last step full, one token, order 1 undamped, hidden cache: offsets 1 /
# 2 / 3 (refreshes 3-23, 4-24, 5-25) give 32.92 / 41.86 / 37.79 dB. Offset 2 computes the steps of
# diffusers TaylorSeer's pick there (warm-up 3, interval 4, cooldown 27: 41.88 dB), which the two
# phases the grid had before (the default and the one ending on the second-to-last step) missed.


def tune_continuous(ctx: Context, m: Method, knob: str, lo: float, hi: float, iters: int = 6) -> None:
    """Log-bisection of a threshold (larger = more caching = fewer MACs) towards the target fraction
    on the first item; keeps the value whose fraction was closest."""
    items = ctx.items[:1]  # FLOP counting is slow (about 10x a plain generation on the CPU)
    tried = []
    for _ in range(iters):
        value = math.sqrt(lo * hi)
        m.params[knob] = value
        frac = statistics.fmean(mac_fraction(ctx, m, items))
        tried.append((value, frac))
        if frac > ctx.target:
            lo = value
        else:
            hi = value
    best = min(tried, key=lambda vf: (abs(vf[1] - ctx.target), vf[0]))
    m.params[knob] = best[0]
    m.params["tuning"] = [dict(value=v, mac_fraction=f) for v, f in tried]
    m.notes.append(f"{knob} tuned to {best[0]:.4g} on {len(items)} prompt(s): MAC fraction {best[1]:.3f} "
                   f"(target {ctx.target:.3f})")  # fmt: skip


def tune_discrete(ctx: Context, m: Method, knob: str, values) -> None:
    """Tries each value (compute fraction falls with it) until the fraction drops below the target;
    keeps the closest."""
    items = ctx.items[:1]  # a fixed schedule: the compute does not depend on the prompt
    tried = []
    for value in values:
        m.params[knob] = value
        frac = statistics.fmean(mac_fraction(ctx, m, items))
        tried.append((value, frac))
        if frac <= ctx.target:
            break
    best = min(tried, key=lambda vf: abs(vf[1] - ctx.target))
    m.params[knob] = best[0]
    m.params["tuning"] = [dict(value=v, mac_fraction=f) for v, f in tried]
    m.notes.append(f"{knob} tuned to {best[0]}: MAC fraction {best[1]:.3f} (target {ctx.target:.3f})")


def probe(ctx: Context, m: Method) -> str | None:
    """One generation with the method at its most aggressive setting (so its cached path runs);
    the exact error when it cannot run, else None."""
    saved = {k: m.params[k] for k in m.probe_params}
    m.params.update(m.probe_params)
    try:
        with m.session(ctx.pipe) as reset:
            generate(ctx, ctx.items[0], reset)
    except Exception as exc:  # noqa: BLE001 - a peer that does not run on this model is a result, not a crash
        return _error_text(exc)
    finally:
        m.params.update(saved)
    return None


def prepare_peer(ctx: Context, m: Method) -> None:
    """Probe the peer's variants in order (the first that runs is used; why the others failed goes
    into the notes), then tune it. No variant running is the recorded error."""
    errors = []
    for label, update in m.variants or [("", {})]:
        m.params.update(update)
        err = probe(ctx, m)
        if err is None:
            break
        errors.append(err)
        m.notes.append(f"{label} fails on {ctx.arch}: {err}" if label else err)
    else:
        m.error = errors[0]
        m.notes.clear()
        return
    if errors:
        m.notes.append(f"ran with {label}")
    try:
        m.tune(ctx)
    except Exception as exc:  # noqa: BLE001
        m.error = "tuning: " + _error_text(exc)



def tune_psnr(ctx: Context, m: Method, items: list | None = None) -> float:
    """Mean PSNR of the method against dense over the held-out tuning items (default all of
    ctx.tune_set; dense images made once)."""
    from cat_pruning.metrics import psnr

    items = ctx.tune_set if items is None else items
    for it in items:
        if it not in ctx.tune_dense:
            with no_session(ctx.pipe):
                ctx.tune_dense[it] = generate(ctx, it)[0]
    # a setting scored on an item once is not generated again (pick_best_by_schedule meets it in two stages)
    setting = ("tune_psnr", m.id, *sorted((k, repr(v)) for k, v in m.params.items() if k not in TUNING_LOGS))
    keys = [(*setting, repr(it)) for it in items]
    missing = [(it, key) for it, key in zip(items, keys, strict=True) if key not in ctx.memo]
    if missing:
        with m.session(ctx.pipe) as reset:
            for it, key in missing:
                ctx.memo[key] = psnr(generate(ctx, it, reset)[0], ctx.tune_dense[it])
                if ctx.bar is not None:
                    ctx.bar.update()
    return statistics.fmean(ctx.memo[key] for key in keys)


# Screening: a grid of more than SCREEN_KEEP candidates is scored on the first SCREEN_ITEMS tuning
# items first; the best SCREEN_KEEP (at least; an eighth of the grid if more) are then scored on
# all of them, and the best mean over all wins. Every peer is tuned so; CAT-F,
# whose grid is larger, through pick_best_by_schedule (below).
SCREEN_ITEMS = 2
SCREEN_KEEP = 12


def in_band(ctx: Context, candidates: list[tuple[dict, float]]) -> list[tuple[dict, float]]:
    """The (params, MAC fraction) candidates within BAND of ctx.target, else the closest one."""
    band = [c for c in candidates if abs(c[1] - ctx.target) <= BAND]
    return band or [min(candidates, key=lambda c: abs(c[1] - ctx.target))]


def _score(ctx: Context, m: Method, base: dict, params: dict, items: list | None) -> float:
    """tune_psnr of the method with `params` over its `base` params."""
    m.params.clear()
    m.params.update(base, **params)
    return tune_psnr(ctx, m, items)


def pick_best(ctx: Context, m: Method, candidates: list[tuple[dict, float]], what: str, screen: bool = True) -> None:
    """Among (params, MAC fraction) candidates within BAND of ctx.target (else the closest one),
    keeps the one with the best PSNR on the tuning prompts (after screening a large grid on
    SCREEN_ITEMS of them: SCREEN_KEEP; not with screen=False)."""
    band = in_band(ctx, candidates)
    base = dict(m.params)
    keep = max(SCREEN_KEEP, len(band) // 8)
    screened = {}
    if screen and len(band) > keep and len(ctx.tune_set) > SCREEN_ITEMS:
        items = ctx.tune_set[:SCREEN_ITEMS]
        screened = {i: _score(ctx, m, base, params, items) for i, (params, _) in enumerate(band)}
        survivors = sorted(screened, key=screened.get, reverse=True)[:keep]
    else:
        survivors = range(len(band))
    tried = [(band[i][0], band[i][1], _score(ctx, m, base, band[i][0], None)) for i in survivors]
    best = max(tried, key=lambda t: t[2])
    m.params.clear()
    m.params.update(base, **best[0])
    m.params["tuning"] = [dict(**p, mac_fraction=f, tune_psnr=q) for p, f, q in tried]
    if screened:
        m.params["screening"] = [dict(**band[i][0], mac_fraction=band[i][1], screen_psnr=q)
                                 for i, q in screened.items()]
    screened_note = (f", the best {len(tried)} of a screening on {SCREEN_ITEMS} of them" if screened else "")
    m.notes.append(f"best {what} of {len(band)} within {BAND:.2f} of the budget "
                   f"{ctx.target:.3f} on {len(ctx.tune_set)} held-out tuning prompt(s){screened_note}: {best[0]} "
                   f"(MAC fraction {best[1]:.3f}, PSNR {best[2]:.2f} dB)")


# A grid too large to screen whole (CAT-F's: 850 to 4,000 candidates a budget at 28 steps, where
# a generation takes about a second on this CPU) is searched in three stages, on the SCREEN_ITEMS
# first: its schedules (which steps run in full, how many tokens the others compute), each with one
# representative setting of the other knobs; every setting of the best eighth of the schedules (at
# least SCHEDULE_KEEP); then the best SETTINGS_KEEP settings of each of those schedules on every
# tuning item. Two prompts rank settings poorly: on the scene model at 44% the exhaustive search's
# pick (full 5, every 3, order 2 at damping 0.8: 44.31 dB on the eight tuning prompts) ranked 27th
# of 294 schedules on the two, and within its schedule order 1 at 0.4 scored 43.69 against its
# 43.21 there but 42.01 on the eight; keeping 16 schedules, or one setting each, lost it.
SCHEDULE_KEEP = 16
SETTINGS_KEEP = 3


def pick_best_by_schedule(ctx: Context, m: Method, candidates: list[tuple[dict, float]], what: str,
                          schedule: tuple[str, ...],
                          representative: Callable[[list[tuple[dict, float]]], tuple[dict, float]]) -> None:
    """The best candidate on the tuning items, searched by schedule (candidates that agree on the
    params named in `schedule`): each schedule's `representative` candidate scored on the
    SCREEN_ITEMS, every candidate of the best max(SCHEDULE_KEEP, schedules / 8) schedules scored
    there, and the best SETTINGS_KEEP of each of those schedules scored on every item (pick_best
    without its screening); pick_best alone where there are no more schedules than SCHEDULE_KEEP."""
    band = in_band(ctx, candidates)
    groups: dict[tuple, list[tuple[dict, float]]] = {}
    for c in band:
        groups.setdefault(tuple(c[0].get(k) for k in schedule), []).append(c)
    if len(groups) <= SCHEDULE_KEEP or len(ctx.tune_set) <= SCREEN_ITEMS:
        pick_best(ctx, m, band, what)
        return
    base = dict(m.params)
    items = ctx.tune_set[:SCREEN_ITEMS]
    reps = {key: representative(g) for key, g in groups.items()}
    ranked = sorted(((_score(ctx, m, base, r[0], items), key) for key, r in reps.items()), key=lambda qk: qk[0],
                    reverse=True)  # fmt: skip
    kept = [key for _, key in ranked[:max(SCHEDULE_KEEP, len(groups) // 8)]]
    screened = {key: [(c, _score(ctx, m, base, c[0], items)) for c in groups[key]] for key in kept}
    finalists = [c for key in kept
                 for c, _ in sorted(screened[key], key=lambda cq: cq[1], reverse=True)[:SETTINGS_KEEP]]  # fmt: skip
    m.params.clear()
    m.params.update(base)
    pick_best(ctx, m, finalists, what, screen=False)
    m.params["screening"] = [dict(**c[0], mac_fraction=c[1], screen_psnr=q) for key in kept for c, q in screened[key]]
    m.params["schedule_screening"] = [dict(**reps[key][0], screen_psnr=q) for q, key in ranked]
    m.notes.append(f"the {len(finalists)} {what}s above: the best {SETTINGS_KEEP} settings on {SCREEN_ITEMS} items "
                   f"of each of the best {len(kept)} of {len(groups)} schedules ({len(band)} candidates), each "
                   f"schedule screened there with one setting of its other knobs")


def _computed_steps(ctx: Context, m: Method, schedule: tuple[str, ...], rule: int) -> int:
    """Steps in which the peer ran the model's attention (a call counter on the first attention's
    to_q, which a skipped step skips): one plain generation, no FLOP counting, once per
    schedule (kept in ctx.memo: several budgets share the peer's schedules). Where the first
    schedule counted for a peer's hooks (its settings but those named in `schedule`) gives what
    diffusers' rule says (`rule`: taylorseer_schedule_steps, magcache_schedule), the rule answers
    for that peer's other schedules."""
    settings = sorted((k, str(v)) for k, v in m.params.items() if k not in TUNING_LOGS)
    key = ("computed_steps", m.id.partition("@")[0], *settings)
    if key not in ctx.memo:
        hooks = ("rule_holds", m.id.partition("@")[0], *((k, v) for k, v in settings if k not in schedule))
        if hooks not in ctx.memo:
            ctx.memo[key] = _count_computed_steps(ctx, m)
            ctx.memo[hooks] = ctx.memo[key] == rule
        else:
            ctx.memo[key] = rule if ctx.memo[hooks] else _count_computed_steps(ctx, m)
    return ctx.memo[key]


# the settings of diffusers' TaylorSeer that decide which steps it computes
TAYLORSEER_SCHEDULE = ("disable_cache_before_step", "cache_interval", "disable_cache_after_step")


def taylorseer_schedule_steps(steps: int, before: int, interval: int, after: int | None) -> int:
    """Steps of `steps` that diffusers' TaylorSeer hook computes in full (TaylorSeerCacheHook:
    step s < disable_cache_before_step, or (s - disable_cache_before_step - 1) a multiple of
    cache_interval, or s >= disable_cache_after_step)."""
    return sum(s < before or (s - before - 1) % interval == 0 or (after is not None and s >= after)
               for s in range(steps))  # fmt: skip


def skipped_step_cost(fraction: float, computed: int, steps: int) -> float:
    """The MAC fraction of a cheap step (a peer's skipped step, CAT-F's pruned step; a step that
    computes everything costs 1), from one schedule's FLOP-counted fraction and its full steps."""
    return (fraction * steps - computed) / (steps - computed)


def skipping_fraction(computed: int, steps: int, skipped_cost: float) -> float:
    """The MAC fraction of a schedule that computes `computed` of `steps` steps in full, the rest
    at `skipped_cost` each."""
    return (computed + (steps - computed) * skipped_cost) / steps


def _taylorseer_steps(ctx: Context, m: Method) -> int:
    rule = taylorseer_schedule_steps(ctx.steps, *(m.params.get(k) for k in TAYLORSEER_SCHEDULE))
    return _computed_steps(ctx, m, TAYLORSEER_SCHEDULE, rule)


def _count_computed_steps(ctx: Context, m: Method) -> int:
    """The first attention's calls per transformer call of a step (a pipeline that calls the
    transformer once per CFG branch, as Wan's, runs both branches' attention in a computed step)."""
    tr = ctx.pipe.transformer
    name = next(n for n, _ in tr.named_modules() if n.endswith(("attn.to_q", "attn1.to_q")))
    calls, forwards = [], []
    handles = [tr.get_submodule(name).register_forward_hook(lambda *_: calls.append(1)),
               tr.register_forward_hook(lambda *_: forwards.append(1))]
    try:
        with m.session(ctx.pipe) as reset:
            generate(ctx, ctx.items[0], reset)
    finally:
        for handle in handles:
            handle.remove()
    return round(len(calls) * ctx.steps / len(forwards))


def tune_taylorseer(ctx: Context, m: Method, warmup: int) -> None:
    """diffusers TaylorSeer at its best schedule for the budget: every warm-up (disable_cache_before_step)
    of TAYLORSEER_WARMUPS and --peer-warmup, each cooldown (disable_cache_after_step) of
    TAYLORSEER_COOLDOWNS, the cache intervals around the budget for each, both
    Taylor orders; the best PSNR on the tuning prompts wins. A schedule's MAC fraction follows from
    the steps it computes: (n + (S - n) c) / S, with c, the cost of a forecast step, from one FLOP count."""
    s = ctx.steps
    if ("taylorseer_forecast_cost", s) not in ctx.memo:
        m.params.update(disable_cache_before_step=2, cache_interval=4)
        frac0, n0 = statistics.fmean(mac_fraction(ctx, m, ctx.items[:1])), _taylorseer_steps(ctx, m)
        ctx.memo[("taylorseer_forecast_cost", s)] = skipped_step_cost(frac0, n0, s)
    c = ctx.memo[("taylorseer_forecast_cost", s)]
    candidates = []
    for w, cool in itertools.product(sorted({*TAYLORSEER_WARMUPS, warmup}), TAYLORSEER_COOLDOWNS):
        after = s - cool if cool else None
        m.params.update(disable_cache_before_step=w, disable_cache_after_step=after)
        for interval in range(2, 15):  # the fraction falls with the interval: stop once below the band
            m.params["cache_interval"] = interval
            n = _taylorseer_steps(ctx, m)
            frac = skipping_fraction(n, s, c)
            candidates += [(dict(disable_cache_before_step=w, cache_interval=interval, max_order=o,
                                 disable_cache_after_step=after), frac)
                           for o in TAYLORSEER_ORDERS]  # fmt: skip
            if frac < ctx.target - BAND or n == s:
                break
    pick_best(ctx, m, candidates, "TaylorSeer schedule")


# diffusers' MagCache, every knob it has: the accumulated-error threshold (a geometric grid: its
# schedules, not its values, are what differ), max_skip_steps (diffusers' default 3) and
# retention_ratio (the share of first steps never skipped, default 0.2); the magnitude ratios come
# from diffusers' own calibration mode, run dense on the held-out tuning prompts.
MAGCACHE_THRESHOLDS = tuple(0.002 * 1.25**i for i in range(40))  # 0.002 .. 12
MAGCACHE_MAX_SKIPS = (1, 2, 3, 4, 6)
MAGCACHE_RETENTIONS = (0.1, 0.2, 0.3)
MAGCACHE_SCHEDULE = ("threshold", "max_skip_steps", "retention_ratio", "mag_ratios")


def magcache_schedule(ratios: list[float], threshold: float, max_skip_steps: int,
                      retention_ratio: float) -> list[bool]:  # fmt: skip
    """Which steps diffusers' MagCache hook computes (MagCacheHeadHook: from the retention step on,
    the step is skipped while the accumulated error of the ratios' product stays within the threshold
    for at most max_skip_steps steps, and only once a step has computed a residual)."""
    import torch

    scales = torch.tensor(ratios)  # the hook's arithmetic: float32 ratios, so float32 accumulators
    steps = len(ratios)
    retention = int(retention_ratio * steps + 0.5)
    computed, acc_ratio, acc_steps, acc_err = [], 1.0, 0, 0.0
    for s in range(steps):
        compute = True
        if s >= retention:
            acc_ratio *= scales[s]
            acc_steps += 1
            acc_err += abs(1.0 - acc_ratio)
            if any(computed) and acc_err <= threshold and acc_steps <= max_skip_steps:
                compute = False
            else:
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
        computed.append(compute)
    return computed


def calibrate_magcache(ctx: Context, m: Method) -> list[float]:
    """MagCache's magnitude ratios for this model at ctx.steps, by diffusers' calibration mode
    (no step skipped; at the end of a generation the hook prints each cache context's ratios, which
    it tells its users to copy): the mean over the tuning prompts and the CFG branches."""
    import ast
    import contextlib
    import io

    m.params.update(calibrate=True, num_inference_steps=ctx.steps)
    printed = io.StringIO()
    try:
        with m.session(ctx.pipe) as reset, contextlib.redirect_stdout(printed):
            for it in ctx.tune_set:
                generate(ctx, it, reset)
    finally:
        m.params["calibrate"] = False
    lines = printed.getvalue().splitlines()
    runs = [ast.literal_eval(lines[i + 1].strip()) for i, line in enumerate(lines) if "Calibration Complete" in line]
    if not runs or any(len(r) != ctx.steps for r in runs):
        raise ValueError(f"MagCache calibration printed {len(runs)} ratio list(s), expected {ctx.steps} ratios each")
    return [statistics.fmean(r[s] for r in runs) for s in range(ctx.steps)]


def tune_magcache(ctx: Context, m: Method) -> None:
    """diffusers' MagCache at its best settings for the budget: ratios calibrated on the tuning prompts,
    then every (threshold, max_skip_steps, retention_ratio) of the grids above whose schedule lands
    within BAND of the budget; the best PSNR on the tuning prompts wins. As for TaylorSeer, a
    schedule's MAC fraction follows from the steps it computes (a skipped step runs only the
    embeddings and the output layers, its cost c from one FLOP count). The ratios and c are measured
    once per run (ctx.memo): every budget's MagCache shares them."""
    s = ctx.steps
    if ("magcache", s) not in ctx.memo:
        ratios = calibrate_magcache(ctx, m)
        m.params.update(mag_ratios=ratios, threshold=MAGCACHE_THRESHOLDS[-1], max_skip_steps=max(MAGCACHE_MAX_SKIPS),
                        retention_ratio=min(MAGCACHE_RETENTIONS))  # fmt: skip
        frac0, n0 = statistics.fmean(mac_fraction(ctx, m, ctx.items[:1])), _magcache_steps(ctx, m)
        if n0 == s:
            raise ValueError("MagCache skips no step even at its loosest settings")
        ctx.memo[("magcache", s)] = ratios, skipped_step_cost(frac0, n0, s)
    ratios, c = ctx.memo[("magcache", s)]
    m.params.update(mag_ratios=ratios, num_inference_steps=s)
    candidates, seen = [], set()
    for skips, retention, threshold in itertools.product(MAGCACHE_MAX_SKIPS, MAGCACHE_RETENTIONS,
                                                         MAGCACHE_THRESHOLDS):  # fmt: skip
        schedule = tuple(magcache_schedule(ratios, threshold, skips, retention))
        if schedule in seen:  # a larger threshold that skips the same steps is the same method
            continue
        seen.add(schedule)
        n = sum(schedule)
        candidates.append((dict(threshold=threshold, max_skip_steps=skips, retention_ratio=retention),
                           skipping_fraction(n, s, c)))
    pick_best(ctx, m, candidates, "MagCache setting")
    m.notes.append("mag_ratios calibrated by diffusers' MagCache calibration mode on the "
                   f"{len(ctx.tune_set)} tuning prompt(s): " + ", ".join(f"{r:.3f}" for r in ratios))


def _magcache_steps(ctx: Context, m: Method) -> int:
    rule = sum(magcache_schedule(*(m.params[k] for k in ("mag_ratios", "threshold", "max_skip_steps",
                                                          "retention_ratio"))))  # fmt: skip
    steps = _computed_steps(ctx, m, MAGCACHE_SCHEDULE, rule)
    if steps != rule:
        raise ValueError(f"MagCache computed {steps} steps where diffusers' rule says {rule}")
    return steps


def catf_schedule_fraction(ctx: Context, full_steps: int, refresh_every: int, kept: int,
                           step_fraction: Callable[[int], float], refresh_offset: int = 0,
                           final_full_steps: int = 0) -> float:  # fmt: skip
    """MAC fraction of a CAT-F schedule: steps that run every token cost 1, a pruned step
    step_fraction(K) (affine in the K tokens it computes)."""
    import cat_pruning

    cfg = cat_pruning.CATConfig(full_steps=full_steps, refresh_every=refresh_every, refresh_offset=refresh_offset,
                                final_full_steps=final_full_steps)
    pruned = [cfg.mode(s, ctx.steps) for s in range(ctx.steps)].count("pruned")
    return skipping_fraction(ctx.steps - pruned, ctx.steps, step_fraction(kept))


def catf_candidates(ctx: Context, n: int, step_fraction: Callable[[int], float],
                    output_caches: tuple[str, ...] = CATF_OUTPUT_CACHES) -> list[tuple[dict, float]]:
    """(params, MAC fraction) of every CAT-F schedule within BAND of ctx.target: per full_steps,
    refresh_every and final_full_steps (CATF_FINAL), the K of n tokens that lands on the budget,
    or the nearest K if none does,
    for each refresh phase (refresh_offset 0 .. refresh_every - 1, each with its own K), each K/V damping
    (0.5 only when refreshing every CATF_DAMPED_REFRESH steps or more), each forecast_from of
    CATF_FORECAST_FROM, each output cache of `output_caches` and each of its output forecasts
    (CATF_OUTPUT_BY_CACHE; order 2 only when refreshing every CATF_ORDER2_REFRESH steps; those of
    CATF_CALIBRATED with and without forecast_calibration)."""
    candidates = []
    fulls = [f for f in CATF_FULL if f < ctx.steps]
    for full, every, final in itertools.product(fulls, CATF_REFRESH, CATF_FINAL):
        if full + final >= ctx.steps:
            continue
        outputs = [(cache, order, damping, calibration)
                   for cache in output_caches for order, damping in CATF_OUTPUT_BY_CACHE[cache]
                   if order == 1 or every in CATF_ORDER2_REFRESH
                   for calibration in ("none", "output")[:1 + ((cache, order, damping) in CATF_CALIBRATED)]
                   ]  # fmt: skip
        dampings = [d for d in CATF_KV_DAMPING if d == 1.0 or every >= CATF_DAMPED_REFRESH]
        for o in range(every):  # every phase (0: the default)
            lo, hi = (catf_schedule_fraction(ctx, full, every, k, step_fraction, refresh_offset=o,
                                             final_full_steps=final) for k in (1, n))  # fmt: skip
            kept = max(1, min(n, round(1 + (ctx.target - lo) / (hi - lo) * (n - 1))))  # lands on the budget
            frac = catf_schedule_fraction(ctx, full, every, kept, step_fraction, refresh_offset=o,
                                          final_full_steps=final)
            if abs(frac - ctx.target) > BAND:
                continue
            candidates += [(dict(keep_ratio=kept / n, full_steps=full, refresh_every=every, refresh_offset=o,
                                 final_full_steps=final, forecast_kv_damping=d, forecast_from=f, forecast_order=order,
                                 forecast_damping=damping, output_cache=cache,
                                 **({"forecast_calibration": c} if c != "none" else {})), frac)
                           for d in dampings for f in CATF_FORECAST_FROM
                           for cache, order, damping, c in outputs]  # fmt: skip
    return candidates


def tune_catf(ctx: Context, m: Method, output_caches: tuple[str, ...] = CATF_OUTPUT_CACHES) -> None:
    """CAT-F at its best schedule for the budget: for each refresh_every of CATF_REFRESH, full_steps
    of CATF_FULL, refresh phase (every refresh_offset), forecast_kv_damping of CATF_KV_DAMPING,
    forecast_from, output cache of `output_caches` and output forecast (CATF_OUTPUT_BY_CACHE), the
    keep_ratio that lands on the budget
    (the MAC fraction of a pruned step is affine in the tokens it computes: measured at two keep
    ratios), or the nearest one within BAND; the best PSNR on the tuning prompts wins, searched
    schedule first (pick_best_by_schedule, CATF_SCHEDULE, catf_representative)."""
    import cat_pruning

    item = ctx.items[:1]
    points = []
    full = min(CATF_FULL[0], ctx.steps - 1)
    for keep in (0.05, 0.5):  # P pruned steps, the others full: frac = (S - P + P f(K)) / S
        # no refresh step and no final full step (the default final_full_steps=1 would add one
        # full step, which read as pruned-step cost overstated f by about 0.04 at 28 steps)
        m.params.update(keep_ratio=keep, full_steps=full, refresh_every=ctx.steps, final_full_steps=0)
        frac = statistics.fmean(mac_fraction(ctx, m, item))
        with m.session(ctx.pipe) as reset:
            generate(ctx, item[0], reset)
            s = cat_pruning.stats(ctx.pipe)
        n = s.num_tokens
        pruned = [st.mode for st in s.steps].count("pruned")
        points.append((s.tokens_kept, skipped_step_cost(frac, ctx.steps - pruned, ctx.steps)))
    (k0, f0), (k1, f1) = points
    slope = (f1 - f0) / (k1 - k0)

    def step_fraction(k: int) -> float:
        return f0 + slope * (k - k0)

    candidates = catf_candidates(ctx, n, step_fraction, output_caches)
    if not candidates:
        raise ValueError(f"no CAT-F schedule reaches the budget {ctx.target:.3f}")
    pick_best_by_schedule(ctx, m, candidates, "CAT-F schedule", CATF_SCHEDULE, catf_representative)


# The CAT-F params that decide which steps compute what: the first stage of pick_best_by_schedule.
CATF_SCHEDULE = ("keep_ratio", "full_steps", "refresh_every", "refresh_offset", "final_full_steps")


def catf_representative(group: list[tuple[dict, float]]) -> tuple[dict, float]:
    """The setting a CAT-F schedule is screened with: undamped K/V slope, no calibration, the
    grid's first output cache, order 2 where the schedule may have it (refreshes every
    CATF_ORDER2_REFRESH steps) at the grid's first damping for that order (CATF_OUTPUT)."""
    plain = [c for c in group if c[0]["forecast_kv_damping"] == 1.0 and "forecast_calibration" not in c[0]]
    return max(plain, key=lambda c: c[0]["forecast_order"])  # the first of the highest order
