"""Quality suite, peer tuning: probing a peer's variants until one runs, then tuning its threshold
(or interval) until its MAC fraction lands near a CAT setting's (ctx.target)."""

from __future__ import annotations

import math
import statistics
from typing import TYPE_CHECKING

from quality_measure import Context, _error_text, generate, mac_fraction

if TYPE_CHECKING:
    from quality_methods import Method


def tune_continuous(ctx: Context, m: Method, knob: str, lo: float, hi: float, iters: int = 8) -> None:
    """Log-bisection of a threshold (larger = more caching = fewer MACs) towards the target fraction
    on the tuning items; keeps the value whose fraction was closest."""
    items = ctx.items[: ctx.tune_items]
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

